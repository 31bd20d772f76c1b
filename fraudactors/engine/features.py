"""The feature-store actor: the online store plus its health, shared by every feature worker.

While Redis answers, workers get the full online features (one round trip per batch). A failing
call is retried until Redis has failed for ``retry_interval_ms`` (a slow reply under load is not an
outage); then it is down and the policy decides: ``degrade`` scores from the transaction alone and marks the
decision degraded (no Redis call per batch while it is down, so latency stays flat); ``hold``
waits and retries, so the mailbox fills and the ingestor pauses the partition. In both cases a
probe pings Redis every ``retry_interval_ms`` and normal mode comes back by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import FeatureStoreUnavailable
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

if TYPE_CHECKING:
    from fraudactors.features.definition import MerchantState
    from fraudactors.features.schema import Transaction
    from fraudactors.features.store import OnlineFeatureStore

# Errors that mean "Redis is not there right now" even if the store did not wrap them.
_UNAVAILABLE: tuple[type[BaseException], ...] = (FeatureStoreUnavailable, ConnectionError, OSError, TimeoutError)
_RETRY_PAUSE_S = 0.02


class FeatureStoreActor:
    def __init__(self, settings: Settings, metrics: EngineMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.store: OnlineFeatureStore | None = None
        self._reader: Any = None  # a small read-only client for POST /predict
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._hold = settings.redis.on_unavailable == "hold"
        self._retry_s = settings.redis.retry_interval_ms / 1000.0
        self._failing_since: float | None = None  # first failure of the current run of failures
        self._log = get_logger(actor="feature_store")
        metrics.feature_store_up.set(0)

    @property
    def up(self) -> bool:
        return self._up.is_set()

    @property
    def holding(self) -> bool:
        """True while the hold policy keeps partitions waiting for Redis."""
        return self._hold and not self._up.is_set()

    def _mark_up(self) -> None:
        self._failing_since = None
        if not self._up.is_set():
            self._log.info("feature_store_up")
        self._up.set()
        self._down.clear()
        self._metrics.feature_store_up.set(1)

    def _mark_down(self, error: BaseException) -> None:
        if self._up.is_set():
            self._log.warning("feature_store_down", error=repr(error), policy=self._settings.redis.on_unavailable)
        self._up.clear()
        self._down.set()
        self._metrics.feature_store_up.set(0)

    async def run(self, task_status: Any) -> None:
        """Supervised child: open the store; ready even if Redis is down (the probe brings it back)."""
        from fraudactors.features.store import OnlineFeatureStore

        store = OnlineFeatureStore(self._settings)
        try:
            await store.open()
            if await self._ping(store):
                self._mark_up()
            else:
                self._mark_down(FeatureStoreUnavailable("ping failed"))
        except _UNAVAILABLE as exc:
            self._mark_down(exc)
        self.store = store
        import redis.asyncio as aioredis

        timeout = max(self._settings.redis.socket_timeout_ms / 1000.0, 0.5)
        self._reader = aioredis.Redis.from_url(self._settings.redis.url, socket_timeout=timeout,
                                               socket_connect_timeout=timeout)
        task_status.started()
        try:
            while True:
                await self._down.wait()
                await asyncio.sleep(self._retry_s)
                if await self._ping(store):
                    self._mark_up()
        finally:
            self._up.clear()
            self._metrics.feature_store_up.set(0)
            reader, self._reader = self._reader, None
            await asyncio.shield(store.close())
            if reader is not None:
                await asyncio.shield(reader.aclose())

    async def _ping(self, store: OnlineFeatureStore) -> bool:
        try:
            return bool(await store.ping())
        except _UNAVAILABLE:
            return False

    def compute_degraded(self, txns: Sequence[Transaction]) -> np.ndarray:
        assert self.store is not None
        return self.store.compute_degraded(txns)

    async def compute(self, txns: Sequence[Transaction], partition: int,
                      offsets: Sequence[int]) -> tuple[np.ndarray, bool]:
        """Features for a batch and whether they are degraded. Other errors propagate (bad input)."""
        store = self.store
        assert store is not None, "feature store actor not started"
        t0 = time.perf_counter()
        while True:
            if self._up.is_set():
                try:
                    X = await store.compute(txns, partition, offsets)
                except _UNAVAILABLE as exc:
                    # One slow reply (a busy event loop, a GC pause in Redis) is not an outage:
                    # retry until Redis has failed for retry_interval_ms, then call it down.
                    # A retried batch is safe: the store skips (partition, offset) already applied.
                    now = time.monotonic()
                    if self._failing_since is None:
                        self._failing_since = now
                    if now - self._failing_since < self._retry_s:
                        await asyncio.sleep(_RETRY_PAUSE_S)
                        continue
                    self._mark_down(exc)
                else:
                    self._failing_since = None
                    self._metrics.stage_latency.labels("features").observe(time.perf_counter() - t0)
                    return X, False
            if not self._hold:
                return store.compute_degraded(txns), True
            await self._up.wait()

    async def peek(self, txns: Sequence[Transaction]) -> tuple[np.ndarray, bool]:
        """Features from the current online state WITHOUT updating it (for POST /predict).

        The same definition as the stream path (``definition.features_of`` on the stored user
        state and the merchant buckets, read with the store's documented key layout); degraded
        (transaction-only) while Redis is unreachable.
        """
        from fraudactors.features.definition import features_of

        store = self.store
        reader = self._reader
        assert store is not None, "feature store actor not started"
        if not self._up.is_set() or reader is None:
            return store.compute_degraded(txns), True
        rows = []
        try:
            for txn in txns:
                state = await store.user_state(txn.user_id)
                async with reader.pipeline(transaction=False) as pipe:
                    pipe.hgetall(store.merchant_counts_key(txn.merchant_id))
                    pipe.hgetall(store.merchant_frauds_key(txn.merchant_id))
                    counts, frauds = await pipe.execute()
                rows.append(features_of(state, _merchant_state(counts, frauds), txn))
        except (*_UNAVAILABLE, *_redis_errors()) as exc:
            self._mark_down(exc)
            return store.compute_degraded(txns), True
        return np.array(rows, dtype=np.float32), False


def _merchant_state(counts: dict[bytes, bytes], frauds: dict[bytes, bytes]) -> MerchantState:
    """A merchant's buckets from its two hashes (fields ``h<hour>`` / ``d<day>`` -> count)."""
    from fraudactors.features.definition import MerchantState

    m = MerchantState()
    for hours, days, data in ((m.tx_hours, m.tx_days, counts), (m.fraud_hours, m.fraud_days, frauds)):
        for field, value in data.items():
            try:
                bucket, n = int(field[1:]), int(value)
            except ValueError:
                continue
            if field[:1] == b"h":
                hours[bucket] = n
            elif field[:1] == b"d":
                days[bucket] = n
    return m


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError,)
