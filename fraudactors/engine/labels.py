"""Delayed labels: feed the store's label-driven features and measure each variant online.

:class:`OutcomeRecorder` remembers, for every decision, what each variant (deciding and shadow)
said -- one Redis pipeline per flush, keys with a TTL -- so that a label arriving days later can
be matched. :class:`LabelConsumer` reads ``labels`` in its own consumer group
(``<group_id>.labels``), applies them to the store (``apply_labels``, idempotent), matches them to
the remembered decisions (``fraudactors_label_outcomes_total{variant,outcome}``) and commits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaError

from fraudactors.engine.features import FeatureStoreActor
from fraudactors.engine.inference import Scored
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import FeatureStoreUnavailable, InvalidRecord
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

if TYPE_CHECKING:
    from fraudactors.features.schema import Label, Transaction

_FLUSH_S = 0.2
_MAX_BUFFER = 200_000
_CHUNK = 2000
# SET key value EX ttl for every (key, value) pair: one command for a whole chunk, because
# packing thousands of separate SET commands costs the event loop more than the round trip.
_SET_MANY = """
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
end
return #KEYS
"""
_UNAVAILABLE = (FeatureStoreUnavailable, ConnectionError, OSError, TimeoutError)


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (*_UNAVAILABLE, RedisError)


def outcome(predicted_fraud: bool, labelled_fraud: bool) -> str:
    if predicted_fraud:
        return "tp" if labelled_fraud else "fp"
    return "fn" if labelled_fraud else "tn"


class OutcomeRecorder:
    """Remembers each decision per variant, buffered and written in one pipeline per flush."""

    def __init__(self, settings: Settings, metrics: EngineMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._prefix = f"{settings.redis.key_prefix}decision:"
        self._ttl = settings.redis.ttl_s
        self._buffer: deque[tuple[str, bytes]] = deque(maxlen=_MAX_BUFFER)
        self.dropped = 0
        self._redis: Any = None
        self._set_many: Any = None
        self._log = get_logger(actor="outcomes")

    def key(self, transaction_id: str) -> str:
        return self._prefix + transaction_id

    def record(self, txns: Sequence[Transaction], scored: Sequence[Scored]) -> None:
        """Called by the feature workers, synchronously, once per batch."""
        buffer = self._buffer
        room = _MAX_BUFFER - len(buffer)
        if room < len(txns):
            self.dropped += len(txns) - room  # oldest go first; only metrics depend on them
        for txn, s in zip(txns, scored, strict=True):
            parts = [f"{s.variant}={int(s.is_fraud)}"]
            parts.extend(f"{name}={int(flag)}" for name, flag in s.shadows)
            buffer.append((txn.transaction_id, ",".join(parts).encode()))

    async def lookup(self, transaction_ids: Sequence[str]) -> list[dict[str, bool] | None]:
        if self._redis is None or not transaction_ids:
            return [None] * len(transaction_ids)
        values = await self._redis.mget([self.key(t) for t in transaction_ids])
        out: list[dict[str, bool] | None] = []
        for raw in values:
            if raw is None:
                out.append(None)
                continue
            entry: dict[str, bool] = {}
            for part in raw.decode().split(","):
                name, _, flag = part.partition("=")
                entry[name] = flag == "1"
            out.append(entry)
        return out

    async def run(self, task_status: Any) -> None:
        import redis.asyncio as aioredis

        errors = _redis_errors()
        timeout = self._settings.redis.socket_timeout_ms / 1000.0
        client = aioredis.Redis.from_url(self._settings.redis.url, socket_timeout=max(timeout, 1.0),
                                         socket_connect_timeout=max(timeout, 1.0))
        self._redis = client
        self._set_many = client.register_script(_SET_MANY)
        task_status.started()
        try:
            while True:
                await asyncio.sleep(_FLUSH_S)
                try:
                    await self.flush()
                except errors as exc:
                    self._log.debug("outcomes_flush_failed", error=repr(exc), buffered=len(self._buffer))
        finally:
            await asyncio.shield(self._final_flush(client, errors))

    async def _final_flush(self, client: Any, errors: tuple[type[BaseException], ...]) -> None:
        catch: tuple[type[BaseException], ...] = (TimeoutError, *errors)
        try:
            async with asyncio.timeout(2.0):
                await self.flush()
        except catch as exc:
            self._log.warning("outcomes_lost_on_stop", buffered=len(self._buffer), error=repr(exc))
        finally:
            self._redis = None
            await client.aclose()

    async def flush(self) -> None:
        buffer = self._buffer
        while self._redis is not None and buffer:
            chunk = [buffer.popleft() for _ in range(min(len(buffer), _CHUNK))]
            prefix = self._prefix
            try:
                await self._set_many(keys=[prefix + tid for tid, _ in chunk],
                                     args=[self._ttl, *(value for _, value in chunk)])
            except BaseException:
                room = _MAX_BUFFER - len(buffer)
                buffer.extendleft(reversed(chunk[len(chunk) - room:] if room < len(chunk) else chunk))
                raise


class LabelConsumer:
    """Supervised child: labels -> store.apply_labels + online accuracy per variant -> commit."""

    def __init__(self, settings: Settings, metrics: EngineMetrics, features: FeatureStoreActor,
                 outcomes: OutcomeRecorder) -> None:
        self._settings = settings
        self._metrics = metrics
        self._features = features
        self._outcomes = outcomes
        self._log = get_logger(actor="labels")
        self.applied = 0
        self.invalid = 0

    async def run(self, task_status: Any) -> None:
        from fraudactors.features.schema import parse_label
        from fraudactors.services.kafka import make_consumer

        settings = self._settings
        consumer = make_consumer(settings, settings.topics.labels,
                                 group_id=f"{settings.kafka.group_id}.labels",
                                 client_id=f"{settings.kafka.client_id}-labels",
                                 # Labels arrive days late; a long poll costs the broker nothing
                                 # while the topic is idle (the decision path keeps its short one).
                                 fetch_max_wait_ms=max(settings.kafka.fetch_max_wait_ms, 500),
                                 group_instance_id=(f"{settings.kafka.group_instance_id}.labels"
                                                    if settings.kafka.group_instance_id else None))
        # Labels are not on the decision path and not part of readiness: report started at once
        # and join the group in the background (a group join costs seconds on some brokers).
        task_status.started()
        errors = _redis_errors()
        retry_s = settings.redis.retry_interval_ms / 1000.0
        try:
            await consumer.start()
            while True:
                data = await consumer.getmany(timeout_ms=500, max_records=1000)
                if not data:
                    continue
                labels: list[Label] = []
                invalid = 0
                example: tuple[str, int, int] | None = None
                for records in data.values():
                    for record in records:
                        try:
                            labels.append(parse_label(record.value))
                        except InvalidRecord as exc:
                            invalid += 1
                            example = example or (exc.reason, record.partition, record.offset)
                if example is not None:  # one line per batch, not per record
                    self.invalid += invalid
                    self._log.warning("labels_invalid", count=invalid, reason=example[0],
                                      partition=example[1], offset=example[2])
                while True:
                    try:
                        await self._apply(labels)
                        break
                    except errors as exc:
                        self._log.warning("labels_retry", error=repr(exc), labels=len(labels))
                        await asyncio.sleep(retry_s)
                offsets = {tp: records[-1].offset + 1 for tp, records in data.items() if records}
                try:
                    await consumer.commit(offsets)
                except KafkaError as exc:
                    self._log.warning("labels_commit_failed", error=repr(exc))
        finally:
            await asyncio.shield(consumer.stop())

    async def _apply(self, labels: list[Label]) -> None:
        if not labels:
            return
        store = self._features.store
        assert store is not None
        await store.apply_labels(labels)
        known = await self._outcomes.lookup([label.transaction_id for label in labels])
        counts: dict[tuple[str, str], int] = {}
        unmatched = 0
        for label, entry in zip(labels, known, strict=True):
            if entry is None:
                unmatched += 1
                continue
            for variant, predicted in entry.items():
                key = (variant, outcome(predicted, label.is_fraud))
                counts[key] = counts.get(key, 0) + 1
        for (variant, result), count in counts.items():
            self._metrics.label_outcomes.labels(variant, result).inc(count)
        if unmatched:
            self._metrics.labels_unmatched.inc(unmatched)
        self.applied += len(labels)
