"""POST /predict's reads of the online state (``FeatureStoreActor.peek``) against a real Redis: a
flood of them neither fails them nor takes the stream path's connections; past
``http.store_read_wait_ms`` a read that found every ``http.max_store_reads`` slot taken is refused
as busy (a retriable error: 503 on /predict), not answered degraded."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs
from test_features_state import Started, running_actor, txn
from test_features_store import T0

from fraudactors.engine.features import FeatureStoreActor
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import BackpressureTimeout
from fraudactors.features.schema import Transaction
from fraudactors.features.store import OnlineFeatureStore
from fraudactors.services.redis import EmbeddedRedis
from fraudactors.settings import Settings, load_settings

pytestmark = pytest.mark.asyncio

# More /predict reads at once than http.max_connections lets in, and than redis-py's default pool.
FLOOD = 256


@pytest.fixture
def peek_settings(redis_server: EmbeddedRedis) -> Settings:
    # The wait for a read slot is not what these tests are about (one of them sets its own): a
    # slow machine must not turn a queued read into a refusal.
    return load_settings(env={}, overrides={
        "redis": {"url": redis_server.url, "key_prefix": f"fa-peek-{uuid.uuid4().hex[:12]}:",
                  "socket_timeout_ms": 5000},
        "http": {"store_read_wait_ms": 60_000}})


async def test_a_flood_of_predict_reads_is_not_degraded_and_leaves_the_stream_its_connections(
        peek_settings: Settings) -> None:
    """All the reads start before any is answered, and the stream path's calls (a partition claim
    and a batch) are made among them. Before, the reads shared the stream's pool (redis-py's
    default of 100 connections): the reads past it were answered degraded with Redis healthy
    (MaxConnectionsError), and the claim made meanwhile was deferred for the same reason."""
    metrics = EngineMetrics()
    async with running_actor(peek_settings, metrics) as actor:
        assert actor.up
        await actor.compute([txn("seed", "u0", "m", T0, 30.0)], 1, [0])  # a user with history
        with capture_logs() as logs:
            first = [asyncio.create_task(actor.peek([txn(f"p{i}", f"u{i % 8}", "m", T0 + 60 + i)]))
                     for i in range(FLOOD // 2)]
            claim = asyncio.create_task(actor.claim(0))
            batch = asyncio.create_task(actor.compute([txn("s0", "u9", "other", T0 + 30)], 0, [0]))
            rest = [asyncio.create_task(actor.peek([txn(f"p{i}", f"u{i % 8}", "m", T0 + 60 + i)]))
                    for i in range(FLOOD // 2, FLOOD)]
            answers = await asyncio.gather(*first, *rest)
            await claim
            _, degraded = await batch
        assert [i for i, (_, d) in enumerate(answers) if d] == [], "healthy Redis, degraded /predict answers"
        assert not degraded
        assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
        assert any(e["event"] == "partition_claimed" and e["partition"] == 0 for e in logs)
        assert metrics.registry.get_sample_value("fraudactors_feature_store_up") == 1.0
        # the reads saw the state (u0 has one transaction before them), not transaction-only features
        reference = await actor.peek([txn("p0", "u0", "m", T0 + 60)])
        assert np.array_equal(answers[0][0], reference[0])
        assert not np.array_equal(reference[0], actor.compute_degraded([txn("p0", "u0", "m", T0 + 60)]))


async def test_a_predict_read_past_its_wait_is_refused_as_busy_and_counted(
        peek_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """One slot, held by a read Redis has not answered: the next read waits its
    ``store_read_wait_ms`` and is refused (retriable), counted; the stream path is not affected,
    and once the slot is free reads go through again."""
    s = peek_settings.replace(http={"max_store_reads": 1, "store_read_wait_ms": 1})
    metrics = EngineMetrics()
    reading = asyncio.Event()
    answer = asyncio.Event()
    real_peek = OnlineFeatureStore.peek

    async def held(self: OnlineFeatureStore, txns: Sequence[Transaction]) -> np.ndarray:
        if not answer.is_set():
            reading.set()
            await answer.wait()
        return await real_peek(self, txns)

    monkeypatch.setattr(OnlineFeatureStore, "peek", held)
    async with running_actor(s, metrics) as actor:
        first = asyncio.create_task(actor.peek([txn("p0", "u0", "m", T0)]))
        await asyncio.wait_for(reading.wait(), 30)
        with pytest.raises(BackpressureTimeout) as refused:
            await actor.peek([txn("p1", "u1", "m", T0)])
        assert refused.value.retriable
        assert metrics.registry.get_sample_value("fraudactors_predict_store_busy_total") == 1.0
        _, degraded = await actor.compute([txn("s0", "u2", "m", T0)], 0, [0])  # the stream's own pool
        assert not degraded
        answer.set()
        assert (await first)[1] is False
        assert (await actor.peek([txn("p2", "u1", "m", T0)]))[1] is False
        assert metrics.registry.get_sample_value("fraudactors_predict_store_busy_total") == 1.0


async def test_predict_reads_while_the_actor_restarts_are_answered_degraded(peek_settings: Settings) -> None:
    """Between a stop of the feature store actor and its restart (the supervisor's back-off),
    /predict answers from transaction-only features, as while Redis is down. Before, the read
    found no client of its own and raised an AssertionError: a 500 without Retry-After."""
    async with running_actor(peek_settings, EngineMetrics()) as actor:
        assert actor.up
    txns = [txn("r0", "u0", "m", T0)]
    features, degraded = await actor.peek(txns)  # stopped: not yet restarted
    assert degraded
    assert np.array_equal(features, OnlineFeatureStore.compute_degraded(txns))


async def test_a_stop_during_start_up_closes_both_clients(
        peek_settings: Settings, fresh_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped while it opens its clients (Redis frozen: the first reply never comes), the actor
    closes what it opened. Before, the stream path's store and /predict's were opened before the
    part that closes them: a stop there left both clients open."""



    opened: list[OnlineFeatureStore] = []
    closed: list[OnlineFeatureStore] = []
    real_open, real_close = OnlineFeatureStore.open, OnlineFeatureStore.close

    async def open_(self: OnlineFeatureStore) -> None:
        opened.append(self)
        await real_open(self)

    async def close(self: OnlineFeatureStore) -> None:
        closed.append(self)
        await real_close(self)

    monkeypatch.setattr(OnlineFeatureStore, "open", open_)
    monkeypatch.setattr(OnlineFeatureStore, "close", close)
    settings = peek_settings.replace(redis={"url": fresh_redis.url})
    pid = fresh_redis.pid
    assert pid is not None
    actor = FeatureStoreActor(settings, EngineMetrics())
    os.kill(pid, signal.SIGSTOP)
    try:
        task = asyncio.create_task(actor.run(Started()))
        async with asyncio.timeout(30):
            while not opened:  # noqa: ASYNC110 (no event to wait on: the open is inside the actor)
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert opened and {id(s) for s in opened} <= {id(s) for s in closed}, (opened, closed)
    assert len(closed) == 2, "the stream path's store and /predict's are both closed"
