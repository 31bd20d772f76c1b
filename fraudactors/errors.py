"""One error root for the whole engine.

Every error carries ``retriable``: the supervisor and the callers read that flag instead of
matching on exception types (the aiokafka way). A bad *record* is never an exception of the
worker: it becomes an :class:`InvalidRecord` that the worker routes to the dead-letter topic.
"""

from __future__ import annotations


class FraudActorsError(Exception):
    """Root of every error this package raises on purpose."""

    retriable: bool = False


class ConfigError(FraudActorsError):
    """Invalid or unknown configuration. The message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key
        self.problem = problem


class InvalidRecord(FraudActorsError):
    """An input record that cannot be scored; it goes to the dead-letter topic with ``reason``."""

    def __init__(self, reason: str, stage: str = "parse") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


class ModelError(FraudActorsError):
    """A model that cannot be loaded or used."""


class ModelIntegrityError(ModelError):
    """The ONNX file does not match the sha256 recorded in its metadata."""


class RoutingRefused(FraudActorsError):
    """A routing document that cannot be applied: invalid, or it names a model that does not load
    (missing, sha256 mismatch, onnxruntime refuses it). The routing in force keeps serving."""


class TopicUnreadable(FraudActorsError):
    """A record batch that does not decode (bad CRC, unknown codec) where a reader needs every record
    up to the end: the message names the topic, partition and offset."""


class ServiceError(FraudActorsError):
    """An embedded broker or Redis server that cannot be found or started."""


class BinaryNotFound(ServiceError):
    """A service binary is missing; the message says how to get one."""


class FeatureStoreUnavailable(FraudActorsError):
    """The online feature store (Redis) cannot be reached right now."""

    retriable = True


class FeatureStoreRejected(FraudActorsError):
    """Redis answered, but refused the request (out of memory, a key of the wrong type, a script
    error): retrying the same request gets the same answer. Not an outage."""

    retriable = False

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class ActorError(FraudActorsError):
    """Base for failures of the actor runtime."""


class ActorDied(ActorError):
    """The actor a caller was waiting on has died; raised at once instead of hanging."""

    retriable = True


class MailboxClosed(ActorError):
    """The mailbox no longer accepts messages (its actor is stopping or stopped)."""


class BackpressureTimeout(ActorError):
    """A bounded send waited for space longer than its deadline."""

    retriable = True


class StartupTimeout(ActorError):
    """A child did not report ready within its start timeout."""

    retriable = True


class RestartIntensityExceeded(ActorError):
    """A supervisor used up its restart budget and fails upward to its parent."""


class WorkerDied(ActorError):
    """A process-pool worker died while running a call; the call can be retried."""

    retriable = True


class PoolClosed(ActorError):
    """The process pool is shut down."""
