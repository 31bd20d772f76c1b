"""The feature-store actor: the online store plus its health, shared by every feature worker.

While Redis answers, workers get the full online features (one round trip per batch). A call
that timed out while Redis still answers a PING (a busy event loop or a busy Redis: load, not an
outage) is retried; any other failure is retried until Redis has failed for ``retry_interval_ms``.
Then it is down and the policy decides: ``degrade`` scores from the transaction alone and marks the
decision degraded (no Redis call per batch while it is down, so latency stays flat); ``hold``
waits and retries, so the mailbox fills and the ingestor pauses the partition. In both cases a
probe pings Redis every ``retry_interval_ms`` and normal mode comes back by itself.

Batches from all partitions are coalesced: workers ``ask`` the actor through its mailbox, and the
actor serves everything queued (from any partition) with ONE store call -- two Redis round trips
for the lot. While one call is in flight the next requests queue up, so under load the batches
grow by themselves (each user lives in one partition, and a worker has at most one batch in
flight, so mixing partitions keeps every user's records in order).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fraudactors.actors import Mailbox, Request, ask
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import FeatureStoreUnavailable
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

if TYPE_CHECKING:
    from fraudactors.features.schema import Transaction
    from fraudactors.features.store import OnlineFeatureStore

# Errors that mean "Redis is not there right now" even if the store did not wrap them.
_UNAVAILABLE: tuple[type[BaseException], ...] = (FeatureStoreUnavailable, ConnectionError, OSError, TimeoutError)
_RETRY_PAUSE_S = 0.02
_ALIVE_CACHE_S = 0.1
_LENIENT_TIMEOUT_S = 2.0
# Requests served by one store call at most (one per partition is the usual upper bound).
_COALESCE_MAX = 64

# (transactions, partition of each, offset of each) -> (features, degraded)
_Batch = tuple["Sequence[Transaction]", list[int], "Sequence[int]"]
_FeatureRequest = Request[_Batch, tuple[np.ndarray, bool]]


def _is_timeout(exc: BaseException) -> bool:
    """A reply that came too late, as opposed to a refused or broken connection."""
    from redis.exceptions import TimeoutError as RedisTimeout

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError | RedisTimeout):
            return True
        seen = seen.__cause__
    return False


class FeatureStoreActor:
    def __init__(self, settings: Settings, metrics: EngineMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.store: OnlineFeatureStore | None = None
        self._reader: Any = None  # a lenient client: tells a slow Redis from an unreachable one
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._hold = settings.redis.on_unavailable == "hold"
        self._retry_s = settings.redis.retry_interval_ms / 1000.0
        self._failing_since: float | None = None  # first failure of the current run of failures
        self._alive_probe: asyncio.Future[bool] | None = None
        self._alive_at = 0.0
        self._log = get_logger(actor="feature_store")
        self.mailbox: Mailbox[_FeatureRequest] = Mailbox(_COALESCE_MAX * 2, "feature_store")
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

        # A second, lenient client for the liveness probe that tells a slow Redis from an
        # unreachable one.
        timeout = max(self._settings.redis.socket_timeout_ms / 1000.0, _LENIENT_TIMEOUT_S)
        self._reader = aioredis.Redis.from_url(self._settings.redis.url, socket_timeout=timeout,
                                               socket_connect_timeout=min(timeout, 1.0))
        if self.mailbox.failed:  # a restart after a crash: the old mailbox failed its callers
            self.mailbox = Mailbox(self.mailbox.maxsize, self.mailbox.name)
        task_status.started()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._serve(store))
                tasks.create_task(self._probe(store))
        finally:
            self.mailbox.fail(FeatureStoreUnavailable("feature store actor stopped"))
            self._up.clear()
            self._metrics.feature_store_up.set(0)
            reader, self._reader = self._reader, None
            await asyncio.shield(store.close())
            if reader is not None:
                await asyncio.shield(reader.aclose())

    async def _probe(self, store: OnlineFeatureStore) -> None:
        while True:
            await self._down.wait()
            await asyncio.sleep(self._retry_s)
            if await self._ping(store):
                self._mark_up()

    async def _serve(self, store: OnlineFeatureStore) -> None:
        """Everything queued, from every partition, in one store call; results split back."""
        while True:
            requests = [r for r in await self.mailbox.get_batch(_COALESCE_MAX, 0.0) if not r.abandoned]
            if not requests:
                continue
            txns: list[Transaction] = []
            partitions: list[int] = []
            offsets: list[int] = []
            for req in requests:
                batch_txns, batch_partitions, batch_offsets = req.payload
                txns.extend(batch_txns)
                partitions.extend(batch_partitions)
                offsets.extend(batch_offsets)
            try:
                X, degraded = await self._compute_merged(store, txns, partitions, offsets)
            except Exception as exc:  # bad input or a bug: each caller gets it, the actor lives on
                for req in requests:
                    req.reject(exc)
                continue
            self._metrics.feature_batch_size.observe(len(txns))
            start = 0
            for req in requests:
                end = start + len(req.payload[0])
                req.resolve((X[start:end], degraded))
                start = end

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
        """Features for a batch and whether they are degraded. Other errors propagate (bad input).

        Coalesced with the other partitions' batches into one store call (see the module doc).
        """
        assert self.store is not None, "feature store actor not started"
        if not txns:
            return self.store.compute_degraded(txns), False
        return await ask(self.mailbox, (txns, [partition] * len(txns), offsets))

    async def _compute_merged(self, store: OnlineFeatureStore, txns: Sequence[Transaction],
                              partition: list[int], offsets: Sequence[int]) -> tuple[np.ndarray, bool]:
        t0 = time.perf_counter()
        while True:
            if self._up.is_set():
                try:
                    X = await store.compute(txns, partition, offsets)
                except _UNAVAILABLE as exc:
                    # A retried batch is safe: the store skips (partition, offset) already applied.
                    if _is_timeout(exc) and await self._alive():
                        # Redis answers, just not within socket_timeout_ms (a busy event loop or
                        # a busy Redis): that is load, not an outage -- retry, do not degrade.
                        self._metrics.feature_store_slow.inc()
                        await asyncio.sleep(_RETRY_PAUSE_S)
                        continue
                    # Errors that are not slowness: retry until Redis has failed for
                    # retry_interval_ms, then call it down.
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

    async def _alive(self) -> bool:
        """Does Redis answer a PING within a lenient timeout? One probe shared by all workers."""
        probe = self._alive_probe
        if probe is None or (probe.done() and time.monotonic() - self._alive_at > _ALIVE_CACHE_S):
            probe = self._alive_probe = asyncio.ensure_future(self._ping_lenient())
            self._alive_at = time.monotonic()
        return await asyncio.shield(probe)

    async def _ping_lenient(self) -> bool:
        reader = self._reader
        if reader is None:
            return False
        try:
            return bool(await reader.ping())
        except (*_UNAVAILABLE, *_redis_errors()):
            return False

    async def peek(self, txns: Sequence[Transaction]) -> tuple[np.ndarray, bool]:
        """Features from the current online state WITHOUT updating it (for POST /predict).

        The same definition and the same store as the stream path (one read, no write);
        transaction-only (degraded) while Redis is unreachable. A failed read degrades this
        request only: the stream path decides about the store's health.
        """
        store = self.store
        assert store is not None, "feature store actor not started"
        if self._up.is_set():
            try:
                return await store.peek(txns), False
            except (*_UNAVAILABLE, *_redis_errors()) as exc:
                self._log.warning("predict_features_degraded", error=repr(exc))
        return store.compute_degraded(txns), True


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError,)
