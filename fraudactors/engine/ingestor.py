"""The ingestor: one consumer-group member on ``transactions``, routing records to feature workers.

- ``getmany`` batches; each record goes to the mailbox of the worker that owns its partition.
- A full mailbox pauses its partition (the rest of the fetched records wait in a small per-partition
  overflow) and the partition resumes once the mailbox is half empty. The poll loop never stops, so
  the member keeps heartbeating and is never evicted for exceeding ``max_poll_interval_ms``.
- Rebalance: on revoke, the revoked partitions' workers finish the batch in hand, the broker
  acknowledges what was handed off, the finished prefix is committed, then the workers stop; on
  assign, a mailbox, an offset tracker and a worker are created per partition.
- Commits every ``commit_interval_ms`` (only acknowledged prefixes), on revoke and on shutdown.
- Watchdog: a poll loop that stops returning, or a partition with records waiting whose finished
  offset does not move for ``watchdog_s``, raises :class:`ConsumerStalled`; the supervisor restarts
  the ingestor (a new consumer), and /readyz says so meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from fraudactors.actors import Mailbox
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.offsets import OffsetTracker
from fraudactors.engine.worker import FeatureWorker, Item, Stages
from fraudactors.errors import ActorError, RestartIntensityExceeded
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

if TYPE_CHECKING:
    pass

_POLL_TIMEOUT_MS = 100


class ConsumerStalled(ActorError):
    """The consumer stopped making progress while records were waiting; restart it."""

    retriable = True


@dataclass(eq=False)
class _Partition:
    tp: TopicPartition
    mailbox: Mailbox[Item]
    tracker: OffsetTracker
    worker: FeatureWorker | None = None
    task: asyncio.Task[None] | None = None
    overflow: list[Item] = field(default_factory=list)
    paused: bool = False
    closing: bool = False  # revoked or shutting down: no more records go in
    first_offset: int | None = None
    fetched_end: int = -1   # next offset after the last record routed to the worker
    position: int = -1      # the consumer's position, refreshed by housekeeping
    progress_mark: tuple[int, int] = (-1, -1)
    progress_at: float = field(default_factory=time.monotonic)
    restarts: int = 0


class _Listener(ConsumerRebalanceListener):
    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._ingestor.revoke(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._ingestor.assign(list(assigned))


class Ingestor:
    """Supervised child owning the group consumer and the per-partition feature workers."""

    def __init__(
        self,
        settings: Settings,
        metrics: EngineMetrics,
        stages: Stages,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._stages = stages
        self._features = stages.features
        self._publisher = stages.publisher
        self._consumer: AIOKafkaConsumer | None = None
        self._parts: dict[int, _Partition] = {}
        self._stopping = False
        self._log = get_logger(actor="ingestor")
        self.last_poll = time.monotonic()
        self.stalls = 0
        self.stalled_reason: str | None = None
        self.running = False
        self.worker_restarts = 0
        self.pauses = 0
        self._restart_times: deque[float] = deque()
        self._fatal: BaseException | None = None

    # ---------------------------------------------------------------- observation
    @property
    def assigned(self) -> list[int]:
        return sorted(self._parts)

    @property
    def paused(self) -> list[int]:
        """Partitions paused right now because their worker's mailbox is full."""
        return sorted(p for p, s in self._parts.items() if s.paused)

    def mailbox_depths(self) -> dict[int, int]:
        return {p: s.mailbox.depth + len(s.overflow) for p, s in self._parts.items()}

    def lag(self) -> dict[int, int]:
        """Records behind, per owned partition: not yet fetched (high watermark - position) plus
        fetched but not finished (routed to the worker, not yet acknowledged by the broker)."""
        consumer = self._consumer
        out: dict[int, int] = {}
        if consumer is None:
            return out
        for p, s in self._parts.items():
            high = consumer.highwater(s.tp)
            if high is None:
                continue
            unfetched = max(0, high - s.position) if s.position >= 0 else 0
            done = s.tracker.done_end
            base = done if done >= 0 else (s.first_offset if s.first_offset is not None else s.fetched_end)
            out[p] = unfetched + max(0, s.fetched_end - base)
        return out

    # ---------------------------------------------------------------- lifecycle
    async def run(self, task_status: Any) -> None:
        from fraudactors.services.kafka import make_consumer

        settings = self._settings
        self._stopping = False
        consumer = make_consumer(settings)
        consumer.subscribe([settings.topics.transactions], listener=_Listener(self))
        await consumer.start()
        self._consumer = consumer
        self.running = True
        self.stalled_reason = None  # a fresh consumer: the stall (if any) is over
        self.last_poll = time.monotonic()
        self._log.info("ingestor_started", group_id=settings.kafka.group_id,
                       topic=settings.topics.transactions)
        task_status.started()
        try:
            async with asyncio.TaskGroup() as tg:
                poll = tg.create_task(self._poll_loop(consumer))
                tg.create_task(self._housekeeping(consumer, poll))
        except* (ConsumerStalled, RestartIntensityExceeded) as group:
            raise group.exceptions[0] from None
        finally:
            self.running = False
            await asyncio.shield(self._shutdown(consumer))

    def stop_fetching(self) -> None:
        """Graceful shutdown, step one: no more fetches; in-flight work carries on."""
        self._stopping = True

    async def _poll_loop(self, consumer: AIOKafkaConsumer) -> None:
        max_records = self._settings.kafka.fetch_max_records
        consumed = self._metrics.records_consumed
        fetch_delay = self._metrics.fetch_delay
        while not self._stopping:
            self._resume_drained(consumer)
            data = await consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS, max_records=max_records)
            now = time.monotonic()
            self.last_poll = now
            if data:
                oldest = min(records[0].timestamp for records in data.values() if records)
                fetch_delay.observe(max(0.0, time.time() - oldest / 1000.0))
            for tp, records in data.items():
                state = self._parts.get(tp.partition)
                if state is None or state.closing or not records:
                    continue  # revoked while fetched: the new owner reads them again
                consumed.labels(str(tp.partition)).inc(len(records))
                self._dispatch(consumer, state, [(r, now) for r in records])

    def _dispatch(self, consumer: AIOKafkaConsumer, state: _Partition, items: list[Item]) -> None:
        if state.first_offset is None:
            state.first_offset = items[0][0].offset
        state.fetched_end = items[-1][0].offset + 1
        if state.overflow:
            state.overflow.extend(items)
            return
        taken = state.mailbox.try_put_many(items)
        if taken < len(items):
            state.overflow = items[taken:]
            if not state.paused:
                consumer.pause(state.tp)
                state.paused = True
                self.pauses += 1
                self._metrics.partition_paused.labels(str(state.tp.partition)).set(1)

    def _resume_drained(self, consumer: AIOKafkaConsumer) -> None:
        for state in self._parts.values():
            if not state.paused or state.closing:
                continue
            mailbox = state.mailbox
            if mailbox.depth > mailbox.maxsize // 2:
                continue
            if state.overflow:
                taken = mailbox.try_put_many(state.overflow)
                del state.overflow[:taken]
            if not state.overflow:
                consumer.resume(state.tp)
                state.paused = False
                self._metrics.partition_paused.labels(str(state.tp.partition)).set(0)

    async def _housekeeping(self, consumer: AIOKafkaConsumer, poll: asyncio.Task[None]) -> None:
        """Periodic commits, gauges and the watchdog."""
        engine = self._settings.engine
        interval = engine.commit_interval_ms / 1000.0
        while not poll.done():
            await asyncio.sleep(interval)
            await self.commit(consumer)
            await self._refresh_positions(consumer)
            self._update_gauges()
            self._watchdog(time.monotonic())

    async def _refresh_positions(self, consumer: AIOKafkaConsumer) -> None:
        # position() is immediate for a partition being fetched; it can wait while an offset is
        # being reset, so the whole refresh is bounded (a stale position only delays the gauges).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                for state in list(self._parts.values()):
                    with contextlib.suppress(KafkaError):
                        state.position = await consumer.position(state.tp)

    def _update_gauges(self) -> None:
        metrics = self._metrics
        for p, lag in self.lag().items():
            metrics.consumer_lag.labels(str(p)).set(lag)
        for p, s in self._parts.items():
            metrics.mailbox_depth.labels(f"features-{p}").set(s.mailbox.depth)

    def _watchdog(self, now: float) -> None:
        if self._fatal is not None:
            raise self._fatal
        limit = self._settings.engine.watchdog_s
        if self._stopping:
            return
        if now - self.last_poll > limit:
            self._stall(f"poll loop made no call for {now - self.last_poll:.1f}s")
        if self._features.holding:
            return  # partitions wait for Redis on purpose (hold policy)
        lag = self.lag()
        for p, s in self._parts.items():
            mark = (s.position, s.tracker.done_end)  # fetching or finishing: either is progress
            if mark != s.progress_mark or lag.get(p, 0) == 0:
                s.progress_mark = mark
                s.progress_at = now
            elif now - s.progress_at > limit:
                self._stall(f"partition {p} made no progress for {now - s.progress_at:.1f}s "
                            f"with {lag.get(p, 0)} records waiting")
            if s.tracker.failed is not None:
                self._stall(f"partition {p}: publishing failed: {s.tracker.failed!r}")

    def _stall(self, reason: str) -> None:
        self.stalls += 1
        self.stalled_reason = reason
        self._log.error("consumer_stalled", reason=reason)
        raise ConsumerStalled(reason)

    # ---------------------------------------------------------------- commits
    async def commit(self, consumer: AIOKafkaConsumer | None = None,
                     partitions: Sequence[int] | None = None) -> None:
        consumer = consumer or self._consumer
        if consumer is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for p in partitions if partitions is not None else list(self._parts):
            state = self._parts.get(p)
            if state is None:
                continue
            offset = state.tracker.to_commit()
            if offset is not None:
                offsets[state.tp] = offset
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            self._log.warning("commit_failed", error=repr(exc), partitions=sorted(tp.partition for tp in offsets))
            return
        self._metrics.commits.inc()
        for tp, offset in offsets.items():
            state = self._parts.get(tp.partition)
            if state is not None:
                state.tracker.mark_committed(offset)
            self._features.note_committed(tp.partition, offset)

    # ---------------------------------------------------------------- rebalance
    async def assign(self, tps: list[TopicPartition]) -> None:
        topic = self._settings.topics.transactions
        size = self._settings.engine.mailbox_size
        for tp in tps:
            if tp.topic != topic or tp.partition in self._parts:
                continue
            # a new fencing epoch before the first write: a former owner still in flight cannot
            # overwrite what this one writes
            await self._features.claim(tp.partition)
            state = _Partition(tp, Mailbox(size, f"features-{tp.partition}"), OffsetTracker(tp.partition))
            self._parts[tp.partition] = state
            self._start_worker(state)
        self._log.info("partitions_assigned", partitions=sorted(tp.partition for tp in tps))

    def _start_worker(self, state: _Partition) -> None:
        worker = FeatureWorker(
            state.tp.partition, state.mailbox, state.tracker, settings=self._settings,
            metrics=self._metrics, stages=self._stages)
        state.worker = worker
        task = asyncio.get_running_loop().create_task(_run_worker(worker), name=f"features-{state.tp.partition}")
        state.task = task
        task.add_done_callback(functools.partial(self._worker_exited, state))

    def _worker_exited(self, state: _Partition, task: asyncio.Task[None]) -> None:
        if (task.cancelled() or state.closing or self._parts.get(state.tp.partition) is not state
                or state.task is not task):
            return
        exc = task.exception()
        if exc is None:
            return
        # A worker crashed (a bug, not a bad record): restart it where its last handed-off batch
        # ended. Records taken but not handed off are fetched again; nothing is skipped.
        self.worker_restarts += 1
        state.restarts += 1
        engine = self._settings.engine
        now = time.monotonic()
        times = self._restart_times
        times.append(now)
        while times and times[0] < now - engine.restart_window_s:
            times.popleft()
        if len(times) > engine.restart_max:
            # Out of budget: fail the ingestor upward (its supervisor decides), do not loop.
            self._fatal = RestartIntensityExceeded(
                f"feature workers crashed {len(times)} times within {engine.restart_window_s}s; "
                f"last: partition {state.tp.partition}: {exc!r}")
            self._log.error("feature_worker_crashed", partition=state.tp.partition, error=repr(exc),
                            restarts=state.restarts, giving_up=True)
            return
        self._metrics.actor_restarts.labels(f"features-{state.tp.partition}").inc()
        self._log.error("feature_worker_crashed", partition=state.tp.partition, error=repr(exc),
                        restarts=state.restarts)
        self._rewind(state)
        self._start_worker(state)

    def _rewind(self, state: _Partition) -> None:
        consumer = self._consumer
        old = state.mailbox
        state.mailbox = Mailbox(old.maxsize, old.name)
        old.close()
        state.overflow.clear()
        position = state.tracker.registered_end
        if position < 0:
            position = state.first_offset if state.first_offset is not None else -1
        if consumer is not None and position >= 0:
            consumer.seek(state.tp, position)
            state.fetched_end = position
        if state.paused and consumer is not None:
            consumer.resume(state.tp)
            state.paused = False
            self._metrics.partition_paused.labels(str(state.tp.partition)).set(0)

    async def revoke(self, tps: list[TopicPartition]) -> None:
        states = [self._parts[tp.partition] for tp in tps if tp.partition in self._parts
                  and self._parts[tp.partition].tp == tp]
        if not states:
            return
        await self._finish(states)
        await self.commit(partitions=[s.tp.partition for s in states])
        for s in states:
            self._forget(s)
            self._features.release(s.tp.partition)
        self._log.info("partitions_revoked", partitions=sorted(s.tp.partition for s in states))

    async def _finish(self, states: list[_Partition]) -> None:
        """Stop the workers after the batch in hand, then wait for the broker's acknowledgements."""
        timeout = self._settings.engine.shutdown_timeout_s / 2
        tasks = []
        for s in states:
            s.closing = True
            s.overflow.clear()
            if s.task is not None and not s.task.done():
                s.task.cancel()
                tasks.append(s.task)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for s in states:
            s.mailbox.close()
        acked = await asyncio.gather(*(s.tracker.wait_acked(timeout) for s in states))
        for s, ok in zip(states, acked, strict=True):
            if not ok:
                self._log.warning("partition_unacknowledged", partition=s.tp.partition,
                                  in_flight=s.tracker.in_flight)

    def _forget(self, state: _Partition) -> None:
        p = state.tp.partition
        if self._parts.get(p) is state:
            del self._parts[p]
        label = str(p)
        for gauge, value in ((self._metrics.consumer_lag, label), (self._metrics.partition_paused, label),
                             (self._metrics.mailbox_depth, f"features-{p}")):
            with contextlib.suppress(KeyError):
                gauge.remove(value)

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        """Stop fetching, finish in-flight batches, commit, leave the group."""
        self._stopping = True
        states = list(self._parts.values())
        try:
            with contextlib.suppress(Exception):
                if states:
                    consumer.pause(*[s.tp for s in states])
            await self._finish(states)
            await self.commit(consumer)
        finally:
            for s in states:
                self._forget(s)
            self._consumer = None
            await consumer.stop()
            self._log.info("ingestor_stopped")


async def _run_worker(worker: FeatureWorker) -> None:
    from fraudactors.actors import IGNORED

    await worker.run(IGNORED)
