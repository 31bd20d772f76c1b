"""Self-healing: the watchdog restarts a consumer that silently stops; labels feed online accuracy."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from engine_helpers import committed, fail_first_publish, produce, reading, running, transactions, wait_until

from fraudactors.engine.engine import Engine
from fraudactors.settings import Settings


async def test_watchdog_restarts_a_consumer_that_stops_fetching(engine_settings: Settings,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    s = engine_settings.replace(engine={"watchdog_s": 1.5})
    group = s.kafka.group_id
    stalled = asyncio.Event()
    released = asyncio.Event()
    real_getmany = AIOKafkaConsumer.getmany

    async def getmany(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        if self._group_id == group and stalled.is_set() and not released.is_set():
            await released.wait()  # a fetch that never comes back: no error, no progress
        return await real_getmany(self, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)
    engine = Engine(s)
    await engine.start()
    try:
        await engine.wait_ready(timeout_s=60)
        async with reading(s, s.topics.predictions) as reader:
            await produce(s, [(k, v) for k, v, _ in transactions(200)])
            await reader.wait_for(lambda recs: len(recs) >= 200, timeout_s=30)
            # Idle partitions (nothing to fetch) make no progress and are not stalled: more than
            # two watchdog periods without a record restart nothing, and once their offsets are
            # committed they are not committed again and again.
            commits = engine.metrics.registry
            async with asyncio.timeout(30):  # the last offsets' commit (every commit_interval_ms)
                while sum((await committed(s)).values()) < 200:  # noqa: ASYNC110 - the broker signals nothing
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # the engine counts a commit once the broker has answered it
            before = commits.get_sample_value("fraudactors_commits_total")
            await asyncio.sleep(2 * s.engine.watchdog_s)
            assert engine.ingestor.stalls == 0, engine.ingestor.stalled_reason
            assert commits.get_sample_value("fraudactors_commits_total") == before, "nothing new to commit"
            stalled.set()
            txns = transactions(300, start=200)
            await produce(s, [(k, v) for k, v, _ in txns])
            await wait_until(lambda: engine.ingestor.stalls > 0, timeout_s=30)
            assert "stalled" in engine.readiness().get("consumer", ""), engine.readiness()
            released.set()
            await reader.wait_for(lambda recs: {orjson.loads(r.value)["transaction_id"] for r in recs}
                                  >= {t for _, _, t in txns}, timeout_s=60)
            # The records fetched just before the stall may all be decided by the old workers while
            # the supervisor is still backing off: wait for the restart itself, then for readiness.
            restarted = 'fraudactors_actor_restarts_total{actor="ingestor"}'
            await wait_until(lambda: restarted in engine.metrics.render().decode(), timeout_s=30)
            await engine.wait_ready(timeout_s=30)
        assert 'fraudactors_actor_restarts_total{actor="ingestor"}' in engine.metrics.render().decode()
    finally:
        released.set()
        await engine.stop()


async def test_a_batch_the_broker_never_acknowledged_restarts_the_consumer_and_is_decided_again(
        engine_settings: Settings) -> None:
    """A publish that fails for good (its acknowledgement future fails) blocks the partition's
    commits: the watchdog restarts the consumer at once, and the batch's records, fetched again from
    the last commit, are decided."""
    s = engine_settings
    txns = transactions(600, prefix="unacked")
    ids = {t for _, _, t in txns}
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        failed = fail_first_publish(engine.publisher)
        await produce(s, [(k, v) for k, v, _ in txns])
        await wait_until(lambda: engine.ingestor.stalls > 0, timeout_s=30)
        await reader.wait_for(lambda recs: ids <= {orjson.loads(r.value)["transaction_id"] for r in recs},
                              timeout_s=60)
        assert failed and 'fraudactors_actor_restarts_total{actor="ingestor"}' in engine.metrics.render().decode()


async def test_labels_are_matched_to_decisions_per_variant_shadow_included(engine_settings: Settings) -> None:
    variants = {"A": {"version": "v1", "weight": 0.9}, "B": {"version": "v2", "weight": 0.1},
                "S": {"version": "v2", "weight": 0.0, "shadow": True}}
    s = engine_settings.replace(models={"dir": engine_settings.models.dir, "variants": variants})
    engine = Engine(s)
    await engine.start()
    try:
        await engine.wait_ready(timeout_s=60)
        txns = transactions(300, prefix="l")
        async with reading(s, s.topics.predictions) as reader:
            await produce(s, [(k, v) for k, v, _ in txns])
            await reader.wait_for(lambda recs: len(recs) >= 300, timeout_s=30)
        decisions = {d["transaction_id"]: d for d in reader.decisions()}
        await engine.outcomes.flush()
        labels = []
        for i, (key, value, tid) in enumerate(txns[:100]):
            txn = orjson.loads(value)
            labels.append((key, orjson.dumps({"transaction_id": tid, "user_id": txn["user_id"],
                                              "merchant_id": txn["merchant_id"], "is_fraud": i % 4 == 0,
                                              "labeled_at": "2026-12-03T10:00:00+00:00"})))
        labels.append((b"x", b"not a label"))
        await produce(s, labels, topic=s.topics.labels)
        await wait_until(lambda: engine.labels.applied + engine.labels.invalid >= 101, timeout_s=60)
        expected: dict[tuple[str, str], int] = {}
        for i, (_, _, tid) in enumerate(txns[:100]):
            d = decisions[tid]
            fraud = i % 4 == 0
            outcome = ("tp" if fraud else "fp") if d["is_fraud"] else ("fn" if fraud else "tn")
            expected[(d["variant"], outcome)] = expected.get((d["variant"], outcome), 0) + 1
        metrics = engine.metrics.render().decode()
        assert 'fraudactors_fraud_probability_count{variant="S"} 300.0' in metrics, "the shadow scored all"
        assert all(d["variant"] in ("A", "B") for d in decisions.values()), "a shadow never decides"
        shadow = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("fraudactors_label_outcomes_total{") and 'variant="S"' in line)
        assert shadow == 100.0, "every label is matched to the shadow's would-be decision too"
        for (variant, outcome), n in expected.items():
            line = f'fraudactors_label_outcomes_total{{outcome="{outcome}",variant="{variant}"}} {float(n)}'
            assert line in metrics, (line, [m for m in metrics.splitlines() if "label_outcomes" in m])
        assert engine.labels.invalid == 1
    finally:
        await engine.stop()


async def test_full_mailboxes_pause_and_resume_partitions_without_loss(engine_settings: Settings) -> None:
    s = engine_settings.replace(engine={"mailbox_size": 16, "batch_max": 8})
    txns = transactions(3000, prefix="bp")
    async with reading(s, s.topics.predictions) as reader:
        engine = Engine(s)
        await engine.start()
        try:
            await engine.wait_ready(timeout_s=60)
            await produce(s, [(k, v) for k, v, _ in txns])
            await reader.wait_for(lambda recs: len(recs) >= 3000, timeout_s=90)
            assert engine.ingestor.pauses > 0, "a 16-slot mailbox must have filled"
            await wait_until(lambda: not engine.ingestor.paused, timeout_s=10)
        finally:
            await engine.stop()
    ids = [orjson.loads(r.value)["transaction_id"] for r in reader.records]
    assert sorted(ids) == sorted(t for _, _, t in txns), "every record once, none lost while paused"


async def test_hold_policy_waits_for_redis_instead_of_degrading(engine_settings: Settings,
                                                                fresh_redis: Any) -> None:
    s = engine_settings.replace(redis={"url": fresh_redis.url, "on_unavailable": "hold",
                                       "retry_interval_ms": 100})
    async with reading(s, s.topics.predictions) as reader:
        engine = Engine(s)
        await engine.start()
        try:
            await engine.wait_ready(timeout_s=60)
            await asyncio.to_thread(fresh_redis.stop)
            txns = transactions(300, prefix="hold")
            await produce(s, [(k, v) for k, v, _ in txns])
            await wait_until(lambda: engine.features.holding, timeout_s=30)
            assert "feature_store" in engine.readiness()
            await asyncio.to_thread(fresh_redis.start)
            await reader.wait_for(lambda recs: len(recs) >= 300, timeout_s=60)
        finally:
            await engine.stop()
    decisions = reader.decisions()
    assert {d["transaction_id"] for d in decisions} == {t for _, _, t in txns}
    assert not any(d["degraded"] for d in decisions), "hold never decides without the online features"


async def test_a_graceful_stop_commits_what_the_broker_acknowledges_late_before_the_publisher_closes(
        engine_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the broker is slow to acknowledge: the ingestor's drain waits for those
    acknowledgements and commits them. The supervisor stops the children in reverse order and the
    publisher comes after the ingestor: if the ingestor's child ended at the supervisor's cancel
    while its drain went on unwatched, the publisher would close first, give up the pending
    acknowledgements, and their records would be decided again by the next owner."""
    from fraudactors.engine.ingestor import Ingestor
    from fraudactors.engine.publisher import Publisher

    real_confirm, real_shutdown, real_close = Publisher._confirm, Ingestor._shutdown, Publisher._close
    draining, acknowledging = asyncio.Event(), asyncio.Event()
    closing: list[bool] = []

    async def slow_confirm(self: Publisher, messages: Any, futures: Any) -> None:
        await acknowledging.wait()  # the broker acknowledges late
        await real_confirm(self, messages, futures)

    async def shutdown(self: Ingestor, *args: Any) -> None:
        draining.set()
        await real_shutdown(self, *args)

    async def close(self: Publisher, *args: Any) -> None:
        # a publisher closing while they are pending gets them only after its own flush gave up
        closing.append(True)
        asyncio.get_running_loop().call_later(2.5, acknowledging.set)
        await real_close(self, *args)

    monkeypatch.setattr(Publisher, "_confirm", slow_confirm)
    monkeypatch.setattr(Ingestor, "_shutdown", shutdown)
    monkeypatch.setattr(Publisher, "_close", close)
    # No periodic commit in the test's time: only the stop's commit can carry these records. The
    # acknowledgements come 3 s into the stop, before the ingestor's drain gives up (half the
    # shutdown timeout, 4 s) -- unless the publisher began to close before then: 2.5 s after
    # that, when its own flush has given up (a quarter of the shutdown timeout, 2 s).
    s = engine_settings.replace(engine={"commit_interval_ms": 600_000, "shutdown_timeout_s": 8.0})
    engine = Engine(s)
    await engine.start()
    stopped = False
    try:
        await engine.wait_ready(timeout_s=60)
        async with reading(s, s.topics.predictions) as reader:
            ends = await produce(s, [(k, v) for k, v, _ in transactions(300)])
            await reader.wait_for(lambda recs: len(recs) >= 300, timeout_s=30)  # sent, not yet acknowledged
        # The stop's first step ends the fetching; the ingestor is draining by the time the
        # supervisor reaches it (as when the children stopped before it take a while).
        engine.ingestor.stop_fetching()
        await asyncio.wait_for(draining.wait(), 10)
        asyncio.get_running_loop().call_later(3.0, lambda: closing or acknowledging.set())
        await engine.stop()
        stopped = True
    finally:
        if not stopped:
            await engine.stop()
    assert await committed(s) == ends
