"""One open-loop load run: send on schedule, read decisions, drain, and hand back the measurements.

The sender never waits for the engine: the i-th transaction is due at ``scheduled_s[i]`` and goes
out as soon as the clock passes that time (records are generated and serialized ahead of time, in
blocks, while the sender is idle). Latency always counts from the scheduled time, so a stall in the
engine, the broker or the load generator itself shows up as latency instead of being hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.partitioner import murmur2

from fraudactors.errors import FraudActorsError
from fraudactors.settings import Settings
from loadgen.collector import DecisionCollector
from loadgen.generator import EventTimeMode, PendingLabel, TransactionSource, TxnBatch, make_source
from loadgen.progress import Progress, format_line
from loadgen.schedule import RateProfile, scheduled_times


class LoadgenError(FraudActorsError):
    """The load run cannot start or cannot talk to Kafka."""


# The sender wakes at most this often (default; ``LoadConfig.send_tick_s``) and sends what fell due
# as one batch per partition: a record waits up to one tick in the load generator (counted in its
# latency, which runs from the schedule). Longer ticks mean fewer, bigger produce requests, which is
# what an in-memory Tansu broker pays for (see docs/benchmarks.md).
SEND_TICK_S = 0.01


@dataclass(frozen=True)
class LoadConfig:
    profile: RateProfile
    drain_timeout_s: float = 30.0
    seed: int = 2026
    # "sim": the simulator's event times; "send": restamped with the scheduled send time.
    event_time: EventTimeMode = "sim"
    send_labels: bool = True
    run_id: str = ""
    # Transactions sent (as fast as possible) and decided before the measured run; not in the report's counts.
    warmup: int = 0
    warmup_timeout_s: float = 120.0
    linger_ms: int = 0  # the sender batches per partition itself (see SEND_TICK_S)
    send_tick_s: float = SEND_TICK_S
    progress: bool = True
    # Builds the source from the run's id prefix (tests plug in their own); default: the simulator.
    source_factory: Callable[[str], TransactionSource] | None = None


@dataclass
class RunResult:
    config: LoadConfig
    run_id: str
    prefix: str
    started_at: str
    scheduled_s: np.ndarray
    sent_at_s: np.ndarray  # when each transaction was handed to the producer; NaN if never
    is_fraud: np.ndarray
    scenarios: list[str]
    collector: DecisionCollector
    # Transactions handed to the producer, each exactly once (the report's "sent").
    sent: int
    # Of those, how many the broker did not acknowledge. Not the same as not delivered: a request
    # that timed out in the client may still be appended by the broker (e.g. one that froze).
    send_errors: int
    send_end_s: float
    end_s: float
    drained: bool
    dlq: int
    labels_sent: int
    source_name: str
    topics: dict[str, str] = field(default_factory=dict)
    warmup: dict[str, Any] | None = None
    label_send_errors: int = 0


class _Outbox:
    """Serialized transactions prepared ahead of their scheduled time, in blocks, and the labels
    waiting for the transaction after which they are due."""

    def __init__(self, source: TransactionSource, scheduled_s: np.ndarray, wall_start: float,
                 is_fraud: np.ndarray, scenarios: list[str]) -> None:
        self.source = source
        self.scheduled_s = scheduled_s
        self.wall_start = wall_start
        self.is_fraud = is_fraud
        self.scenarios = scenarios
        self.blocks: deque[tuple[int, list[bytes], list[bytes]]] = deque()
        self.prepared_to = 0
        self.labels: deque[PendingLabel] = deque()

    def prepare(self, n: int) -> None:
        lo = self.prepared_to
        hi = min(lo + n, len(self.scheduled_s))
        if hi <= lo:
            return
        batch = self.source.take(hi - lo, self.wall_start + self.scheduled_s[lo:hi])
        self.is_fraud[lo:hi] = batch.is_fraud
        self.scenarios.extend(batch.scenarios)
        self.labels.extend(batch.labels)
        self.blocks.append((lo, batch.keys, batch.values))
        self.prepared_to = hi

    def take(self, lo: int, hi: int) -> tuple[list[bytes], list[bytes]]:
        """Keys and values of transactions [lo, hi), which must be the next ones not yet taken."""
        if self.prepared_to < hi:
            self.prepare(hi - self.prepared_to)
        keys: list[bytes] = []
        values: list[bytes] = []
        while lo < hi:
            start, bkeys, bvalues = self.blocks[0]
            off = lo - start
            take = min(hi - lo, len(bkeys) - off)
            keys.extend(bkeys[off:off + take])
            values.extend(bvalues[off:off + take])
            lo += take
            if off + take == len(bkeys):
                self.blocks.popleft()
        return keys, values

    def labels_due(self, sent: int) -> list[PendingLabel]:
        """Labels whose transaction (and everything before it) has been sent."""
        due: list[PendingLabel] = []
        while self.labels and self.labels[0].send_after < sent:
            due.append(self.labels.popleft())
        return due


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer.topics()  # refresh metadata for every topic
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise LoadgenError(f"topic {topic!r} does not exist on the broker")
    return [TopicPartition(topic, p) for p in sorted(parts)]


# Generate the whole run before the clock starts (so the simulator does not compete with the engine
# for CPU during the measurement) up to this many transactions; beyond, generate as it goes.
PREGENERATE_MAX = 2_000_000


@dataclass
class PreparedLoad:
    """A run's schedule and (when pre-generated) its serialized transactions, before any I/O."""

    config: LoadConfig
    run_id: str
    prefix: str
    scheduled: np.ndarray
    source: TransactionSource
    outbox: _Outbox
    is_fraud: np.ndarray
    scenarios: list[str]
    warmup: TxnBatch | None = None


