"""Broker faults, made real: a private broker frozen with SIGSTOP (connections stay open, nothing
is answered) and thawed with SIGCONT -- what leader loss, NotEnoughReplicas or a hung broker look
like to the engine. A restart would lose the broker's data, so the broker is never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from engine_helpers import committed, produce, reading, running, transactions, wait_committed, wait_until

from fraudactors.actors import IGNORED
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.publisher import Publisher
from fraudactors.errors import ActorDied
from fraudactors.services.broker import EmbeddedBroker
from fraudactors.services.kafka import create_topics, make_consumer
from fraudactors.settings import Settings


def ids_of(records: list[Any]) -> list[str]:
    return [orjson.loads(r.value)["transaction_id"] for r in records]


@contextlib.contextmanager
def frozen(broker: EmbeddedBroker) -> Iterator[None]:
    """The broker process stopped (SIGSTOP): connections stay open, nothing is answered."""
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.pid, signal.SIGCONT)


@pytest.fixture
def fresh_broker() -> Iterator[EmbeddedBroker]:
    """A private broker this test may freeze; never the session's."""
    broker = EmbeddedBroker(stop_grace_s=2.0)
    broker.start_sync()
    try:
        yield broker
    finally:
        if broker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker.pid, signal.SIGCONT)
        broker.stop_sync()


async def test_a_frozen_broker_loses_nothing_bounds_the_publish_window_and_housekeeping_goes_on(
        engine_settings: Settings, fresh_broker: EmbeddedBroker) -> None:
    """SIGSTOP of the broker for longer than the request timeout while a backlog is processed:
    the publisher's window stops the workers (backpressure to the Kafka edge, never more than
    ``engine.publish_window`` records unacknowledged per output partition), commits time out
    instead of freezing housekeeping (the lag gauges and the watchdog keep running), the watchdog
    does not take partitions held back by the broker for a stalled consumer, and after SIGCONT
    every transaction is decided and committed."""
    window, batch = 64, 16
    s = engine_settings.replace(
        kafka={"bootstrap_servers": fresh_broker.bootstrap_servers, "request_timeout_ms": 2000},
        engine={"publish_window": window, "batch_max": batch, "mailbox_size": 32,
                "commit_timeout_s": 0.5, "commit_interval_ms": 200, "watchdog_s": 2.0})
    await create_topics(s)
    txns = transactions(6000, prefix="frozen")
    partitions = s.topics.partitions
    limit_total = window * partitions  # predictions only: no dead letters in this test
    seen = {"pending": 0, "window": 0.0}

    async with running(s) as engine, reading(s, s.topics.predictions) as decided:
        publisher, ingestor = engine.publisher, engine.ingestor

        async def sample() -> None:
            registry = engine.metrics.registry
            while True:
                seen["pending"] = max(seen["pending"], publisher.pending)
                for p in range(partitions):
                    value = registry.get_sample_value(
                        "fraudactors_publish_window", {"topic": s.topics.predictions, "partition": str(p)})
                    seen["window"] = max(seen["window"], value or 0.0)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            ends = await produce(s, [(k, v) for k, v, _ in txns])
            await decided.wait_for(lambda recs: len(recs) >= 300, timeout_s=60)
            loop = asyncio.get_running_loop()
            # Frozen while some finished records are in no commit sent yet: the next commit must
            # reach the frozen broker and time out (nothing is acknowledged while it is frozen).
            await wait_until(lambda: bool(ingestor.uncommitted), timeout_s=20)
            with frozen(fresh_broker):
                frozen_at = loop.time()
                # The windows fill and the workers wait on them; their mailboxes fill; the
                # ingestor pauses the partitions.
                await wait_until(lambda: publisher.waiting > 0 and bool(ingestor.paused), timeout_s=20)
                # Housekeeping goes on: the lag gauges are set again, the watchdog runs.
                lag = engine.metrics.consumer_lag
                owned = [str(p) for p in ingestor.lag()]
                for p in owned:
                    lag.labels(p).set(-1)
                passes = ingestor.housekeeping_passes
                await wait_until(lambda: ingestor.housekeeping_passes >= passes + 2, timeout_s=10)
                registry = engine.metrics.registry
                assert all((registry.get_sample_value("fraudactors_consumer_lag", {"partition": p}) or 0) >= 0
                           for p in owned), "the lag gauges were updated while the broker was frozen"
                # Frozen beyond the request timeout: sends and commits fail, and are retried.
                await asyncio.sleep(max(0.0, frozen_at + 5.0 - loop.time()))  # the fault's duration
                assert loop.time() - frozen_at < 15, "the steps above must not wait out the freeze"
            retried = registry.get_sample_value("fraudactors_publish_retries_total",
                                                {"topic": s.topics.predictions})
            assert retried, "sends to the frozen broker failed and were retried"
            await decided.wait_for(lambda recs: set(ids_of(recs)) >= {t for _, _, t in txns}, timeout_s=120)
            commits = await wait_committed(s, ends, timeout_s=60)
            assert commits == ends
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        assert registry.get_sample_value("fraudactors_commit_failures_total", {"reason": "timeout"})
        assert engine.supervisor.restarts_total == 0, "no consumer restart for the broker's outage"
        assert ingestor.stalls == 0
    assert seen["pending"] <= limit_total, seen
    assert 0 < seen["window"] <= window, seen
    assert publisher.window_peak <= window


