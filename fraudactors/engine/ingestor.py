"""The ingestor: one consumer-group member on ``transactions``, routing records to feature workers.

- ``getmany`` batches; each record goes to the mailbox of the worker that owns its partition.
- A full mailbox pauses its partition (see :mod:`fraudactors.engine.partition`). The poll loop never
  stops, so the member keeps heartbeating and is never evicted for exceeding ``max_poll_interval_ms``.
- The feature workers are children of the ingestor's own supervisor (``features``, one-for-one,
  ``engine.restart_max`` within ``engine.restart_window_s``): one per assigned partition, started on
  assign and terminated on revoke. A restart rewinds the partition to the end of the last batch
  handed off. A spent budget fails the supervisor, and with it the ingestor, upward; the root
  restarts the ingestor with a fresh consumer and a fresh worker supervisor.
- Rebalance: on revoke, the revoked partitions' workers finish the batch in hand, the broker
  acknowledges what was handed off, the finished prefix is committed, then they are forgotten.
- Commits every ``commit_interval_ms`` (only acknowledged prefixes), on revoke and on shutdown; each
  within ``engine.commit_timeout_s`` (a commit that times out is retried at the next interval, so
  housekeeping never freezes while the broker does).
- Watchdog: a poll loop that stops returning, or a partition with records waiting whose finished
  offset does not move for ``watchdog_s``, raises :class:`ConsumerStalled`; the supervisor restarts
  the ingestor (a new consumer), and /readyz says so meanwhile. Partitions waiting on purpose (all
  of them for Redis under the hold policy, or while the broker acknowledges nothing; one whose
  worker waits for room in the publish window or whose oldest batch is unacknowledged, for the
  broker) are not stalled.
- A partition with more than ``engine.max_unacknowledged`` records handed off but not committable
  is paused until half are (:meth:`Partition.hold_if_unacknowledged`); the age of its oldest
  unacknowledged batch is ``fraudactors_unacknowledged_age_seconds``.
- A fetched batch that does not decode (bad CRC, unknown codec: :mod:`fraudactors.engine.unreadable`)
  stops its partition at that offset, logged once as ``partition_unreadable`` and shown by the
  ``fraudactors_partition_unreadable`` gauge; the other partitions carry on. It is not a stall (a
  failed publish of the records before it is). A worker restart's rewind re-reads the partition up
  to the batch, flow-controlled as any other, and stops there again; the gauge stays at 1 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from fraudactors.actors import (
    ChildSpec,
    Mailbox,
    Restart,
    Strategy,
    Supervisor,
    TaskStatus,
    last_step,
    start_task,
)
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.offsets import OffsetTracker
from fraudactors.engine.partition import Partition
from fraudactors.engine.unreadable import Stopped, Unreadable, fetch
from fraudactors.engine.worker import FeatureWorker, Stages
from fraudactors.errors import ActorError, RestartIntensityExceeded
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

_POLL_TIMEOUT_MS = 100


class ConsumerStalled(ActorError):
    """The consumer stopped making progress while records were waiting; restart it."""

    retriable = True


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
        self._parts: dict[int, Partition] = {}
        self._stopping = False
        self._log = get_logger(actor="ingestor")
        self._stopped = Stopped(metrics.partition_unreadable, self._log)  # partitions at a batch that does not decode
        self.last_poll = time.monotonic()
        self.stalls = 0
        self.stalled_reason: str | None = None
        self.running = False
        self.worker_restarts = 0
        self.pauses = 0
        self.holds = 0  # partitions paused for too many unacknowledged records
        self.housekeeping_passes = 0
        self._workers: Supervisor | None = None  # the feature workers' supervisor, one per run
        self._committing: dict[int, int] = {}  # the offsets of the commit awaiting the broker

    # ---------------------------------------------------------------- observation
    @property
    def assigned(self) -> list[int]:
        return sorted(self._parts)

    @property
    def paused(self) -> list[int]:
        """Partitions paused right now because their worker's mailbox is full."""
        return sorted(p for p, s in self._parts.items() if s.paused)

    @property
    def uncommitted(self) -> dict[int, int]:
        """Per partition, the offset up to which records are finished (decided and acknowledged)
        but not yet in any commit sent to the broker: the next commit carries it."""
        out: dict[int, int] = {}
        for p, s in self._parts.items():
            offset = s.tracker.to_commit()
            if offset is not None and offset > self._committing.get(p, -1):
                out[p] = offset
        return out

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
        engine = settings.engine
        self._stopping = False
        consumer = make_consumer(settings)
        workers = self._workers = Supervisor(
            "features", (), Strategy.ONE_FOR_ONE, max_restarts=engine.restart_max,
            window_s=engine.restart_window_s)
        supervising = await start_task(workers.run, name="features-supervisor")
        try:
            consumer.subscribe([settings.topics.transactions], listener=_Listener(self))
            self._consumer = consumer  # before start: the first assignment may come during it
            await consumer.start()
            self.running = True
            self.stalled_reason = None  # a fresh consumer: the stall (if any) is over
            self.last_poll = time.monotonic()
            self._log.info("ingestor_started", group_id=settings.kafka.group_id,
                           topic=settings.topics.transactions)
            task_status.started()
            async with asyncio.TaskGroup() as tg:
                poll = tg.create_task(self._poll_loop(consumer))
                tg.create_task(self._housekeeping(consumer, poll))
                tg.create_task(_fail_with(supervising, poll))
        except* (ConsumerStalled, RestartIntensityExceeded) as group:
            error = group.exceptions[0]
            raise error from error.__cause__
        finally:
            self.running = False
            # The drain, the last commit and leaving the group: the publisher, stopped after this
            # child, must outlast them. Waited for up to 60 % of the stop's budget: the
            # publisher's close (its flush: a quarter) still fits when the broker is down.
            await last_step(self._shutdown(consumer, supervising),
                            wait_s=0.6 * settings.engine.shutdown_timeout_s)

    def stop_fetching(self) -> None:
        """Graceful shutdown, step one: no more fetches; in-flight work carries on."""
        self._stopping = True

    async def _poll_loop(self, consumer: AIOKafkaConsumer) -> None:
        max_records = self._settings.kafka.fetch_max_records
        consumed = self._metrics.records_consumed
        fetch_delay = self._metrics.fetch_delay
        while not self._stopping:
            self._resume_drained()
            # a batch that does not decode: data is what the failed call had drained, routed as any fetch
            data, unreadable = await fetch(consumer, timeout_ms=_POLL_TIMEOUT_MS, max_records=max_records)
            now = time.monotonic()
            self.last_poll = now
            if data:
                oldest = min(records[0].timestamp for records in data.values() if records)
                fetch_delay.observe(max(0.0, time.time() - oldest / 1000.0))
            for tp, records in data.items():
                state = self._parts.get(tp.partition)
                if state is None and records and tp in consumer.assignment():
                    # assigned, but the assignment callback has not registered it yet: fetch these
                    # again once it has (dropping them would skip them: the position moved on)
                    consumer.seek(tp, records[0].offset)
                    continue
                if state is None or state.closing or state.halted or not records:
                    continue  # revoked while fetched (the new owner reads them again) or rewinding
                consumed.labels(str(tp.partition)).inc(len(records))
                if state.route([(r, now) for r in records]):
                    self.pauses += 1
                if self._stopped.at:
                    self._stopped.passed(tp, records[-1].offset + 1)
            if unreadable is not None:
                self._stop_unreadable(consumer, unreadable)

    def _stop_unreadable(self, consumer: AIOKafkaConsumer, found: Unreadable) -> None:
        """Stop the partition at the batch that does not decode; the others carry on."""
        tp = found.tp
        state = self._parts.get(tp.partition)
        if state is None or state.tp != tp or state.closing or state.halted:
            # Its records were not routed: read again from where the failed call began (the rewind
            # or the next owner reads them in any case), not from where aiokafka would move on to.
            taken = found.taken.get(tp)
            with contextlib.suppress(IllegalStateError):
                consumer.seek(tp, taken[0].offset if taken else found.offset)
            return
        self._stopped.stop(consumer, found)
        state.unreadable = found.offset  # what came before it goes on to the worker

    def _resume_drained(self) -> None:
        limit = self._settings.engine.max_unacknowledged
        for state in self._parts.values():
            state.resume_if_drained()
            if state.hold_if_unacknowledged(limit):
                self.holds += 1
                self._log.warning("partition_held_unacknowledged", partition=state.number,
                                  records=state.tracker.outstanding, limit=limit,
                                  oldest_s=round(state.tracker.oldest_age(time.monotonic()), 1))

    async def _housekeeping(self, consumer: AIOKafkaConsumer, poll: asyncio.Task[None]) -> None:
        """Periodic commits, gauges and the watchdog."""
        engine = self._settings.engine
        interval = engine.commit_interval_ms / 1000.0
        while not poll.done():
            await asyncio.wait({poll}, timeout=interval)  # a stop does not wait out the interval
            if poll.done():
                return  # the shutdown commits
            await self.commit(consumer)
            await self._refresh_positions(consumer)
            self._update_gauges()
            self.housekeeping_passes += 1
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
        now = time.monotonic()
        for s in self._parts.values():
            metrics.mailbox_depth.labels(s.child_id).set(s.mailbox.depth)
            metrics.unacknowledged_age.labels(str(s.number)).set(s.tracker.oldest_age(now))

    def _watchdog(self, now: float) -> None:
        limit = self._settings.engine.watchdog_s
        if self._stopping:
            return
        if now - self.last_poll > limit:
            self._stall(f"poll loop made no call for {now - self.last_poll:.1f}s")
        # Partitions that wait on purpose -- all for Redis (hold policy) or for a broker that
        # acknowledges nothing (its fetches stand still too); one for the broker (its worker waits
        # for room in the publish window, or the batch its commits wait for is unacknowledged) --
        # are not stalled: a new consumer would not help them.
        holding = self._features.holding or self._publisher.silent_s(now) >= min(1.0, limit / 2)
        lag = self.lag()
        for p, s in self._parts.items():
            if s.tracker.failed is not None:  # stopped or not: the records handed off are read again
                self._stall(f"partition {p}: publishing failed: {s.tracker.failed!r}")
            if s.unreadable is not None:
                continue  # stopped at a batch that does not decode: its lag waits for the operator
            mark = (s.position, s.tracker.done_end)  # fetching or finishing: either is progress
            if holding or s.waits_on() or mark != s.progress_mark or lag.get(p, 0) == 0:
                s.progress_mark = mark
                s.progress_at = now
            elif now - s.progress_at > limit:
                self._stall(f"partition {p} made no progress for {now - s.progress_at:.1f}s "
                            f"with {lag.get(p, 0)} records waiting")

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
        timeout = self._settings.engine.commit_timeout_s
        sent = self._committing = {tp.partition: offset for tp, offset in offsets.items()}
        try:
            async with asyncio.timeout(timeout):
                await consumer.commit(offsets)
        except TimeoutError:
            # The broker did not answer in time: these offsets are committed at the next try.
            self._metrics.commit_failures.labels("timeout").inc()
            self._log.warning("commit_timed_out", timeout_s=timeout, partitions=sorted(tp.partition for tp in offsets))
            return
        except KafkaError as exc:
            self._metrics.commit_failures.labels("error").inc()
            self._log.warning("commit_failed", error=repr(exc), partitions=sorted(tp.partition for tp in offsets))
            return
        finally:
            if self._committing is sent:
                self._committing = {}
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
        consumer = self._consumer
        if consumer is None or self._stopping:
            return  # a join that completes while this ingestor leaves the group: nothing to start
        # Every partition is registered before the first await, so the poll loop routes its records
        # from the start (its worker reads them once started).
        new: list[Partition] = []
        for tp in tps:
            if tp.topic != topic or tp.partition in self._parts:
                continue
            state = Partition(tp, consumer, self._metrics, Mailbox(size, f"features-{tp.partition}"),
                              OffsetTracker(tp.partition))
            self._parts[tp.partition] = state
            new.append(state)
        for state in new:
            # a new fencing epoch before the first write: a former owner still in flight cannot
            # overwrite what this one writes
            await self._features.claim(state.tp.partition)
            await self._start_worker(state)
        self._log.info("partitions_assigned", partitions=sorted(tp.partition for tp in tps))

    async def _start_worker(self, state: Partition) -> None:
        assert self._workers is not None
        grace = self._settings.engine.shutdown_timeout_s / 2  # the worker's own drain (FeatureWorker.run)
        await self._workers.start_child(ChildSpec(
            state.child_id, functools.partial(self._run_worker, state), restart=Restart.TRANSIENT,
            shutdown_timeout=grace + 1.0))

    async def _run_worker(self, state: Partition, task_status: TaskStatus) -> None:
        """The partition's supervised child: a fresh worker per start; a restart rewinds first.

        A crash (a bug, a failed stage -- never a bad record) halts the partition until the
        supervisor restarts the worker; the worker returns normally once its mailbox is closed.
        """
        if state.starts:
            position = state.rewind()
            self.worker_restarts += 1
            self._metrics.actor_restarts.labels(state.child_id).inc()
            self._log.warning("feature_worker_restarted", partition=state.number, start=state.starts + 1,
                              position=position)
        state.starts += 1
        worker = state.worker = FeatureWorker(state.number, state.mailbox, state.tracker, settings=self._settings,
                                              metrics=self._metrics, stages=self._stages)
        try:
            await worker.run(task_status)
        except Exception:
            state.halt()
            raise
        finally:
            if state.worker is worker:
                state.worker = None

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

    async def _finish(self, states: list[Partition]) -> None:
        """Stop the workers after the batch in hand (all at once), then wait for the broker's
        acknowledgements of what they handed off."""
        for s in states:
            s.closing = True
            s.overflow.clear()
        workers = self._workers
        if workers is not None and workers.running:
            with contextlib.suppress(ActorError):  # the supervisor stopped meanwhile: so did they
                await workers.terminate_children([s.child_id for s in states])
        for s in states:
            s.mailbox.close()
        timeout = self._settings.engine.shutdown_timeout_s / 2
        acked = await asyncio.gather(*(s.tracker.wait_acked(timeout) for s in states))
        for s, ok in zip(states, acked, strict=True):
            if not ok:
                self._log.warning("partition_unacknowledged", partition=s.tp.partition,
                                  in_flight=s.tracker.in_flight)

    def _forget(self, state: Partition) -> None:
        p = state.tp.partition
        if self._parts.get(p) is state:
            del self._parts[p]
        state.forget_metrics()
        self._stopped.forget(state.tp)

    async def _shutdown(self, consumer: AIOKafkaConsumer, supervising: asyncio.Task[None]) -> None:
        """Stop fetching, finish in-flight batches, commit, stop the workers' supervisor, leave the group."""
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
            if self._workers is not None:
                await self._workers.stop()
            await asyncio.gather(supervising, return_exceptions=True)
            await consumer.stop()
            self._log.info("ingestor_stopped")


async def _fail_with(supervising: asyncio.Task[None], poll: asyncio.Task[None]) -> None:
    """While polling, the workers' supervisor ending (out of budget) ends the ingestor with its error."""
    await asyncio.wait([supervising, poll], return_when=asyncio.FIRST_COMPLETED)
    if supervising.done() and not poll.done():
        supervising.result()
        raise ActorError("the feature workers' supervisor stopped")
