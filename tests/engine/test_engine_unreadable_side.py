"""A record batch that does not decode on ``labels`` or on the control topic: the engine's two other
consumers stop at it, report it, and the engine goes on deciding transactions.

The fault is real: a batch with a bad CRC written to the broker (``engine_helpers.produce_corrupt``).
Before, each consumer failed on every fetch; the supervisor restarted it until the engine's restart
budget was spent and the whole replica exited -- for a bad *label*, or a bad routing document.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
from engine_helpers import committed, produce_corrupt, reading, running, transactions, wait_until
from structlog.testing import capture_logs

from fraudactors.engine.control import publish_routing
from fraudactors.engine.decision import Router
from fraudactors.engine.engine import Engine
from fraudactors.engine.routing import ROUTING_KEY, Routing
from fraudactors.services.kafka import make_producer
from fraudactors.settings import Settings

UNREADABLE = "fraudactors_partition_unreadable"


def label(i: int, prefix: str) -> tuple[bytes, bytes]:
    user = f"u-{i % 40}"
    return user.encode(), orjson.dumps({"transaction_id": f"{prefix}-{i}", "user_id": user, "merchant_id": "m-1",
                                        "is_fraud": i % 3 == 0, "labeled_at": "2026-11-20T10:00:00+00:00"})


async def produce_to(s: Settings, topic: str, by_partition: dict[int, list[tuple[bytes, bytes]]]) -> None:
    producer = make_producer(s, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key, partition=p)
                for p, records in by_partition.items() for key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def wait_alive(engine: Engine, predicate: Any, timeout_s: float) -> None:
    """Wait for ``predicate``; fail at once, with the reason, if the engine exits meanwhile."""
    task = engine.done
    assert task is not None
    await wait_until(lambda: predicate() or task.done(), timeout_s=timeout_s)
    if task.done():
        raise AssertionError(f"the engine exited: {task.exception() if not task.cancelled() else 'cancelled'}")


def restarts(engine: Engine, actor: str) -> float:
    return engine.metrics.registry.get_sample_value("fraudactors_actor_restarts_total", {"actor": actor}) or 0.0


async def test_a_corrupt_label_batch_stops_only_its_labels_partition_and_transactions_are_still_decided(
        engine_settings: Settings) -> None:
    """The labels before the batch and every other partition's labels are applied (also the ones
    written after it), the labels partition is committed up to the batch and no further, the stop
    is logged once and shown by the gauge, and the engine decides transactions all along."""
    s = engine_settings.replace(engine={"inference_mode": "thread"})
    parts, bad, topic = s.topics.partitions, s.topics.partitions - 1, s.topics.labels
    group = f"{s.kafka.group_id}.labels"
    before = {p: [label(p * 1000 + i, "pre") for i in range(20)] for p in range(parts)}
    await produce_to(s, topic, before)
    offset = await produce_corrupt(s, bad, [label(i, "corrupt") for i in range(3)], topic=topic)
    after = {p: [label(p * 1000 + i, "post") for i in range(10)] for p in range(parts)}
    await produce_to(s, topic, after)
    assert offset == 20
    applied = 20 * parts + 10 * (parts - 1)
    txns = transactions(200)
    with capture_logs() as logs:
        async with running(s) as engine, reading(s, s.topics.predictions) as decided:
            gauge = engine.metrics.registry.get_sample_value
            await wait_alive(engine, lambda: engine.labels.applied >= applied
                             and gauge(UNREADABLE, {"topic": topic, "partition": str(bad)}) == 1, timeout_s=60)
            await produce_to(s, topic, {p: [label(p * 1000 + i, "more") for i in range(5)] for p in range(parts - 1)})
            await wait_alive(engine, lambda: engine.labels.applied >= applied + 5 * (parts - 1), timeout_s=30)
            ends = {p: 35 if p != bad else offset for p in range(parts)}
            commits: dict[int, int] = {}
            async with asyncio.timeout(30):
                while commits != ends:
                    commits = await committed(s, group, topic=topic)
                    await asyncio.sleep(0.2)  # polling the broker's state: there is no event to wait on
            await produce_to(s, s.topics.transactions, {0: [(k, v) for k, v, _ in txns]})
            await decided.wait_for(lambda recs: len(recs) >= len(txns), timeout_s=60)
            assert engine.done is not None and not engine.done.done(), "the engine is running"
            assert restarts(engine, "labels") == 0, "the label consumer was not restarted"
            assert engine.labels.applied == applied + 5 * (parts - 1), "nothing past the batch is applied"
            assert engine.readiness() == {}
    assert Counter(orjson.loads(r.value)["transaction_id"] for r in decided.records) == Counter(
        t for _, _, t in txns)
    stops = [e for e in logs if e["event"] == "partition_unreadable"]
    assert len(stops) == 1, stops
    assert (stops[0]["topic"], stops[0]["partition"], stops[0]["offset"]) == (topic, bad, offset)
    assert stops[0]["batch_end"] == offset + 3 and stops[0]["log_level"] == "error"


async def test_a_corrupt_batch_on_the_control_topic_keeps_the_routing_in_force_on_every_replica(
        engine_settings: Settings) -> None:
    """A running replica keeps the routing it follows (the documents at and after the batch are not
    read) and decides with it; a replica started afterwards starts with the newest document before
    the batch instead of failing to start. Both report the stop."""
    s = engine_settings.replace(engine={"inference_mode": "thread"})
    topic = s.topics.control
    first = Routing.from_settings(s.models).with_weights({"A": 0.3, "B": 0.7}, {}, "first")
    lost = first.with_weights({"A": 0.6, "B": 0.4}, {}, "in the corrupt batch")
    unread = lost.with_weights({"A": 1.0, "B": 0.0}, {}, "after the corrupt batch")
    await publish_routing(s, first)
    txns = transactions(300)
    with capture_logs() as logs:
        async with running(s) as engine, reading(s, s.topics.predictions) as decided:
            assert engine.routing.applied == first
            offset = await produce_corrupt(s, 0, [(ROUTING_KEY, lost.to_json())], topic=topic)
            await publish_routing(s, unread)
            gauge = engine.metrics.registry.get_sample_value
            await wait_alive(engine, lambda: gauge(UNREADABLE, {"topic": topic, "partition": "0"}) == 1,
                             timeout_s=30)
            await produce_to(s, s.topics.transactions, {0: [(k, v) for k, v, _ in txns[:150]]})
            await decided.wait_for(lambda recs: len(recs) >= 150, timeout_s=60)
            async with running(s) as later:
                assert later.routing.applied == first
                assert gauge(UNREADABLE, {"topic": topic, "partition": "0"}) == 1
                assert later.metrics.registry.get_sample_value(
                    UNREADABLE, {"topic": topic, "partition": "0"}) == 1
                assert later.readiness() == {}
            await produce_to(s, s.topics.transactions, {0: [(k, v) for k, v, _ in txns[150:]]})
            await decided.wait_for(lambda recs: len(recs) >= 300, timeout_s=60)
            assert engine.done is not None and not engine.done.done(), "the engine is running"
            assert restarts(engine, "routing") == 0, "the routing follower was not restarted"
            assert engine.routing.applied == first
            assert engine.metrics.registry.get_sample_value("fraudactors_routing_revision") == first.revision
    router = Router(first.variants)
    variants = {d["transaction_id"]: d["variant"] for d in map(orjson.loads, (r.value for r in decided.records))}
    assert variants == {t: router.route(t).name for _, _, t in txns}, "every decision on the routing in force"
    stops = [e for e in logs if e["event"] == "partition_unreadable"]
    assert len(stops) == 2, stops  # once per replica
    assert {(e["topic"], e["partition"], e["offset"], e["serving"]) for e in stops} == {
        (topic, 0, offset, first.revision)}