async def _on(broker: EmbeddedBroker, settings: Settings, **kafka: Any) -> Settings:
    """``settings`` pointed at ``broker``, its topics created there."""
    moved = settings.replace(kafka={"bootstrap_servers": broker.bootstrap_servers, **kafka})
    await create_topics(moved)
    return moved


async def _read_all(settings: Settings, topic: str, n: int) -> list[Any]:
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.topics.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        async with asyncio.timeout(30):
            while len(records) < n:
                for recs in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def test_the_publisher_retries_through_a_frozen_broker_and_delivers_everything(
        settings: Settings, fresh_broker: EmbeddedBroker) -> None:
    s = await _on(fresh_broker, settings, request_timeout_ms=1500, linger_ms=5)
    metrics = EngineMetrics()
    publisher = Publisher(s, metrics)
    task = asyncio.create_task(publisher.run(IGNORED))
    topic = s.topics.predictions
    values = [f"v{i}".encode() for i in range(400)]
    try:
        await asyncio.wait_for(await publisher.send_many([(topic, b"k0", values[0], None)]), 30)
        with frozen(fresh_broker):
            acks = [await publisher.send_many([(topic, f"u{i}".encode(), v, None) for i, v in
                                               enumerate(values[start:start + 100], start)])
                    for start in (1, 101, 201, 301)]
            # The sends time out (request_timeout_ms) and are sent again, for as long as it takes.
            await wait_until(lambda: (metrics.registry.get_sample_value(
                "fraudactors_publish_retries_total", {"topic": topic}) or 0) >= 100, timeout_s=30)
            assert not any(ack.done() for ack in acks)
        async with asyncio.timeout(60):
            await asyncio.gather(*acks)
        assert publisher.pending == 0 and publisher.window() == {}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    delivered = {r.value for r in await _read_all(s, topic, len(values))}
    assert delivered == set(values), "every record delivered (a repeat is allowed)"


async def test_a_broker_freeze_longer_than_the_request_timeout_keeps_the_bytes_of_every_dead_letter(
        settings: Settings, fresh_broker: EmbeddedBroker) -> None:
    """Frozen past ``request_timeout_ms``, the producer fails the in-flight dead letters with
    KafkaTimeoutError, which aiokafka marks not retriable (a partition's second sealed batch gives
    up waiting for the first). That is an outage, not a record too large: every dead letter is
    sent again as it was, with its original bytes (SPEC §1), and none carries ``value_omitted``."""
    s = await _on(fresh_broker, settings, request_timeout_ms=1500, linger_ms=5)
    metrics = EngineMetrics()
    publisher = Publisher(s, metrics)
    task = asyncio.create_task(publisher.run(IGNORED))
    dlq = s.topics.dlq
    headers = [("error", b"not JSON"), ("stage", b"parse")]
    originals = [f"original-bytes-{i}".encode() for i in range(6)]
    try:
        await asyncio.wait_for(await publisher.send_many([(dlq, b"k", b"warm-up", headers)]), 30)
        with frozen(fresh_broker):
            acks = []
            for value in originals:  # six micro-batches for one key: six sealed batches of one partition
                acks.append(await publisher.send_many([(dlq, b"k", value, headers)]))
                await asyncio.sleep(0.05)  # past the linger: each is its own batch
            # each batch timed out and was sent again at least twice
            await wait_until(lambda: (metrics.registry.get_sample_value(
                "fraudactors_publish_retries_total", {"topic": dlq}) or 0) >= 2 * len(originals), timeout_s=30)
        async with asyncio.timeout(60):
            await asyncio.gather(*acks)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    records = await _read_all(s, dlq, 1 + len(originals))
    assert all(r.value is not None and "value_omitted" not in dict(r.headers) for r in records), \
        [(r.value, dict(r.headers).get("value_omitted")) for r in records]
    assert {r.value for r in records} == {b"warm-up", *originals}


