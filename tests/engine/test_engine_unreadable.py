"""A record batch the consumer cannot decode stops its partition, and only its partition.

The fault is real: a record batch whose CRC does not match its bytes is written to the broker
with a raw Produce request (``engine_helpers.produce_corrupt``), and aiokafka fetches it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from engine_helpers import (
    committed,
    fail_first_publish,
    produce_before_corrupt,
    produce_corrupt,
    reading,
    running,
    transactions,
    wait_committed,
    wait_until,
)
from structlog.testing import capture_logs

from fraudactors.engine import ingestor as ingestor_module
from fraudactors.engine.features import FeatureStoreActor
from fraudactors.engine.unreadable import salvage
from fraudactors.services.kafka import make_consumer, make_producer
from fraudactors.settings import Settings


async def produce_tracked(settings: Settings, records: list[tuple[bytes, bytes, str]]) -> dict[str, int]:
    """Send and wait for every record; returns each transaction_id's partition."""
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        futures = [(tid, await producer.send(settings.topics.transactions, value, key=key))
                   for key, value, tid in records]
        return {tid: (await fut).partition for tid, fut in futures}
    finally:
        await producer.stop()


def ids_of(records: list[Any]) -> list[str]:
    return [orjson.loads(r.value)["transaction_id"] for r in records]


