"""One frozen, validated settings object.

Sources, later wins: the packaged defaults (``fraudactors/defaults.toml``), an optional TOML file
(``--config PATH`` or ``FRAUDACTORS_CONFIG``), environment variables ``FRAUDACTORS_<SECTION>__<KEY>``
(double underscore between levels, e.g. ``FRAUDACTORS_KAFKA__BOOTSTRAP_SERVERS``), then explicit
overrides from code. An unknown key or a bad value raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fraudactors.errors import ConfigError
from fraudactors.redact import REDACTED, redact_url, url_passwords

ENV_PREFIX = "FRAUDACTORS_"

KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Keys whose values never reach a log line or an error message (as_dict shows REDACTED instead);
# the password in any URL-valued setting (redis://:pw@host) is masked the same way.
SECRET_KEYS = frozenset({"kafka.sasl_password", "http.predict_token"})
# RFC 6750 b64token: what may follow "Bearer " in an Authorization header.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "fraudactors"
    # Static membership: a stable id per replica avoids a rebalance on every restart.
    group_instance_id: str = ""
    client_id: str = "fraudactors"
    # Real Apache Kafka: keep True. The embedded Tansu broker rejects InitProducerId.
    enable_idempotence: bool = True
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = 2
    max_batch_size: int = 262144
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 300000
    fetch_max_records: int = 2000
    # How long a fetch may wait for data. Tansu answers a fetch only after this wait even when
    # records arrive sooner (p50 produce-to-consume ~250 ms at 500, ~3 ms at 10; docs/tansu.md).
    # Apache Kafka returns as soon as data arrives, so a low value costs only idle fetches.
    fetch_max_wait_ms: int = 10
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    request_timeout_ms: int = 30000
    # Security (docs/operations.md, "Kafka TLS and SASL"): PLAINTEXT, SSL, SASL_PLAINTEXT or
    # SASL_SSL. SASL_* needs a mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), a user name and a
    # password; give the password as FRAUDACTORS_KAFKA__SASL_PASSWORD (a Secret), not in a file.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    # SSL / SASL_SSL: PEM files. No cafile: the system's trusted CAs. certfile (+ keyfile, unless
    # the key is in the certfile): a client certificate for mutual TLS.
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    def validate(self) -> None:
        _require(bool(self.bootstrap_servers.strip()), "kafka.bootstrap_servers", "must not be empty")
        _require(bool(self.group_id.strip()), "kafka.group_id", "must not be empty")
        _require(self.fetch_max_records > 0, "kafka.fetch_max_records", "must be > 0")
        _require(self.fetch_max_wait_ms >= 0, "kafka.fetch_max_wait_ms", "must be >= 0")
        _require(self.linger_ms >= 0, "kafka.linger_ms", "must be >= 0")
        for key in ("max_batch_size", "session_timeout_ms", "max_poll_interval_ms", "request_timeout_ms"):
            _require(getattr(self, key) > 0, f"kafka.{key}", "must be > 0")
        _require(
            self.heartbeat_interval_ms < self.session_timeout_ms,
            "kafka.heartbeat_interval_ms",
            "must be below kafka.session_timeout_ms",
        )
        self._validate_security()

    def _validate_security(self) -> None:
        protocol = self.security_protocol
        _require(protocol in KAFKA_SECURITY_PROTOCOLS, "kafka.security_protocol",
                 f"must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, got {protocol!r}")
        _require(self.sasl_mechanism in ("", *KAFKA_SASL_MECHANISMS), "kafka.sasl_mechanism",
                 f"must be one of {', '.join(KAFKA_SASL_MECHANISMS)} (or empty), got {self.sasl_mechanism!r}")
        if protocol.startswith("SASL_"):
            for key in ("sasl_mechanism", "sasl_username", "sasl_password"):
                _require(bool(getattr(self, key)), f"kafka.{key}",
                         f"is required when kafka.security_protocol is {protocol}")
        else:
            # Set in a file but never used: most likely the protocol was forgotten. The password
            # alone is let through, so an optional Secret may be mounted before the switch.
            for key in ("sasl_mechanism", "sasl_username"):
                _require(not getattr(self, key), f"kafka.{key}",
                         f"is set but kafka.security_protocol is {protocol} (SASL needs SASL_PLAINTEXT or SASL_SSL)")
        if protocol not in ("SSL", "SASL_SSL"):
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                _require(not getattr(self, key), f"kafka.{key}",
                         f"is set but kafka.security_protocol is {protocol} (TLS needs SSL or SASL_SSL)")
        _require(not self.ssl_keyfile or bool(self.ssl_certfile), "kafka.ssl_keyfile",
                 "needs kafka.ssl_certfile (the client certificate it belongs to)")


@dataclass(frozen=True, slots=True)
class TopicSettings:
    transactions: str = "transactions"
    predictions: str = "predictions"
    labels: str = "labels"
    dlq: str = "transactions.dlq"
    # The routing document (models.variants changed live, `fraudactors models`): one partition,
    # compacted, read by every replica without a consumer group.
    control: str = "fraudactors.control"
    partitions: int = 12
    replication_factor: int = 1

    def validate(self) -> None:
        for name in ("transactions", "predictions", "labels", "dlq", "control"):
            _require(bool(getattr(self, name).strip()), f"topics.{name}", "must not be empty")
        _require(self.partitions >= 1, "topics.partitions", "must be >= 1")
        _require(self.replication_factor >= 1, "topics.replication_factor", "must be >= 1")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "redis://localhost:6379/0"
    key_prefix: str = "fa:"
    # State keys expire this long after their last update (longest window + margin).
    ttl_s: int = 40 * 86400
    socket_timeout_ms: int = 250
    # What the feature workers do while Redis is unreachable: score from the transaction alone
    # and mark the decision degraded, or hold the partition and retry until Redis returns.
    on_unavailable: Literal["degrade", "hold"] = "degrade"
    # How often a degraded worker probes Redis to come back by itself.
    retry_interval_ms: int = 500
    # Degraded-mode decisions kept to be applied to the state once Redis is back.
    backlog_max: int = 200_000
    # A Redis Cluster (or Valkey cluster): `url` is one of its nodes (scheme, password, TLS as for
    # one instance), `cluster_nodes` more startup nodes ("host:port") in case that one is down.
    cluster: bool = False
    cluster_nodes: tuple[str, ...] = ()
    # Connections at most in each client's pool (per node on a cluster): the stream path's client,
    # the labels', the A/B ledger's and the PING client each have one; POST /predict has its own,
    # of http.max_store_reads. Ours, not whatever the redis-py version defaults to.
    max_connections: int = 100

    def validate(self) -> None:
        _require(self.url.startswith(("redis://", "rediss://", "unix://")), "redis.url",
                 "must start with redis://, rediss:// or unix://")
        _require(self.ttl_s > 0, "redis.ttl_s", "must be > 0")
        _require(self.socket_timeout_ms > 0, "redis.socket_timeout_ms", "must be > 0")
        _require(self.retry_interval_ms > 0, "redis.retry_interval_ms", "must be > 0")
        _require(self.backlog_max >= 0, "redis.backlog_max", "must be >= 0")
        _require(self.max_connections >= 1, "redis.max_connections", "must be >= 1")
        for node in self.cluster_nodes:
            host, _, port = node.rpartition(":")
            _require(bool(host) and port.isdigit(), "redis.cluster_nodes", f"'{node}' is not host:port")
        _require(self.cluster or not self.cluster_nodes, "redis.cluster_nodes", "needs redis.cluster = true")
        _require(not (self.cluster and self.url.startswith("unix://")), "redis.cluster",
                 "a cluster is reached over TCP (redis:// or rediss://), not a unix socket")
        _require("{" not in self.key_prefix and "}" not in self.key_prefix, "redis.key_prefix",
                 "must not contain '{' or '}' (the keys' hash tags)")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    # Micro-batching: a stage takes what is queued, up to batch_max; with batch_linger_ms > 0 it
    # waits up to that long for more. Records come a fetch at a time and the feature actor
    # answers all workers at once, so batches fill without a linger; one only adds latency.
    batch_max: int = 256
    batch_linger_ms: float = 0.0
    # Bounded mailboxes; a full one makes the sender wait (and the ingestor pause the partition).
    mailbox_size: int = 4096
    inference_workers: int = 1
    # "process": ONNX sessions pinned in a process pool; "thread": a session in a thread here.
    inference_mode: Literal["process", "thread"] = "process"
    inference_timeout_s: float = 10.0
    max_inflight_batches: int = 8
    # Records per output partition handed to the producer and not yet acknowledged; a full window
    # makes the workers wait (their mailboxes fill, the ingestor pauses partitions). >= batch_max.
    publish_window: int = 4096
    # Records of an input partition handed to the publisher whose offsets cannot be committed yet
    # (not acknowledged, or after one that is not); more pauses the partition until half of them
    # are. Bounds what a publish retried for long holds: memory, the replay log, what a restart
    # decides again. >= batch_max.
    max_unacknowledged: int = 8192
    commit_interval_ms: int = 500
    # A commit the broker does not answer within this is given up and retried at the next interval.
    commit_timeout_s: float = 5.0
    shutdown_timeout_s: float = 20.0
    start_timeout_s: float = 60.0
    # A consumer that made no progress with records waiting for this long is restarted.
    watchdog_s: float = 30.0
    # Transactions and labels dated further ahead of the clock are dead letters.
    max_future_skew_s: float = 300.0
    restart_max: int = 5
    restart_window_s: float = 60.0
    # Audit/debug: add the scored feature vector ("features": {name: value}) to every decision.
    # Off by default, so a decision is exactly the SPEC §3 object.
    emit_features: bool = False
    # Add each shadow variant's probability to every decision ("shadow": {variant: p}, SPEC §3),
    # so downstream analysis can compare models on the same transactions.
    emit_shadow: bool = False

    def validate(self) -> None:
        _require(self.batch_max >= 1, "engine.batch_max", "must be >= 1")
        _require(self.batch_linger_ms >= 0, "engine.batch_linger_ms", "must be >= 0")
        _require(self.mailbox_size >= 1, "engine.mailbox_size", "must be >= 1")
        _require(self.inference_workers >= 1, "engine.inference_workers", "must be >= 1")
        _require(self.max_inflight_batches >= 1, "engine.max_inflight_batches", "must be >= 1")
        _require(self.publish_window >= self.batch_max, "engine.publish_window",
                 f"must be >= engine.batch_max ({self.batch_max}): a micro-batch must fit in it")
        _require(self.max_unacknowledged >= self.batch_max, "engine.max_unacknowledged",
                 f"must be >= engine.batch_max ({self.batch_max}): a micro-batch must fit in it")
        _require(self.commit_interval_ms > 0, "engine.commit_interval_ms", "must be > 0")
        _require(self.commit_timeout_s > 0, "engine.commit_timeout_s", "must be > 0")
        for key in ("inference_timeout_s", "shutdown_timeout_s", "start_timeout_s", "watchdog_s",
                    "restart_window_s"):
            _require(getattr(self, key) > 0, f"engine.{key}", "must be > 0")
        _require(self.restart_max >= 0, "engine.restart_max", "must be >= 0")
        _require(self.max_future_skew_s >= 0, "engine.max_future_skew_s", "must be >= 0")


@dataclass(frozen=True, slots=True)
class VariantSettings:
    version: str
    weight: float = 0.0
    # A shadow variant is scored and recorded but never decides.
    shadow: bool = False

    def validate(self, key: str) -> None:
        _require(bool(self.version.strip()), f"{key}.version", "must not be empty")
        _require(math.isfinite(self.weight) and self.weight >= 0, f"{key}.weight", "must be >= 0")


def _default_variants() -> dict[str, VariantSettings]:
    return {"A": VariantSettings("v1", 0.9), "B": VariantSettings("v2", 0.1)}


@dataclass(frozen=True, slots=True)
class ModelSettings:
    dir: str = "models"
    variants: Mapping[str, VariantSettings] = field(default_factory=_default_variants)

    def validate(self) -> None:
        _require(bool(self.variants), "models.variants", "at least one variant is required")
        for name, variant in self.variants.items():
            variant.validate(f"models.variants.{name}")
        deciding = [v for v in self.variants.values() if not v.shadow]
        _require(bool(deciding), "models.variants", "at least one variant must not be shadow")
        _require(sum(v.weight for v in deciding) > 0, "models.variants",
                 "the weights of the non-shadow variants must add up to more than 0")


@dataclass(frozen=True, slots=True)
class DecisionSettings:
    # Thresholds on fraud_probability; < 0 means "use the model's metadata".
    review_threshold: float = -1.0
    decline_threshold: float = -1.0
    # is_fraud = decision in is_fraud_decisions
    is_fraud_decisions: tuple[str, ...] = ("review", "decline")
    max_reasons: int = 3
    # Degraded mode (feature store unreachable): every decision is scored by the fallback of its
    # variant (models/<version>/fallback.onnx, with its own thresholds). "score": the fallback's
    # decision; "review": at least review; "approve-below": a payment below
    # degraded_approve_below is approved, the rest get the fallback's decision (docs/operations.md).
    degraded_policy: Literal["score", "review", "approve-below"] = "score"
    degraded_approve_below: float = 20.0

    def validate(self) -> None:
        for key in ("review_threshold", "decline_threshold"):
            value = getattr(self, key)
            _require(value < 0 or 0.0 <= value <= 1.0, f"decision.{key}", "must be in [0, 1] or < 0")
        if self.review_threshold >= 0 and self.decline_threshold >= 0:
            _require(self.review_threshold <= self.decline_threshold, "decision.review_threshold",
                     "must be <= decision.decline_threshold")
        for decision in self.is_fraud_decisions:
            _require(decision in ("approve", "review", "decline"), "decision.is_fraud_decisions",
                     f"unknown decision {decision!r}")
        _require(0 <= self.max_reasons <= 3, "decision.max_reasons", "must be in [0, 3] (SPEC §3: at most 3)")
        _require(0.0 <= self.degraded_approve_below <= 1e9, "decision.degraded_approve_below",
                 "must be in [0, 1e9] (an amount, SPEC §2)")
        if self.degraded_policy == "approve-below":
            _require(self.degraded_approve_below > 0, "decision.degraded_approve_below",
                     "must be > 0 when decision.degraded_policy is approve-below (0 approves nothing)")


@dataclass(frozen=True, slots=True)
class ABSettings:
    """The A/B evidence (``fraudactors ab report``, ``fraudactors_ab_*`` metrics; docs/models.md)."""

    # The window of event time the evidence covers, ending at the newest decision recorded.
    window_s: float = 28 * 86400.0
    # Decisions older than this (event time) count as label-mature: their labels should be in.
    label_delay_s: float = 7 * 86400.0
    # The ledger's event-time buckets (the grain of the window and of the maturity).
    bucket_s: int = 3600
    # How often each replica re-reads the ledger for its fraudactors_ab_* gauges.
    refresh_s: float = 30.0
    # Significance level, power and the smallest detection difference worth detecting (for the
    # "need ~N more labelled frauds" estimate when no difference is seen yet).
    alpha: float = 0.05
    power: float = 0.8
    min_effect: float = 0.01

    def validate(self) -> None:
        _require(self.bucket_s >= 1, "ab.bucket_s", "must be >= 1")
        _require(self.window_s >= self.bucket_s, "ab.window_s", "must be >= ab.bucket_s")
        _require(self.label_delay_s >= 0, "ab.label_delay_s", "must be >= 0")
        _require(self.refresh_s > 0, "ab.refresh_s", "must be > 0")
        _require(0 < self.alpha < 0.5, "ab.alpha", "must be in (0, 0.5)")
        _require(0.5 <= self.power < 1, "ab.power", "must be in [0.5, 1)")
        _require(0 < self.min_effect < 1, "ab.min_effect", "must be in (0, 1)")

    @property
    def keep_buckets(self) -> int:
        """Buckets the ledger keeps behind its newest one."""
        return int(-(-self.window_s // self.bucket_s)) + 1


@dataclass(frozen=True, slots=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    # A request's line and headers must have arrived this long after the connection opened (or
    # after the first byte following the previous response); then the connection is closed.
    header_timeout_s: float = 10.0
    # POST /predict: the body must have arrived this long after its headers (408 otherwise).
    body_timeout_s: float = 10.0
    # Open connections at most; one more is answered 503 and closed.
    max_connections: int = 256
    # POST /predict reads the online state over its own Redis connections, this many at most (so a
    # flood of requests never takes the stream path's); one more waits for a free one up to
    # store_read_wait_ms, then is answered 503 with Retry-After.
    max_store_reads: int = 32
    store_read_wait_ms: int = 500
    # When set, POST /predict needs "Authorization: Bearer <token>" (401 otherwise); the probes
    # and /metrics stay open. Give it as FRAUDACTORS_HTTP__PREDICT_TOKEN (a Secret), not in a file.
    predict_token: str = field(default="", repr=False)

    def validate(self) -> None:
        _require(0 <= self.port <= 65535, "http.port", "must be in [0, 65535]")
        _require(self.header_timeout_s > 0, "http.header_timeout_s", "must be > 0")
        _require(self.body_timeout_s > 0, "http.body_timeout_s", "must be > 0")
        _require(self.max_connections >= 1, "http.max_connections", "must be >= 1")
        _require(self.max_store_reads >= 1, "http.max_store_reads", "must be >= 1")
        _require(self.store_read_wait_ms > 0, "http.store_read_wait_ms", "must be > 0")
        if self.predict_token:
            _require(len(self.predict_token) >= _MIN_TOKEN_LENGTH, "http.predict_token",
                     f"must be at least {_MIN_TOKEN_LENGTH} characters (or empty: no token)")
            _require(_BEARER_TOKEN.fullmatch(self.predict_token) is not None, "http.predict_token",
                     "may hold only letters, digits and -._~+/ (then trailing =), as a bearer token does")


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: console rendering on a terminal, JSON lines otherwise.
    format: Literal["auto", "json", "console"] = "auto"

    def validate(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Where the embedded services' binaries are: explicit path first, then packaged, then PATH."""

    tansu_bin: str = ""
    redis_bin: str = ""
    start_timeout_s: float = 30.0

    def validate(self) -> None:
        _require(self.start_timeout_s > 0, "services.start_timeout_s", "must be > 0")


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """The model monitor (docs/operations.md, "Model monitor"): PSI over a sliding event-time window."""

    enabled: bool = True
    # the window of event time the PSI is computed over, in sub_windows steps
    window_s: float = 86400.0
    sub_windows: int = 24
    # no PSI is exported for a version with fewer rows than this in the window
    min_rows: int = 1000
    # the features the drift alert watches (label top="true"): the most important of the reference,
    # calendar features (hour_of_day, day_of_week, is_night) left out
    top_features: int = 5

    def validate(self) -> None:
        _require(self.window_s > 0 and math.isfinite(self.window_s), "monitor.window_s", "must be > 0")
        _require(1 <= self.sub_windows <= 1000, "monitor.sub_windows", "must be in [1, 1000]")
        _require(self.min_rows >= 1, "monitor.min_rows", "must be >= 1")
        _require(self.top_features >= 0, "monitor.top_features", "must be >= 0")