def prepare_load(config: LoadConfig, pregenerate: bool | None = None) -> PreparedLoad:
    """Build the schedule and the source; pre-generate every transaction when the event times are the
    simulator's own (default) and the run is not huge. CPU-bound; no I/O."""
    run_id = config.run_id or secrets.token_hex(4)
    prefix = f"lg-{run_id}-"
    scheduled = scheduled_times(config.profile)
    total = len(scheduled)
    factory = config.source_factory or (lambda p: make_source(p, config.seed, config.event_time,
                                                              run_length=config.warmup + total))
    warmup: TxnBatch | None = None
    if config.warmup > 0:
        # History first: the same simulated world, sent before the clock starts and not measured,
        # so the measured transactions meet users and merchants the feature store already knows.
        source = factory(f"lgw-{run_id}-")
        warmup = source.take(config.warmup, np.full(config.warmup, time.time()))
        source.begin_run(prefix)
    else:
        source = factory(prefix)
    is_fraud = np.zeros(total, dtype=bool)
    scenarios: list[str] = []
    outbox = _Outbox(source, scheduled, time.time(), is_fraud, scenarios)
    if pregenerate is None:
        pregenerate = config.event_time == "sim" and total <= PREGENERATE_MAX
    if pregenerate:
        while outbox.prepared_to < total:
            outbox.prepare(50_000)
    return PreparedLoad(config, run_id, prefix, scheduled, source, outbox, is_fraud, scenarios, warmup)


