"""The engine on a real 3-master Redis Cluster (Valkey with cluster-enabled, slots assigned from
Python): exactly-once decisions with the offline features, a master lost and back under load,
a slot migrated under load (ASK during the move, MOVED after)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from engine_helpers import produce, reading, transactions, wait_until
from redis.crc import key_slot
from test_engine_state import (
    a_reversal_counts_where_its_first_verdict_did,
    labels_count_at_their_transactions_merchant,
)
from test_parity_stream import compare, offline, online_matrix, running, simulate, stream_through_engine

from fraudactors.features.definition import FEATURE_NAMES, MERCHANT_COUNT_FEATURES
from fraudactors.services.redis_cluster import EmbeddedRedisCluster
from fraudactors.settings import Settings


@pytest.fixture
async def cluster() -> AsyncIterator[EmbeddedRedisCluster]:
    async with EmbeddedRedisCluster(3) as c:
        yield c


def on_cluster(settings: Settings, c: EmbeddedRedisCluster, **engine: object) -> Settings:
    return settings.replace(redis={"url": c.url, "cluster": True, "cluster_nodes": c.startup_nodes},
                            engine={"emit_features": True, **engine})


async def test_twenty_thousand_transactions_on_a_cluster_are_decided_once_with_the_offline_features(
        engine_settings: Settings, cluster: EmbeddedRedisCluster) -> None:
    s = on_cluster(engine_settings, cluster)
    data = simulate(seed=47, n_users=420, n_merchants=200, days=18.0, minimum=20_000)
    decisions = await stream_through_engine(s, data)  # exactly one decision each, none degraded
    exact = [name for name in FEATURE_NAMES if name not in MERCHANT_COUNT_FEATURES]
    assert compare(online_matrix(decisions, data.ids), offline(data), data.ids, exact) == len(data.ids) * len(exact)


async def test_labels_count_at_their_transactions_merchant_on_a_cluster(
        engine_settings: Settings, cluster: EmbeddedRedisCluster) -> None:
    """The outcome lookup (the users' slots) comes before the labels' write (the merchants'
    slots): each script still touches one slot."""
    await labels_count_at_their_transactions_merchant(on_cluster(engine_settings, cluster))


async def test_a_reversal_counts_where_its_first_verdict_did_on_a_cluster(
        engine_settings: Settings, cluster: EmbeddedRedisCluster) -> None:
    """The placements hash is in its user's slot, read with the outcome list in one script and
    written after the label (the merchants' slots) in another."""
    await a_reversal_counts_where_its_first_verdict_did(on_cluster(engine_settings, cluster))


async def outage_under_load(s: Settings, cluster: EmbeddedRedisCluster, lost: list[int], before: int,
                            during: int, after: int) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, float]]:
    """``before`` transactions decided, the masters ``lost`` stopped, ``during`` more, the masters
    back, ``after`` more: (decision by transaction id, the ids in order, actor restarts by actor)."""
    s = on_cluster(s, cluster, emit_features=False).replace(redis={"socket_timeout_ms": 500, "retry_interval_ms": 200})
    txns = transactions(before + during + after, prefix="cl")
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        for n, (lo, hi) in enumerate(((0, before), (before, before + during), (before + during, len(txns)))):
            if n == 2:
                for i in lost:  # back on their ports, as the same nodes with the same slots
                    await cluster.nodes[i].start()
                await cluster.wait_ok()
                await wait_until(lambda: engine.features.up, timeout_s=30)
            await produce(s, [(k, v) for k, v, _ in txns[lo:hi]])
            await reader.wait_for(lambda recs, hi=hi: len(recs) >= hi, timeout_s=60)
            if n == 0:
                for i in lost:  # their slots are unserved
                    await cluster.nodes[i].stop()
        restarts = {sample.labels["actor"]: sample.value
                    for metric in engine.metrics.registry.collect() if metric.name == "fraudactors_actor_restarts"
                    for sample in metric.samples if sample.name.endswith("_total") and sample.value}
    decisions = reader.decisions()
    ids = [t for _, _, t in txns]
    assert Counter(d["transaction_id"] for d in decisions) == Counter(ids), "each decided once"
    return {d["transaction_id"]: d for d in decisions}, ids, restarts


async def test_a_cluster_master_lost_under_load_degrades_then_recovers_and_loses_nothing(
        engine_settings: Settings, cluster: EmbeddedRedisCluster) -> None:
    by_id, ids, restarts = await outage_under_load(engine_settings, cluster, [1], 1000, 2000, 1000)
    assert any(by_id[t]["degraded"] for t in ids[1000:3000]), "decided degraded while a master was gone"
    assert not any(by_id[t]["degraded"] for t in ids[3000:]), "normal again once it is back"
    assert restarts == {}, "a lost master is an outage, not a crash"


async def test_the_whole_cluster_lost_under_load_degrades_without_a_restart_then_recovers(
        engine_settings: Settings, cluster: EmbeddedRedisCluster) -> None:
    """Every master gone: redis-py's cluster client raises ``RedisClusterException`` ("cannot be
    connected"), which is not a ``RedisError``; the engine must take it as the store unavailable
    (degraded decisions, labels and outcomes held), not as a crash of its actors."""
    by_id, ids, restarts = await outage_under_load(engine_settings, cluster, [0, 1, 2], 1000, 1000, 1000)
    assert all(by_id[t]["degraded"] for t in ids[1000:2000]), "degraded while no master answered"
    assert not any(by_id[t]["degraded"] for t in ids[2000:]), "normal again once they are back"
    assert restarts == {}, "an unreachable cluster is an outage, not a crash"


async def test_a_slot_migrated_under_load_is_followed_by_the_client(
        engine_settings: Settings, cluster: EmbeddedRedisCluster) -> None:
    s = on_cluster(engine_settings, cluster)
    data = simulate(seed=53, n_users=300, n_merchants=200, days=10.0, minimum=8_000)
    # the slots of the busiest user shards, all owned by master 0, move to master 2 while streaming
    users = Counter(orjson.loads(v)["user_id"] for _, v in data.transactions)
    from fraudactors.features.keys import KeyLayout

    tags = {KeyLayout.user_tag(u) for u, _ in users.most_common(40)}
    slots = sorted({key_slot(f"{{{tag}}}".encode()) for tag in tags} & set(range(*cluster.slot_range(0))))
    assert slots, "some busy shards live on master 0"
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, data.labels, topic=s.topics.labels)
        await wait_until(lambda: engine.labels.applied >= len(data.labels), timeout_s=60)
        half = len(data.transactions) // 2
        await produce(s, data.transactions[:half])
        feeding = asyncio.create_task(produce(s, data.transactions[half:]))
        moved = 0
        for slot in slots[:4]:
            moved += await cluster.migrate_slot(slot, 0, 2, keys_per_step=5, pause=0.01)
        await feeding
        await reader.wait_for(lambda recs: len(recs) >= len(data.transactions), timeout_s=120)
    assert moved > 0, "keys really moved while the engine was writing them"
    decisions = reader.decisions()
    assert len(decisions) == len(data.transactions) and not any(d["degraded"] for d in decisions)
    exact = [name for name in FEATURE_NAMES if name not in MERCHANT_COUNT_FEATURES]
    assert compare(online_matrix(decisions, data.ids), offline(data), data.ids, exact) == len(data.ids) * len(exact)