async def test_salvage_gives_back_what_a_getmany_failing_on_a_corrupt_batch_dropped(settings: Settings) -> None:
    """aiokafka's getmany drops the records it drained before the bad batch (other partitions', and
    the bad partition's own before it) and moves their positions on; salvage gives them back, and
    names the partition and offset. Stopping there as the ingestor does, nothing is read twice or
    lost -- and a consumer that merely retried getmany would have lost them."""
    s = settings
    bad = 1
    good = {p: [(b"k", orjson.dumps({"p": p, "i": i}), f"{p}-{i}") for i in range(3)] for p in (0, 1)}
    producer = make_producer(s, linger_ms=0)
    await producer.start()
    try:
        for p, records in good.items():
            for key, value, _ in records:
                await producer.send_and_wait(s.topics.transactions, value, key=key, partition=p)
    finally:
        await producer.stop()
    offset = await produce_corrupt(s, bad, [(b"k", b"lost?")])
    assert offset == 3
    consumer = make_consumer(s, group_id=None, client_id="salvage-test")
    await consumer.start()
    seen: list[tuple[int, int]] = []
    found = []
    try:
        tps = [TopicPartition(s.topics.transactions, p) for p in (0, 1)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for _ in range(20):
            try:
                data = await consumer.getmany(timeout_ms=200)
            except Exception as exc:
                unreadable = salvage(exc)
                assert unreadable is not None, f"not pinned to a partition: {exc!r}"
                found.append(unreadable)
                data = unreadable.taken
                consumer.seek(unreadable.tp, unreadable.offset)
                consumer.pause(unreadable.tp)
            seen.extend((r.partition, r.offset) for recs in data.values() for r in recs)
            if len(seen) >= 6 and found:
                break
    finally:
        await consumer.stop()
    assert sorted(seen) == [(p, i) for p in (0, 1) for i in range(3)], "every good record once, none lost"
    assert [(f.tp.partition, f.offset, f.batch_end) for f in found] == [(bad, 3, 4)]
    assert [r.offset for r in found[0].taken[found[0].tp]] == [0, 1, 2], "the bad partition's own, before it"
    assert "CRC" in repr(found[0].error)


async def test_a_corrupt_batch_stops_only_its_partition_and_loses_nothing(engine_settings: Settings) -> None:
    """A batch with a bad CRC used to fail the ingestor on every fetch: restarts until the engine
    exited, every partition of the replica with it. Now its partition stops at the batch -- the
    records before it decided, the ones after it waiting, the stop logged once with its offset and
    shown by fraudactors_partition_unreadable -- and the other partitions are decided as before;
    the watchdog does not take the stopped partition for a stalled consumer."""
    s = engine_settings.replace(engine={"watchdog_s": 2.0})
    parts = s.topics.partitions
    bad = parts - 1
    before = transactions(600, prefix="pre")
    where = await produce_tracked(s, before)
    offset = await produce_corrupt(s, bad, [(k, v) for k, v, _ in transactions(3, start=10_000, prefix="corrupt")])
    after = transactions(600, start=600, prefix="post")
    where |= await produce_tracked(s, after)
    ends = dict(Counter(where.values()))
    ends[bad] += 3
    assert ends[bad] > offset + 3 and offset > 0, "records before and after the corrupt batch"
    expected = {t for _, _, t in before} | {t for _, _, t in after if where[t] != bad}
    waiting = {t for _, _, t in after if where[t] == bad}
    with capture_logs() as logs:
        async with running(s) as engine, reading(s, s.topics.predictions) as decided, \
                reading(s, s.topics.dlq) as dead:
            await decided.wait_for(lambda recs: set(ids_of(recs)) >= expected, timeout_s=90)
            gauge = engine.metrics.registry.get_sample_value
            stopped = {"topic": s.topics.transactions, "partition": str(bad)}
            await wait_until(lambda: gauge("fraudactors_partition_unreadable", stopped) == 1, timeout_s=10)
            # Past the watchdog's limit, more traffic: the other partitions are still decided.
            passes = engine.ingestor.housekeeping_passes
            await wait_until(lambda: engine.ingestor.housekeeping_passes >= passes + 20, timeout_s=30)
            more = transactions(300, start=2000, prefix="more")
            where_more = await produce_tracked(s, more)
            more_expected = {t for _, _, t in more if where_more[t] != bad}
            await decided.wait_for(lambda recs: set(ids_of(recs)) >= more_expected, timeout_s=60)
            for p, n in Counter(where_more.values()).items():
                ends[p] = ends.get(p, 0) + (n if p != bad else 0)
            commits = await wait_committed(s, {p: e for p, e in ends.items() if p != bad}, timeout_s=30)
            assert engine.done is not None and not engine.done.done(), "the engine is running"
            assert engine.ingestor.stalls == 0
            restarts = engine.metrics.registry.get_sample_value(
                "fraudactors_actor_restarts_total", {"actor": "ingestor"})
            assert not restarts, "the ingestor was not restarted"
            assert engine.readiness() == {}
            assert engine.ingestor.lag().get(bad, 0) >= len(waiting) + 3, "the stopped partition shows its lag"
    ids = Counter(ids_of(decided.records))
    assert set(ids) == expected | more_expected, "everything but the stopped partition's rest is decided"
    assert not set(ids) & waiting
    assert max(ids.values()) == 1
    assert dead.records == []
    assert commits.get(bad) == offset, "the stopped partition is committed up to the corrupt batch"
    assert all(commits.get(p, 0) >= e for p, e in ends.items() if p != bad)
    stops = [e for e in logs if e["event"] == "partition_unreadable"]
    assert len(stops) == 1, stops
    assert (stops[0]["topic"], stops[0]["partition"], stops[0]["offset"]) == (s.topics.transactions, bad, offset)
    assert stops[0]["batch_end"] == offset + 3 and stops[0]["log_level"] == "error"
    assert (await committed(s)).get(bad) == offset


async def test_a_worker_restart_after_the_stop_decides_every_record_before_the_batch(
        engine_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped partition whose worker crashes is re-read from the last batch handed off. Before,
    it stayed stopped through the rewind: the re-read filled the mailbox before the batch, paused the
    partition and never resumed it (nor did the watchdog, which leaves a stopped partition alone),
    so the records between the pause and the batch were neither decided nor committed -- and the
    runbook's reset past the batch would have skipped them. Now the re-read goes on to the batch and
    stops there again: everything before it decided once, committed up to it, the gauge at 1 all
    along, the stop logged once."""
    s = engine_settings.replace(engine={"mailbox_size": 32, "batch_max": 8, "watchdog_s": 5.0},
                                kafka={"fetch_max_records": 40})
    bad, n = 0, 100
    records, offset = await produce_before_corrupt(s, bad, n, prefix="pre")
    assert offset == n

    # The first fetches take everything up to the batch at once, the worker waiting meanwhile: the
    # stop comes with nothing handed off. The re-read then comes 40 records at a time, and its
    # worker waits until the mailbox is full: it pauses before the batch.
    limit = {"max_records": 1000}
    real_fetch = ingestor_module.fetch

    async def fetch(consumer: Any, *partitions: Any, **options: Any) -> Any:
        data, found = await real_fetch(consumer, *partitions, **{**options, "max_records": limit["max_records"]})
        if found is not None:
            limit["max_records"] = s.kafka.fetch_max_records
        return data, found

    monkeypatch.setattr(ingestor_module, "fetch", fetch)
    gate, re_read_paused = asyncio.Event(), asyncio.Event()
    crash = {"left": 1}
    real_compute = FeatureStoreActor.compute_staged

    async def compute(self: FeatureStoreActor, txns: Any, partition: int, offsets: Any) -> Any:
        if partition == bad:
            await gate.wait()
            if crash["left"]:
                crash["left"] -= 1
                raise RuntimeError("injected worker crash")
            await re_read_paused.wait()
        return await real_compute(self, txns, partition, offsets)

    monkeypatch.setattr(FeatureStoreActor, "compute_staged", compute)
    expected = {t for _, _, t in records}
    stopped = {"topic": s.topics.transactions, "partition": str(bad)}
    with capture_logs() as logs:
        async with running(s) as engine, reading(s, s.topics.predictions) as decided:
            gauge = engine.metrics.registry.get_sample_value
            await wait_until(lambda: gauge("fraudactors_partition_unreadable", stopped) == 1, timeout_s=60)
            part = engine.ingestor._parts[bad]
            assert part.unreadable == offset and part.tracker.registered_end < 0, "nothing handed off yet"
            assert limit["max_records"] == s.kafka.fetch_max_records
            gate.set()  # the worker crashes on its first batch; its restart rewinds to offset 0
            await wait_until(lambda: engine.ingestor.worker_restarts == 1, timeout_s=30)
            await wait_until(lambda: part.paused, timeout_s=30)
            assert part.fetched_end < offset, "paused before the batch"
            re_read_paused.set()
            await decided.wait_for(lambda recs: set(ids_of(recs)) >= expected, timeout_s=30)
            await wait_until(lambda: part.unreadable == offset, timeout_s=30)
            commits = await wait_committed(s, {bad: offset}, timeout_s=30)
            assert gauge("fraudactors_partition_unreadable", stopped) == 1
            assert engine.ingestor.stalls == 0
    assert commits[bad] == offset, "committed up to the batch, not past it"
    ids = Counter(ids_of(decided.records))
    assert set(ids) == expected and max(ids.values()) == 1
    stops = [e for e in logs if e["event"] == "partition_unreadable"]
    assert len(stops) == 1, stops
    assert not [e for e in logs if e["event"] == "partition_readable"], "stopped all along"


async def test_a_failed_publish_before_the_batch_restarts_the_consumer_and_is_decided_again(
        engine_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog leaves a stopped partition's lag alone, but not a publish that failed for good:
    the records it held are read again only by a new consumer. Before, the stop was checked first
    and the failure never acted on: those records were never decided, the commit stayed below them."""
    s = engine_settings
    bad, n = 0, 60
    records, offset = await produce_before_corrupt(s, bad, n, prefix="pre")
    gate = asyncio.Event()  # the worker waits for the stop: its batches are handed off after it
    real_compute = FeatureStoreActor.compute_staged

    async def compute(self: FeatureStoreActor, txns: Any, partition: int, offsets: Any) -> Any:
        await gate.wait()
        return await real_compute(self, txns, partition, offsets)

    monkeypatch.setattr(FeatureStoreActor, "compute_staged", compute)
    expected = {t for _, _, t in records}
    stopped = {"topic": s.topics.transactions, "partition": str(bad)}
    with capture_logs() as logs:
        async with running(s) as engine, reading(s, s.topics.predictions) as decided:
            failed = fail_first_publish(engine.publisher)
            gauge = engine.metrics.registry.get_sample_value
            await wait_until(lambda: gauge("fraudactors_partition_unreadable", stopped) == 1, timeout_s=60)
            assert engine.ingestor._parts[bad].unreadable == offset
            gate.set()
            await wait_until(lambda: engine.ingestor.stalls > 0, timeout_s=30)
            await decided.wait_for(lambda recs: set(ids_of(recs)) >= expected, timeout_s=60)
            commits = await wait_committed(s, {bad: offset}, timeout_s=30)
            await wait_until(lambda: gauge("fraudactors_partition_unreadable", stopped) == 1, timeout_s=30)
    assert failed, "a batch before the corrupt one failed"
    assert commits[bad] == offset, "committed up to the batch, not past it"
    stalls = [e["reason"] for e in logs if e["event"] == "consumer_stalled"]
    assert len(stalls) == 1 and "publishing failed" in stalls[0], stalls


async def test_a_stop_outlives_a_re_read_up_to_the_batch_and_ends_past_it(settings: Settings) -> None:
    """Stopped again at the same batch (a re-read after a rewind): the gauge stays, no second line.
    Records read past the batch (a good copy leads now, or it was deleted): the stop ends."""
    from prometheus_client import CollectorRegistry, Gauge

    from fraudactors.engine.unreadable import Stopped, Unreadable
    from fraudactors.logging import get_logger

    gauge = Gauge("unreadable", "test", ["topic", "partition"], registry=CollectorRegistry())
    consumer = make_consumer(settings, group_id=None, client_id="stopped-test")
    await consumer.start()
    try:
        tp = TopicPartition(settings.topics.transactions, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        stopped = Stopped(gauge, get_logger())
        found = Unreadable(tp, 5, RuntimeError("bad CRC"), {})
        with capture_logs() as logs:
            stopped.stop(consumer, found)
            stopped.passed(tp, 5)  # the re-read, up to the batch
            stopped.stop(consumer, found)
            assert gauge.labels(tp.topic, "0")._value.get() == 1 and consumer.paused() == {tp}
            stopped.passed(tp, 7)
        assert [e["event"] for e in logs] == ["partition_unreadable", "partition_readable"]
        assert stopped.at == {} and next(iter(gauge.collect())).samples == []
    finally:
        await consumer.stop()
