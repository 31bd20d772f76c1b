"""Self-healing: the watchdog restarts a consumer that silently stops; labels feed online accuracy."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from engine_helpers import produce, reading, transactions, wait_until

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
            stalled.set()
            txns = transactions(300, start=200)
            await produce(s, [(k, v) for k, v, _ in txns])
            await wait_until(lambda: engine.ingestor.stalls > 0, timeout_s=30)
            assert "stalled" in engine.readiness().get("consumer", ""), engine.readiness()
            released.set()
            await reader.wait_for(lambda recs: {orjson.loads(r.value)["transaction_id"] for r in recs}
                                  >= {t for _, _, t in txns}, timeout_s=60)
            await engine.wait_ready(timeout_s=30)
        metrics = engine.metrics.render().decode()
        assert 'fraudactors_actor_restarts_total{actor="ingestor"}' in metrics
    finally:
        released.set()
        await engine.stop()


async def test_labels_are_matched_to_decisions_per_variant(engine_settings: Settings) -> None:
    s = engine_settings
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
        for (variant, outcome), n in expected.items():
            line = f'fraudactors_label_outcomes_total{{outcome="{outcome}",variant="{variant}"}} {float(n)}'
            assert line in metrics, (line, [m for m in metrics.splitlines() if "label_outcomes" in m])
        assert engine.labels.invalid == 1
    finally:
        await engine.stop()
