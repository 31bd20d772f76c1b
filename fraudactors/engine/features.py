"""The feature-store actor: the online store plus its health, shared by every feature worker.

While Redis answers, workers get the full online features (one round trip per batch). A call
that timed out is followed by one PING with the same timeout: if Redis answers (a busy event
loop or a busy Redis: load, not an outage) the batch is retried, else Redis is down -- so a hung
Redis is detected within twice ``socket_timeout_ms``. A refused or broken connection is retried
for at most ``socket_timeout_ms``. Then the policy decides: ``degrade`` scores from the
transaction alone and marks the decision degraded (no Redis call per batch while it is down, so
latency stays flat); ``hold`` waits and retries, so the mailbox fills and the ingestor pauses the
partition. In both cases a probe pings Redis every ``retry_interval_ms`` and normal mode comes
back by itself. Transactions decided in degraded mode are kept (up to ``redis.backlog_max``) and
applied to the state, in offset order, before anything newer once Redis is back.

Redis refusing a request (:class:`FeatureStoreRejected`: out of memory, a key of the wrong type,
a script error) is not an outage: the store stays up, the requests of the coalesced call are
retried one by one so only the one at fault is affected, and that one is scored in degraded mode
without entering the state (one ``feature_store_rejected`` log line per kind and minute, the
``fraudactors_feature_store_errors_total{kind}`` and ``fraudactors_state_skipped_total`` metrics,
and an alert).

Ownership: the ingestor claims a partition on assignment (a new fencing epoch, see
``features.store``) and releases it on revoke; a claim that fails while Redis is down is made
before the partition's next write.

Batches from all partitions are coalesced: workers ``ask`` the actor through its mailbox, and the
actor serves everything queued (from any partition) with ONE store call -- two Redis round trips
for the lot. While one call is in flight the next requests queue up, so under load the batches
grow by themselves (each user lives in one partition, and a worker has at most one batch in
flight, so mixing partitions keeps every user's records in order). The callers get their features
once the read and the transition are done, and score them while the actor makes the call's
state write; the actor serves the next call only after it (see :meth:`FeatureStoreActor._serve`).

POST /predict reads (:meth:`FeatureStoreActor.peek`) go over a client of their own, of
``http.max_store_reads`` connections, never the stream path's: a flood of requests cannot take the
connections every card payment needs. As many reads as that pool holds run at once; the others
wait for a slot up to ``http.store_read_wait_ms`` and are then refused as busy (503), not scored
degraded: Redis is healthy, the engine is at capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fraudactors.actors import Mailbox, Request, ask
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import BackpressureTimeout, FeatureStoreRejected, FeatureStoreUnavailable
from fraudactors.logging import Every, get_logger
from fraudactors.settings import Settings

if TYPE_CHECKING:
    from fraudactors.features.schema import Transaction
    from fraudactors.features.store import OnlineFeatureStore

# Errors that mean "Redis is not there right now" even if the store did not wrap them.
_UNAVAILABLE: tuple[type[BaseException], ...] = (FeatureStoreUnavailable, ConnectionError, OSError, TimeoutError)
_REFUSED: tuple[type[BaseException], ...] = (FeatureStoreRejected,)
_RETRY_PAUSE_S = 0.02
_ALIVE_CACHE_S = 0.1
_REJECTED_LOG_EVERY_S = 60.0
# Degraded-mode transactions applied per store call when Redis is back.
_BACKLOG_CHUNK = 2000
# Requests served by one store call at most (one per partition is the usual upper bound).
_COALESCE_MAX = 64

# (transactions, partition of each, offset of each) -> (features, degraded, written)
_Batch = tuple["Sequence[Transaction]", list[int], "Sequence[int]"]
# What a batch's features become if its state write fails: recomputed, possibly degraded.
Replacement = tuple[np.ndarray, bool]
# A batch's state write: done with None once it landed, or with the features the batch got instead.
Written = asyncio.Future[Replacement | None]
_FeatureRequest = Request[_Batch, tuple[np.ndarray, bool, Written | None]]


def _settle(written: list[Written], result: Replacement | None = None, error: BaseException | None = None) -> None:
    """Resolve the futures still pending (a caller that gave up may have cancelled its own)."""
    for fut in written:
        if fut.done():
            continue
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
            fut.exception()  # retrieved: a caller that is gone must not make it an "unretrieved" warning


def _is_timeout(exc: BaseException) -> bool:
    """A reply that came too late, as opposed to a refused or broken connection."""
    from redis.exceptions import TimeoutError as RedisTimeout

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError | RedisTimeout):
            return True
        seen = seen.__cause__
    return False


def _raise_if_cancelling() -> None:
    """Raise the CancelledError of a stop that was asked for but lost: redis-py can return the
    reply of a call whose task was cancelled meanwhile, and the actor would then wait for its next
    request, or its next outage, instead of stopping."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class FeatureStoreActor:
    def __init__(self, settings: Settings, metrics: EngineMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.store: OnlineFeatureStore | None = None
        # POST /predict's reads: their own pool, as many at once as it holds (see the module doc)
        self._peeker: OnlineFeatureStore | None = None
        self._reads = asyncio.Semaphore(settings.http.max_store_reads)
        self._read_wait_s = settings.http.store_read_wait_ms / 1000.0
        self._reader: Any = None  # a second client: tells a slow Redis from a hung or gone one
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._hold = settings.redis.on_unavailable == "hold"
        self._retry_s = settings.redis.retry_interval_ms / 1000.0
        self._timeout_s = settings.redis.socket_timeout_ms / 1000.0
        self._failing_since: float | None = None  # first failure of the current run of failures
        self._alive_probe: asyncio.Future[bool] | None = None
        self._alive_at = 0.0
        self._log = get_logger(actor="feature_store")
        # ownership: partitions assigned here whose claim is still to be made (Redis was down)
        self._owned: set[int] = set()
        self._unclaimed: set[int] = set()
        # degraded-mode decisions to apply to the state once Redis is back, in arrival order
        self._backlog: deque[tuple[Transaction, int, int]] = deque()
        self._backlog_max = settings.redis.backlog_max
        self._rejected_logged = Every(_REJECTED_LOG_EVERY_S)
        self._synced: dict[str, int] = {}
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
        peeker = OnlineFeatureStore(self._settings, max_connections=self._settings.http.max_store_reads)
        reader: Any = None
        try:  # everything opened here is closed in the finally, a stop during start-up included
            with contextlib.suppress(*_UNAVAILABLE):
                await peeker.open()  # usable anyway: it connects on its first read
            self._peeker = peeker  # before the store can be marked up: /predict reads through it
            try:
                await store.open()
                if await self._ping(store):
                    self._mark_up()
                else:
                    self._mark_down(FeatureStoreUnavailable("ping failed"))
            except _UNAVAILABLE as exc:
                self._mark_down(exc)
            self.store = store
            from fraudactors.features.redis_client import make_client

            # A second client for the PING that tells a slow Redis from a hung or gone one.
            reader = self._reader = make_client(self._settings, self._timeout_s)
            if self.mailbox.failed:  # a restart after a crash: the old mailbox failed its callers
                self.mailbox = Mailbox(self.mailbox.maxsize, self.mailbox.name)
            task_status.started()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._serve(store))
                tasks.create_task(self._probe(store))
        finally:
            self.mailbox.fail(FeatureStoreUnavailable("feature store actor stopped"))
            self._up.clear()
            self._metrics.feature_store_up.set(0)
            self._reader = None
            self._peeker = None  # /predict answers from transaction-only features meanwhile
            await asyncio.shield(store.close())
            await asyncio.shield(peeker.close())
            if reader is not None:
                await asyncio.shield(reader.aclose())

    async def _probe(self, store: OnlineFeatureStore) -> None:
        while True:
            await self._down.wait()
            await asyncio.sleep(self._retry_s)
            if await self._ping(store):
                self._mark_up()

    async def _serve(self, store: OnlineFeatureStore) -> None:
        """Everything queued, from every partition, in one store call; results split back.

        The callers get their features as soon as they are computed, with a future for the
        state write, which is made meanwhile (so they score while it is written). The next call
        waits for it: each batch's state write lands before anything newer is read. A write that
        fails is handled as a failed call (retried, degraded or refused, as below) and the
        future carries the features the batch got instead.
        """
        loop = asyncio.get_running_loop()
        while True:
            _raise_if_cancelling()  # a stop that a store call swallowed (see the function)
            requests = [r for r in await self.mailbox.get_batch(_COALESCE_MAX, 0.0) if not r.abandoned]
            if not requests:
                continue
            try:
                results, write = await self._serve_requests(store, requests, stage=True)
            except Exception as exc:  # bad input or a bug: each caller gets it, the actor lives on
                for req in requests:
                    req.reject(exc)
                continue
            finally:
                self._sync_metrics(store)
            if write is None:
                for req, (X, degraded) in zip(requests, results, strict=True):
                    req.resolve((X, degraded, None))
                continue
            written: list[Written] = [loop.create_future() for _ in requests]
            for req, (X, degraded), fut in zip(requests, results, written, strict=True):
                req.resolve((X, degraded, fut))
            try:
                await self._write_staged(store, requests, write, written)
            finally:
                self._sync_metrics(store)
                # cancelled (the actor stops): the callers must not wait
                _settle(written, error=FeatureStoreUnavailable("feature store actor stopped"))

    async def _write_staged(self, store: OnlineFeatureStore, requests: list[_FeatureRequest],
                            write: Callable[[], Awaitable[None]],
                            written: list[Written]) -> None:
        t0 = time.perf_counter()
        try:
            await write()
        except Exception as exc:
            try:
                replaced, _ = await self._serve_requests(store, requests, stage=False, failed=exc)
            except Exception as again:  # bad input or a bug: each caller's batch fails
                _settle(written, error=again)
                return
            for fut, result in zip(written, replaced, strict=True):
                _settle([fut], result)
            return
        self._failing_since = None
        self._metrics.stage_latency.labels("state_write").observe(time.perf_counter() - t0)
        _settle(written)

    async def _serve_requests(self, store: OnlineFeatureStore, requests: list[_FeatureRequest], *,
                              stage: bool, failed: BaseException | None = None
                              ) -> tuple[list[Replacement], Callable[[], Awaitable[None]] | None]:
        """One store call for all; if Redis refuses it, one call per request, so a request Redis
        refuses (a bad key, say) is scored degraded alone and the others are not.

        With ``stage`` the state write of a call that went through is returned, not made (the
        per-request calls after a refusal make theirs). ``failed``: the first attempt already
        failed with this error (a staged write), handled as if this call had raised it.
        """
        txns: list[Transaction] = []
        partitions: list[int] = []
        offsets: list[int] = []
        for req in requests:
            batch_txns, batch_partitions, batch_offsets = req.payload
            txns.extend(batch_txns)
            partitions.extend(batch_partitions)
            offsets.extend(batch_offsets)
        try:
            X, degraded, write = await self._compute_merged(store, txns, partitions, offsets,
                                                            stage=stage, failed=failed)
        except FeatureStoreRejected as exc:
            if len(requests) == 1:
                return [self._refused(store, txns, exc)], None
            results: list[Replacement] = []
            for req in requests:
                batch_txns, batch_partitions, batch_offsets = req.payload
                try:
                    one_X, one_degraded, _ = await self._compute_merged(
                        store, batch_txns, batch_partitions, batch_offsets, stage=False)
                    results.append((one_X, one_degraded))
                except FeatureStoreRejected as one:
                    results.append(self._refused(store, batch_txns, one))
            return results, None
        if failed is None:
            self._metrics.feature_batch_size.observe(len(txns))
        out: list[Replacement] = []
        start = 0
        for req in requests:
            end = start + len(req.payload[0])
            out.append((X[start:end], degraded))
            start = end
        return out, write

    def _refused(self, store: OnlineFeatureStore, txns: Sequence[Transaction],
                 exc: FeatureStoreRejected) -> tuple[np.ndarray, bool]:
        """Redis refused this batch: degraded features, not applied to the state, said once a minute."""
        if self._rejected_logged.due(exc.kind):
            self._log.error("feature_store_rejected", kind=exc.kind, error=str(exc), records=len(txns))
        self._metrics.feature_store_errors.labels(exc.kind).inc()
        self._metrics.state_skipped.labels(exc.kind).inc(len(txns))
        return store.compute_degraded(txns), True

    def _sync_metrics(self, store: OnlineFeatureStore) -> None:
        """Carry the store's own counters over to the engine's metrics."""
        m = self._metrics
        for name, counter in (("stale", m.stale_writes), ("late", m.late_records),
                              ("exact", m.replays.labels("true")), ("inexact", m.replays.labels("false")),
                              ("user", m.unreadable_state.labels("user")),
                              ("merchant_counts", m.unreadable_state.labels("merchant_counts"))):
            value = {"stale": store.stale_refused_total, "late": store.late_total,
                     "exact": store.replays_total - store.replays_inexact_total,
                     "inexact": store.replays_inexact_total, "user": store.corrupt_states_total,
                     "merchant_counts": store.corrupt_counts_total}[name]
            if value > self._synced.get(name, 0):
                counter.inc(value - self._synced.get(name, 0))
                self._synced[name] = value

    # -- ownership ---------------------------------------------------------------------------

    async def claim(self, partition: int) -> None:
        """The partition is ours (assigned): a new fencing epoch now, or before its next write."""
        self._owned.add(partition)
        self._unclaimed.add(partition)
        store = self.store
        if store is not None and self._up.is_set():
            errors: tuple[type[BaseException], ...] = (*_UNAVAILABLE, *_redis_errors(), FeatureStoreRejected)
            try:
                await self._claim(store, partition)
            except errors as exc:
                self._log.warning("partition_claim_deferred", partition=partition, error=repr(exc))

    async def _claim(self, store: OnlineFeatureStore, partition: int) -> None:
        epoch = await store.claim(partition)
        if partition not in self._owned:  # revoked while the claim was made: not ours to write
            store.release(partition)
            return
        self._unclaimed.discard(partition)
        self._log.info("partition_claimed", partition=partition, epoch=epoch)

    async def _claim_pending(self, store: OnlineFeatureStore, batch: Sequence[int]) -> None:
        """Claim the partitions still to claim that this call writes: the batch's, and the
        backlog's (a write without its partition's epoch is refused as a stale owner's). A
        backlog partition whose claim Redis refuses loses its waiting records (counted), not
        every other partition's batch; a batch partition's refusal fails the call as before."""
        ours = set(batch)
        wanted = ours | {p for _, p, _ in self._backlog}
        for p in sorted(self._unclaimed & wanted):
            if p not in self._unclaimed:  # released meanwhile
                continue
            try:
                await self._claim(store, p)
            except FeatureStoreRejected as exc:
                if p in ours:
                    raise
                self._log.error("partition_claim_refused", partition=p, kind=exc.kind, error=str(exc))
                self._drop_backlog(p, exc.kind)

    def release(self, partition: int) -> None:
        """The partition is no longer ours (revoked): its backlog is the new owner's loss, counted."""
        self._owned.discard(partition)
        self._unclaimed.discard(partition)
        if self.store is not None:
            self.store.release(partition)
        self._drop_backlog(partition, "revoked")

    def _drop_backlog(self, partition: int, reason: str) -> None:
        """The partition's degraded-mode records will not enter the state: dropped, counted."""
        if any(p == partition for _, p, _ in self._backlog):
            kept = deque(item for item in self._backlog if item[1] != partition)
            self._metrics.state_skipped.labels(reason).inc(len(self._backlog) - len(kept))
            self._backlog = kept
            self._metrics.state_backlog.set(len(kept))

    def note_committed(self, partition: int, offset: int) -> None:
        if self.store is not None:
            self.store.note_committed(partition, offset)

    def _remember_degraded(self, txns: Sequence[Transaction], partitions: Sequence[int],
                           offsets: Sequence[int]) -> None:
        backlog = self._backlog
        room = self._backlog_max - len(backlog)
        items = [(t, p, o) for t, p, o in zip(txns, partitions, offsets, strict=True) if p in self._owned]
        if len(items) > room:
            self._metrics.state_skipped.labels("backlog_full").inc(len(items) - max(room, 0))
            items = items[:max(room, 0)]
        backlog.extend(items)
        self._metrics.state_backlog.set(len(backlog))

    async def _apply_backlog(self, store: OnlineFeatureStore) -> None:
        """Degraded-mode transactions enter the state before anything newer (raises as compute)."""
        backlog = self._backlog
        while backlog:
            chunk = [backlog[i] for i in range(min(_BACKLOG_CHUNK, len(backlog)))]
            try:
                await store.compute([t for t, _, _ in chunk], [p for _, p, _ in chunk],
                                    [o for _, _, o in chunk], log=False)
            except FeatureStoreRejected as exc:
                self._metrics.state_skipped.labels(exc.kind).inc(len(chunk))
                self._log.error("state_backlog_rejected", kind=exc.kind, error=str(exc), records=len(chunk))
            else:
                self._metrics.state_backlog_applied.inc(len(chunk))
            for _ in chunk:
                backlog.popleft()
            self._metrics.state_backlog.set(len(backlog))
        self._log.info("state_backlog_applied")

    async def _ping(self, store: OnlineFeatureStore) -> bool:
        try:
            answered = bool(await store.ping())
        except _UNAVAILABLE:
            answered = False
        _raise_if_cancelling()
        return answered

    def compute_degraded(self, txns: Sequence[Transaction]) -> np.ndarray:
        assert self.store is not None
        return self.store.compute_degraded(txns)

    async def compute(self, txns: Sequence[Transaction], partition: int,
                      offsets: Sequence[int]) -> Replacement:
        """Features for a batch and whether they are degraded, once its state is written. Other
        errors propagate (bad input).

        Coalesced with the other partitions' batches into one store call (see the module doc).
        """
        X, degraded, written = await self.compute_staged(txns, partition, offsets)
        replaced = await asyncio.shield(written) if written is not None else None
        return replaced if replaced is not None else (X, degraded)

    async def compute_staged(self, txns: Sequence[Transaction], partition: int, offsets: Sequence[int]
                             ) -> tuple[np.ndarray, bool, Written | None]:
        """:meth:`compute` without waiting for the state write: the features, whether they are
        degraded, and the write's future (``None``: nothing to write).

        A decision may be handed on only once that future is done. If it holds features, the
        write failed and the batch got these instead: they are what it must be scored on.
        """
        assert self.store is not None, "feature store actor not started"
        if not txns:
            return self.store.compute_degraded(txns), False, None
        return await ask(self.mailbox, (txns, [partition] * len(txns), offsets))

    async def _compute_merged(self, store: OnlineFeatureStore, txns: Sequence[Transaction],
                              partition: Sequence[int], offsets: Sequence[int], *, stage: bool,
                              failed: BaseException | None = None
                              ) -> tuple[np.ndarray, bool, Callable[[], Awaitable[None]] | None]:
        t0 = time.perf_counter()
        while True:
            if self._up.is_set():
                try:
                    if failed is not None:
                        first, failed = failed, None
                        raise first
                    await self._claim_pending(store, partition)
                    if self._backlog:
                        await self._apply_backlog(store)
                    X, write = await store.stage(txns, partition, offsets)
                    if write is not None and not stage:
                        await write()
                        write = None
                except _UNAVAILABLE as exc:
                    # A retried batch is safe: the store skips (partition, offset) already applied.
                    if _is_timeout(exc):
                        if await self._alive():
                            # Redis answers a PING, just not our batch within socket_timeout_ms (a
                            # busy event loop or a busy Redis): that is load, not an outage -- retry.
                            self._metrics.feature_store_slow.inc()
                            await asyncio.sleep(_RETRY_PAUSE_S)
                            continue
                        self._mark_down(exc)  # hung: no answer to the batch nor to a PING
                    else:
                        # Refused or broken connections: retry for at most socket_timeout_ms.
                        now = time.monotonic()
                        if self._failing_since is None:
                            self._failing_since = now
                        if now - self._failing_since < self._timeout_s:
                            await asyncio.sleep(_RETRY_PAUSE_S)
                            continue
                        self._mark_down(exc)
                else:
                    if write is None:
                        self._failing_since = None
                    self._metrics.stage_latency.labels("features").observe(time.perf_counter() - t0)
                    return X, False, write
            failed = None  # handled: down already (or now); a new try after Redis is back
            if not self._hold:
                self._remember_degraded(txns, partition, offsets)
                return store.compute_degraded(txns), True, None
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
        from fraudactors.features.redis_client import ping

        try:
            return await ping(reader)  # every master, on a cluster: one hung master is an outage
        except (*_UNAVAILABLE, *_redis_errors()):
            return False

    async def peek(self, txns: Sequence[Transaction]) -> tuple[np.ndarray, bool]:
        """Features from the current online state WITHOUT updating it (for POST /predict).

        The same definition and the same state as the stream path (one read, no write), over
        /predict's own connections; transaction-only (degraded) while Redis is unreachable. A
        failed read degrades this request only: the stream path decides about the store's health.
        Raises :class:`BackpressureTimeout` (retriable) when no read slot came free within
        ``http.store_read_wait_ms``.
        """
        if self._up.is_set():
            try:
                async with asyncio.timeout(self._read_wait_s):
                    await self._reads.acquire()
            except TimeoutError:
                self._metrics.predict_store_busy.inc()
                raise BackpressureTimeout(
                    f"feature store busy: all {self._settings.http.max_store_reads} /predict reads in use "
                    f"for {self._settings.http.store_read_wait_ms} ms") from None
            try:
                store = self._peeker  # taken after the wait: the actor may have restarted meanwhile
                if store is not None and self._up.is_set():  # Redis may have gone down meanwhile
                    return await store.peek(txns), False
            except (*_UNAVAILABLE, *_redis_errors(), *_REFUSED) as exc:  # this request degraded only
                self._log.warning("predict_features_degraded", error=repr(exc))
            finally:
                self._reads.release()
        return _degraded(txns), True


def _degraded(txns: Sequence[Transaction]) -> np.ndarray:
    from fraudactors.features.store import OnlineFeatureStore

    return OnlineFeatureStore.compute_degraded(txns)


def _redis_errors() -> tuple[type[BaseException], ...]:
    from fraudactors.features.redis_client import CLIENT_ERRORS

    return CLIENT_ERRORS