@dataclass(frozen=True, slots=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    decision: DecisionSettings = field(default_factory=DecisionSettings)
    ab: ABSettings = field(default_factory=ABSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    services: ServiceSettings = field(default_factory=ServiceSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)

    def validate(self) -> Settings:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def replace(self, **sections: Any) -> Settings:
        """A copy with whole sections or ``section={key: value}`` updates, validated."""
        updates: dict[str, Any] = {}
        for name, value in sections.items():
            if isinstance(value, Mapping):
                updates[name] = _build(type(getattr(self, name)), {**_as_dict(getattr(self, name)), **value},
                                       name)
            else:
                updates[name] = value
        return dataclasses.replace(self, **updates).validate()


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _as_dict(obj: Any, redact: bool = False, prefix: str = "") -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _as_dict(v, redact, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
    if redact and prefix in SECRET_KEYS and obj:
        return REDACTED
    if redact and isinstance(obj, str):
        return redact_url(obj)
    return obj


def as_dict(settings: Settings, *, secrets: bool = False) -> dict[str, Any]:
    """Plain data, for logging the effective configuration: secrets (SECRET_KEYS) that are set
    show as ``"***"``, and so does the password of any URL (``redis://:***@host``).
    ``secrets=True`` keeps them, for a copy of the settings that a child process reads back."""
    result: dict[str, Any] = _as_dict(settings, redact=not secrets)
    return result


def secret_values(settings: Settings) -> frozenset[str]:
    """Every secret the settings hold (SECRET_KEYS that are set, URL passwords), for
    :func:`fraudactors.redact.redact` to take out of text the settings never formatted."""
    found: set[str] = set()

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, Mapping):
            for key, value in obj.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        elif isinstance(obj, str) and obj:
            found.update({obj} if prefix in SECRET_KEYS else url_passwords(obj))

    walk(as_dict(settings, secrets=True), "")
    return frozenset(found)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value not in args and value.lower() in args:
            value = value.lower()
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"must be a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if isinstance(value, int | float):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                raise ConfigError(key, f"must be a number, got {value!r}") from None
        else:
            raise ConfigError(key, f"must be a number, got {value!r}")
        if not math.isfinite(result):
            raise ConfigError(key, f"must be finite, got {value!r}")
        return result
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or origin is typing.Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a table, got {value!r}")
        # A plain dict (picklable, so settings can cross into pool workers); never mutated.
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a table, got {value!r}")
        return _build(tp, value, key)
    raise ConfigError(key, f"unsupported type {tp!r}")  # pragma: no cover - programming error


def _build(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(full, "unknown key")
        try:
            kwargs[key] = _coerce(value, hints[key], full)
        except ConfigError:
            if full in SECRET_KEYS:  # the message would quote the value
                raise ConfigError(full, "must be a string") from None
            raise
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = [f.name for f in known.values()
                   if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{prefix}.{missing[0]}" if missing else prefix, "is required") from exc


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if len(path) < 2 or not all(path):
            raise ConfigError(name, "environment overrides look like FRAUDACTORS_<SECTION>__<KEY>")
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(name, "conflicts with another override")
        node[path[-1]] = value
    # Variant names are case-sensitive in TOML; environment names are upper-case by custom.
    variants = layer.get("models", {}).get("variants")
    if isinstance(variants, dict):
        layer["models"]["variants"] = {k.upper(): v for k, v in variants.items()}
    return layer


def default_config_text() -> str:
    return resources.files("fraudactors").joinpath("defaults.toml").read_text(encoding="utf-8")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build and validate the settings. Raises :class:`ConfigError` naming the bad key."""
    env = os.environ if env is None else env
    data: dict[str, Any] = tomllib.loads(default_config_text())
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("config", f"cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError("config", f"{file} is not UTF-8 text (TOML is): {exc.reason} at byte {exc.start}") \
                from None
        try:
            from_file = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{file} is not valid TOML: {exc}") from None
        # Variants in a file replace the default set rather than merging into it.
        models = from_file.get("models")
        if isinstance(models, dict) and "variants" in models:
            data.setdefault("models", {})["variants"] = {}
        data = _merge(data, from_file)
    data = _merge(data, _env_layer(env))
    if overrides:
        data = _merge(data, overrides)
    settings: Settings = _build(Settings, data, "")
    return settings.validate()