async def run_load(settings: Settings, config: LoadConfig, progress: Progress | None = None,
                   prepared: PreparedLoad | None = None, on_clock_start: Callable[[], object] | None = None,
                   on_send_end: Callable[[], object] | None = None) -> RunResult:
    """Run the load described by ``config`` against the engine behind ``settings``'s topics.

    ``on_clock_start`` is called when the measured run starts (after any warm-up), ``on_send_end``
    when the last transaction is sent (before the drain): e.g. to sample CPU over the send window.
    """
    from fraudactors.services.kafka import make_consumer, make_producer

    profile = config.profile
    if prepared is None:
        prepared = prepare_load(config)
    run_id, prefix, scheduled, source = prepared.run_id, prepared.prefix, prepared.scheduled, prepared.source
    is_fraud, scenarios, outbox = prepared.is_fraud, prepared.scenarios, prepared.outbox
    total = len(scheduled)
    progress = progress or Progress(enabled=config.progress)
    topics = settings.topics

    consumer = make_consumer(settings, group_id=None, client_id=f"loadgen-{run_id}",
                             max_poll_records=20_000, fetch_max_bytes=64 * 1024 * 1024,
                             max_partition_fetch_bytes=8 * 1024 * 1024,
                             auto_offset_reset="earliest")
    producer = make_producer(settings, client_id=f"loadgen-{run_id}", linger_ms=config.linger_ms,
                             max_batch_size=max(settings.kafka.max_batch_size, 256 * 1024))
    connected = False
    try:
        await consumer.start()
        connected = True
        await producer.start()
    except BaseException as exc:
        await asyncio.shield(_stop_clients(producer, consumer))
        if not isinstance(exc, Exception):
            raise
        where = settings.kafka.bootstrap_servers
        if not connected:
            raise LoadgenError(f"cannot connect to Kafka at {where}: {exc!r}") from exc
        # Connected (the consumer started), so the broker refused the producer: e.g. its
        # InitProducerId, which an idempotent producer needs and Tansu does not grant.
        hint = ("; for a broker without idempotent producers set kafka.enable_idempotence = false"
                if settings.kafka.enable_idempotence else "")
        raise LoadgenError(f"the Kafka producer could not start at {where}: {exc!r}{hint}") from exc

    state = _State()
    try:
        pred_tps = await _partitions(consumer, topics.predictions)
        n_partitions = len(await _partitions(consumer, topics.transactions))
        dlq_tps = await _partitions(consumer, topics.dlq)
        if config.send_labels:
            await _partitions(consumer, topics.labels)
        consumer.assign(pred_tps)
        for tp, offset in (await consumer.end_offsets(pred_tps)).items():
            consumer.seek(tp, offset)

        sent_at = np.full(total, np.nan, dtype=np.float64)
        warm_stats = await _warm_up(producer, consumer, topics.transactions, topics.labels, prepared, n_partitions,
                                    config, progress) if prepared.warmup is not None else None
        # Read the DLQ from here on too, counting only this run's transactions: other traffic on
        # the topic is not ours, and an end-offset difference would count it (and, on Tansu, is
        # wrong for multi-record batches; a start a little early is harmless with the filter).
        positions = {tp: await consumer.position(tp) for tp in pred_tps}
        consumer.assign([*pred_tps, *dlq_tps])
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        for tp, offset in (await consumer.end_offsets(dlq_tps)).items():
            consumer.seek(tp, offset)
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        from fraudactors import heap

        heap.settle()  # the simulated world and the schedule are built: keep collections off them
        outbox.wall_start = time.time()  # event times of a restamping source count from here
        if on_clock_start is not None:
            on_clock_start()
        start = time.perf_counter()
        state.phase = "send"
        collector = DecisionCollector(prefix, scheduled, start)
        collector.track_window = progress.enabled

        def label_delivered(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                state.label_send_errors += 1

        partition_of: dict[bytes, int] = {}  # key -> partition, as the producer's default partitioner
        tick = config.send_tick_s
        block = int(min(4096, max(64, profile.peak_rate * 0.05)))
        lookahead = int(max(block * 2, profile.peak_rate * 0.25))
        outbox.prepare(lookahead)

        reader = asyncio.create_task(_read(consumer, collector, state, topics.dlq, prefix.encode()),
                                     name="loadgen-reader")
        shower = asyncio.create_task(_show(progress, profile, collector, state, start), name="loadgen-progress")
        try:
            i = 0
            while i < total:
                if reader.done():
                    reader.result()  # surfaces the reader's error
                now = time.perf_counter() - start
                due = int(np.searchsorted(scheduled, now, side="right"))
                if due > i:
                    hi = min(due, i + max(4 * block, 2048))
                    keys, values = outbox.take(i, hi)
                    await _send_batched(producer, topics.transactions, keys, values, partition_of, n_partitions,
                                        state)
                    sent_at[i:hi] = time.perf_counter() - start
                    i = hi
                    if config.send_labels:
                        for label in outbox.labels_due(i):
                            fut = await producer.send(topics.labels, value=label.value, key=label.key)
                            fut.add_done_callback(label_delivered)
                            state.labels_sent += 1
                    # Send in ticks: what fell due meanwhile goes out as one batch per partition.
                    # Behind schedule (the broker or this process stalled), the overdue ones go out
                    # without waiting for the next tick: an open-loop sender catches up at once.
                    await asyncio.sleep(tick if hi >= due else 0)
                elif outbox.prepared_to - i < lookahead and outbox.prepared_to < total:
                    outbox.prepare(block)
                else:
                    await asyncio.sleep(max(scheduled[i] - now, tick))
            await producer.flush()
            send_end = time.perf_counter() - start
            if on_send_end is not None:
                on_send_end()
            state.phase = "drain"
            # Wait for every transaction sent, acknowledged or not: an unacknowledged one may
            # still have reached the broker, so it is neither subtracted nor waited for apart.
            deadline = time.perf_counter() + config.drain_timeout_s
            while collector.distinct < state.sent and time.perf_counter() < deadline:
                if reader.done():
                    reader.result()
                await asyncio.wait({state.progressed_event()}, timeout=0.1)
            drained = collector.distinct >= state.sent
            # Catch up to the end of the topic once more so duplicates already written are counted.
            ends = await consumer.end_offsets(pred_tps)
            catch_up = time.perf_counter() + 5.0
            while time.perf_counter() < catch_up and not reader.done() and not await _reached(consumer, ends):
                await asyncio.wait({state.progressed_event()}, timeout=0.1)
            end = time.perf_counter() - start
            state.phase = "done"
        finally:
            state.stop = True
            shower.cancel()
            reader.cancel()
            for task in (shower, reader):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            t_end = time.perf_counter() - start
            phase = "done" if state.phase == "done" else "stopped"
            progress.finish(format_line(phase, t_end, profile.duration_s, 0.0, state.sent / max(t_end, 1e-9),
                                        state.sent, collector.distinct, collector.window_p99_ms()))
    except KafkaError as exc:
        # The broker went away (or stopped answering): the reader, the sender or the drain's last
        # look at the topic gave up. One typed error naming the broker, not aiokafka's timeouts.
        raise LoadgenError(f"lost the Kafka broker at {settings.kafka.bootstrap_servers} while "
                           f"{_DOING[state.phase]}: {exc!r}") from exc
    finally:
        await asyncio.shield(_stop_clients(producer, consumer))

    return RunResult(
        config=config, run_id=run_id, prefix=prefix, started_at=started_at, scheduled_s=scheduled,
        sent_at_s=sent_at, is_fraud=is_fraud, scenarios=scenarios, collector=collector, sent=state.sent,
        send_errors=state.send_errors, send_end_s=send_end, end_s=end, drained=drained,
        dlq=state.dlq, labels_sent=state.labels_sent, source_name=source.name, warmup=warm_stats,
        topics={"transactions": topics.transactions, "predictions": topics.predictions,
                "labels": topics.labels, "dlq": topics.dlq},
        label_send_errors=state.label_send_errors,
    )


_DOING = {"start": "preparing the run", "send": "sending", "drain": "draining", "done": "finishing"}


class _State:
    def __init__(self) -> None:
        self.sent = 0  # transactions handed to the producer
        self.send_errors = 0  # of those, not acknowledged by the broker (delivery unknown)
        self.labels_sent = 0
        self.label_send_errors = 0
        self.enqueue_retries = 0  # batches the producer could not take within its request timeout
        self.dlq = 0  # this run's transactions seen on the dead-letter topic
        self.phase = "start"  # start (topics, warm-up), send, drain, done
        self.stop = False
        self._progressed: asyncio.Future[None] | None = None

    def progressed_event(self) -> asyncio.Future[None]:
        """A future resolved the next time the reader matches decisions."""
        if self._progressed is None or self._progressed.done():
            self._progressed = asyncio.get_running_loop().create_future()
        return self._progressed

    def notify(self) -> None:
        if self._progressed is not None and not self._progressed.done():
            self._progressed.set_result(None)


async def _read(consumer: AIOKafkaConsumer, collector: DecisionCollector, state: _State, dlq_topic: str,
                prefix: bytes) -> None:
    while not state.stop:
        batches = await consumer.getmany(timeout_ms=100, max_records=20_000)
        now = time.perf_counter()
        for tp, records in batches.items():
            if tp.topic == dlq_topic:
                state.dlq += sum(1 for r in records if r.value is not None and prefix in r.value)
            else:
                collector.feed([r.value for r in records], now)
        state.notify()


async def _show(progress: Progress, profile: RateProfile, collector: DecisionCollector, state: _State,
                start: float) -> None:
    last_t, last_sent = 0.0, 0
    while True:
        await asyncio.sleep(progress.interval_s)
        t = time.perf_counter() - start
        p99 = collector.window_p99_ms()
        rate = (state.sent - last_sent) / max(t - last_t, 1e-9)
        last_t, last_sent = t, state.sent
        progress.update(format_line(state.phase, t, profile.duration_s, profile.rate_at(min(t, profile.duration_s))
                                    if state.phase == "send" else 0.0, rate, state.sent, collector.distinct, p99))


async def _send_batched(producer: AIOKafkaProducer, topic: str, keys: list[bytes], values: list[bytes],
                        partition_of: dict[bytes, int], n_partitions: int, state: _State) -> None:
    """Group records by partition (Kafka's default partitioner: murmur2 of the key, memoized per key)
    and hand each group to the producer as one record batch: no per-record coroutine or future."""
    groups: dict[int, list[int]] = {}
    for j, key in enumerate(keys):
        part = partition_of.get(key)
        if part is None:
            part = partition_of[key] = (murmur2(key) & 0x7FFFFFFF) % n_partitions
        group = groups.get(part)
        if group is None:
            groups[part] = [j]
        else:
            group.append(j)
    for part, idxs in groups.items():
        batch = producer.create_batch()
        count = 0
        for j in idxs:
            if batch.append(key=keys[j], value=values[j], timestamp=None) is None:  # full
                await _hand_over(producer, batch, topic, part, count, state)
                batch = producer.create_batch()
                count = 0
                batch.append(key=keys[j], value=values[j], timestamp=None)
            count += 1
        await _hand_over(producer, batch, topic, part, count, state)


_ENQUEUE_PATIENCE_S = 120.0


async def _hand_over(producer: AIOKafkaProducer, batch: Any, topic: str, partition: int, count: int,
                     state: _State) -> None:
    batch.close()
    give_up = time.monotonic() + _ENQUEUE_PATIENCE_S
    while True:
        try:
            fut = await producer.send_batch(batch, topic, partition=partition)
            break
        except KafkaTimeoutError:
            # The partition's queue stayed full for a whole request timeout (a broker that stopped
            # answering): the batch was not taken. Open loop: it is still due, and every second
            # it waits counts in its latency (measured from the scheduled time); hand it over again,
            # for a while: a run against a broker that never answers again still ends.
            if time.monotonic() >= give_up:
                raise
            state.enqueue_retries += 1
    state.sent += count

    def done(f: asyncio.Future[Any]) -> None:
        if f.cancelled() or f.exception() is not None:
            state.send_errors += count

    fut.add_done_callback(done)


async def _warm_up(producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, topic: str, labels_topic: str,
                   prepared: PreparedLoad, n_partitions: int, config: LoadConfig,
                   progress: Progress) -> dict[str, Any]:
    """Send the warm-up batch at once, then read decisions until all are in (or the timeout)."""
    batch = prepared.warmup
    assert batch is not None
    n = len(batch)
    collector = DecisionCollector(f"lgw-{prepared.run_id}-", np.zeros(n), time.perf_counter())
    collector.track_window = False
    progress.update(f"[warmup] sending {n:,} transactions of history (not measured)")
    t0 = time.perf_counter()
    futures = []
    for key, value in zip(batch.keys, batch.values, strict=True):
        futures.append(await producer.send(topic, value=value, key=key,
                                           partition=(murmur2(key) & 0x7FFFFFFF) % n_partitions))
    if config.send_labels:
        for label in batch.labels:
            futures.append(await producer.send(labels_topic, value=label.value, key=label.key))
    await asyncio.gather(*futures)
    deadline = time.perf_counter() + config.warmup_timeout_s
    last_note = time.perf_counter()
    while collector.distinct < n and time.perf_counter() < deadline:
        batches = await consumer.getmany(timeout_ms=100, max_records=20_000)
        for records in batches.values():
            collector.feed([r.value for r in records])
        if time.perf_counter() - last_note >= progress.interval_s:
            last_note = time.perf_counter()
            progress.update(f"[warmup] {collector.distinct:,}/{n:,} decided")
    seconds = time.perf_counter() - t0
    progress.update(f"[warmup] {collector.distinct:,}/{n:,} decided in {seconds:.1f}s "
                    f"({collector.distinct / max(seconds, 1e-9):,.0f}/s); measured run starts")
    progress.finish()
    return {"sent": n, "decided": collector.distinct, "seconds": round(seconds, 3),
            "complete": collector.distinct >= n, "labels_sent": len(batch.labels) if config.send_labels else 0}


async def _reached(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, offset in ends.items():
        if await consumer.position(tp) < offset:
            return False
    return True


# How long each Kafka client may take to stop. Against a broker that is gone, the producer's stop
# waits for batches that can no longer be delivered.
STOP_TIMEOUT_S = 10.0


async def _stop_clients(producer: AIOKafkaProducer, consumer: AIOKafkaConsumer,
                        timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop both clients, each within ``timeout_s``. A client's own failure to stop is not ours to
    report: aiokafka's stop can end in an error, or in the CancelledError of a background task it
    cancelled, which must not read as this task being cancelled."""
    for client in (producer, consumer):
        stopping = asyncio.ensure_future(client.stop())
        done, _ = await asyncio.wait({stopping}, timeout=timeout_s)
        if not done:
            stopping.cancel()
            await asyncio.wait({stopping}, timeout=1.0)
        elif not stopping.cancelled():
            stopping.exception()  # retrieved: a failed stop is not logged as never retrieved