async def test_stopping_the_publisher_while_the_broker_is_frozen_ends_in_time_and_fails_what_is_unacknowledged(
        settings: Settings, fresh_broker: EmbeddedBroker) -> None:
    """The stop path flushes within its deadline, then stops retrying: the unacknowledged batch's
    future fails (its offsets stay uncommitted) and a sender waiting for room gets ActorDied --
    nothing is left retrying for ever."""
    s = await _on(fresh_broker, settings, request_timeout_ms=1500, linger_ms=5)
    s = s.replace(engine={"shutdown_timeout_s": 4.0, "batch_max": 4, "publish_window": 4})
    publisher = Publisher(s, EngineMetrics())
    task = asyncio.create_task(publisher.run(IGNORED))
    topic = s.topics.predictions
    await asyncio.wait_for(await publisher.send_many([(topic, b"k", b"warm-up", None)]), 30)
    with frozen(fresh_broker):
        ack = await publisher.send_many([(topic, b"k", f"v{i}".encode(), None) for i in range(4)])
        held = asyncio.create_task(publisher.send_many([(topic, b"k", b"v4", None)]))
        await wait_until(lambda: publisher.waiting == 1, timeout_s=10)
        task.cancel()
        async with asyncio.timeout(15):  # flush: shutdown_timeout_s / 4, then the request timeout
            await asyncio.gather(task, return_exceptions=True)
        with pytest.raises(ActorDied):
            await held
        assert ack.done()
        assert ack.cancelled() or isinstance(ack.exception(), Exception)
        assert publisher.window() == {}


async def test_a_dead_letter_refused_for_long_pauses_only_its_partition_and_bounds_what_waits(
        engine_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker refuses the dead-letter topic (an authorization taken away) while one partition
    gets a bad record and then a steady stream of good ones. The dead letter is retried with its
    bytes; its partition goes on deciding only until ``engine.max_unacknowledged`` records wait
    behind it, then is paused -- not deciding without end while nothing can be committed (memory,
    the replay log, what a restart decides again). The watchdog excuses that partition only, the
    age of its oldest unacknowledged batch shows the wait, and once the refusal is lifted
    everything is delivered and committed."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError
    from aiokafka.partitioner import murmur2

    limit, batch, mailbox, fetch = 64, 16, 32, 50
    s = engine_settings.replace(
        kafka={"fetch_max_records": fetch},
        engine={"max_unacknowledged": limit, "batch_max": batch, "mailbox_size": mailbox, "watchdog_s": 2.0,
                "commit_interval_ms": 200})
    dlq, partitions = s.topics.dlq, s.topics.partitions
    refusing = True
    real_send_batch = AIOKafkaProducer.send_batch

    async def send_batch(self: AIOKafkaProducer, builder: Any, topic: str, *, partition: int) -> Any:
        if topic == dlq and refusing:
            refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            refused.set_exception(TopicAuthorizationFailedError())
            return refused
        return await real_send_batch(self, builder, topic, partition=partition)

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", send_batch)

    def partition_of(key: bytes) -> int:
        return (murmur2(key) & 0x7FFFFFFF) % partitions

    txns = [t for t in transactions(6000, users=3000, prefix="refused") if partition_of(t[0]) == 0][:400]
    poison = (txns[0][0], b"not json at all")
    async with running(s) as engine, reading(s, s.topics.predictions) as decided:
        ingestor, registry = engine.ingestor, engine.metrics.registry
        (poison_at,) = (await produce(s, [poison])).values()  # its end offset
        poison_at -= 1
        ends = await produce(s, [(k, v) for k, v, _ in txns])
        await wait_until(lambda: ingestor.holds >= 1, timeout_s=60)
        part = ingestor._parts[0]
        tracker = part.tracker
        # Held past the watchdog: no stall, the age shows it, the other partitions are not excused.
        await wait_until(lambda: (registry.get_sample_value(
            "fraudactors_unacknowledged_age_seconds", {"partition": "0"}) or 0) > 3 * 2.0, timeout_s=30)
        assert ingestor.stalls == 0, ingestor.stalled_reason
        assert part.waits_on() and part.held
        assert registry.get_sample_value("fraudactors_partition_paused", {"partition": "0"}) == 1
        assert not any(q.waits_on() for n, q in ingestor._parts.items() if n != 0)
        # Bounded: the limit, plus what was fetched before the pause (mailbox, a fetch's overflow).
        bound = limit + mailbox + fetch + batch
        assert tracker.outstanding <= bound, tracker.outstanding
        assert len(decided.records) <= bound < len(txns)
        assert (await committed(s)).get(0, -1) <= poison_at, "nothing committed past the dead letter"

        refusing = False
        await decided.wait_for(lambda recs: set(ids_of(recs)) >= {t for _, _, t in txns}, timeout_s=120)
        assert await wait_committed(s, ends, timeout_s=60) == ends
        assert not part.held and ingestor.stalls == 0
    dead = await _read_all(s, dlq, 1)
    assert [(r.key, r.value) for r in dead] == [poison], "retried with its bytes, not cut down"
