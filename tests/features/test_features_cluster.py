"""The online store on a Redis Cluster whose shape changes under it: a master fails over to its
replica, a master joins and takes a slot, a master hangs. The store must follow without a restart,
keep every event it wrote, and never call such a change a refused write; the outcome memory's
retried flushes list each decision once (docs/operations.md, "Redis Cluster")."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator

import pytest
from recorder_faults import flush_failing_while_frozen, flush_until_through
from redis.crc import key_slot
from test_features_state import Started

from fraudactors.errors import FeatureStoreRejected, FeatureStoreUnavailable
from fraudactors.features.keys import KeyLayout
from fraudactors.features.schema import Transaction, format_timestamp
from fraudactors.features.store import OnlineFeatureStore
from fraudactors.services.redis_cluster import EmbeddedRedisCluster
from fraudactors.settings import Settings, load_settings

pytestmark = pytest.mark.asyncio
T0 = 1_795_000_000.0


@pytest.fixture
async def cluster() -> AsyncIterator[EmbeddedRedisCluster]:
    async with EmbeddedRedisCluster(3) as c:  # a private one: these tests change its shape
        yield c


def on(cluster: EmbeddedRedisCluster) -> Settings:
    return load_settings(env={}, overrides={"redis": {
        "url": cluster.url, "cluster": True, "cluster_nodes": cluster.startup_nodes,
        "key_prefix": f"fa-cluster-{uuid.uuid4().hex[:12]}:", "socket_timeout_ms": 500}})


def txn(i: int, user: str) -> Transaction:
    t = T0 + 60 * i
    return Transaction(f"t{i}", user, "m1", 20.0 + i, "USD", "food", False, t, format_timestamp(t))


def users_on(keys: KeyLayout, cluster: EmbeddedRedisCluster, master: int, n: int) -> list[str]:
    low, high = cluster.slot_range(master)
    return [u for u in (f"u{i}" for i in range(2000)) if low <= key_slot(keys.user(u).encode()) <= high][:n]


async def test_a_master_that_fails_over_to_its_replica_is_followed_without_a_restart(
        cluster: EmbeddedRedisCluster) -> None:
    await cluster.add_replica(1)
    store = OnlineFeatureStore(on(cluster))
    await store.open()
    try:
        await store.claim(0)
        users = users_on(store.keys, cluster, 1, 3)
        await store.compute([txn(i, u) for i, u in enumerate(users)], 0, [0, 1, 2])
        await cluster.nodes[1].stop()
        failures, offset = 0, 3
        for _ in range(120):  # the replica takes over after cluster-node-timeout (2 s)
            try:
                await store.compute([txn(offset, users[0])], 0, [offset])
                break
            except FeatureStoreUnavailable:
                failures += 1
                await asyncio.sleep(0.25)
        else:
            pytest.fail(f"the store still calls the dead master after {failures} tries")
        assert failures > 0  # the master was down for a while: the store did meet the failure
        state = await store.user_state(users[0])
        assert state is not None and len(state.times) == 2  # the replica kept the first event
    finally:
        await store.close()


async def test_a_slot_moved_to_a_master_that_joined_later_is_written_at_the_first_call(
        cluster: EmbeddedRedisCluster) -> None:
    store = OnlineFeatureStore(on(cluster))
    await store.open()
    try:
        await store.claim(0)
        user = users_on(store.keys, cluster, 2, 1)[0]
        await store.compute([txn(0, user)], 0, [0])
        await cluster.add_node()  # joins after the store loaded its scripts on the nodes it knew
        await cluster.migrate_slot(key_slot(store.keys.user(user).encode()), 2, len(cluster.nodes) - 1)
        try:
            await store.compute([txn(1, user)], 0, [1])
        except FeatureStoreRejected as exc:
            pytest.fail(f"a slot's new master was taken for a refused write: {exc}")
        state = await store.user_state(user)
        assert state is not None and len(state.times) == 2
    finally:
        await store.close()


async def test_a_hung_master_is_an_outage_not_a_slow_redis_and_its_end_is_seen(
        cluster: EmbeddedRedisCluster) -> None:
    """One master frozen (SIGSTOP), no replica: the other masters answer a PING, but nearly every
    batch needs the frozen one's slots. Its batches must be decided degraded (an outage), not
    retried for ever as "slow"; when it answers again, the store is up again without a restart."""
    from fraudactors.engine.features import FeatureStoreActor
    from fraudactors.engine.metrics import EngineMetrics

    s = on(cluster).replace(redis={"retry_interval_ms": 100})
    actor = FeatureStoreActor(s, EngineMetrics())
    started = Started()
    task = asyncio.create_task(actor.run(started))
    try:
        await asyncio.wait_for(started.event.wait(), 30)
        assert actor.up
        user = users_on(KeyLayout(s.redis.key_prefix), cluster, 1, 1)[0]
        _, degraded, _ = await actor.compute_staged([txn(0, user)], 0, [0])
        assert not degraded
        pid = cluster.nodes[1].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            _, degraded, _ = await asyncio.wait_for(actor.compute_staged([txn(1, user)], 0, [1]), 60)
            assert degraded and not actor.up
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(actor._up.wait(), 60)
        _, degraded, _ = await actor.compute_staged([txn(2, user)], 0, [2])
        assert not degraded
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_outcome_flush_that_fails_on_a_frozen_master_lists_each_decision_once_after_its_retry(
        cluster: EmbeddedRedisCluster) -> None:
    """One master frozen (SIGSTOP) during an outcome flush: the other masters take their entries,
    the frozen one runs the request it holds when it thaws, and the failed flush is sent again in
    full. Every user's list must hold each decision once (a duplicate takes a real entry's place
    among the 64)."""
    from fraudactors.engine.inference import Scored
    from fraudactors.engine.labels import OutcomeRecorder
    from fraudactors.engine.metrics import EngineMetrics

    recorder = OutcomeRecorder(on(cluster), EngineMetrics())
    client = recorder.connect()
    try:
        users = [u for master in range(3) for u in users_on(recorder.keys, cluster, master, 4)]

        def decide(first: int) -> None:
            txns = [txn(first + i, u) for i, u in enumerate(users)]
            recorder.record(txns, [Scored("A", "v1", 0.1, "approve", False, []) for _ in txns])

        decide(0)
        await recorder.flush()  # connections to every master open, the slot map known
        decide(len(users))
        await flush_failing_while_frozen(recorder, cluster.nodes[1].pid)
        await flush_until_through(recorder)
        for i, user in enumerate(users):
            listed = [entry.split(b"\x1f", 1)[0] for entry in await client.lrange(recorder.keys.outcomes(user), 0, -1)]
            assert listed == [f"t{len(users) + i}".encode(), f"t{i}".encode()], user
    finally:
        await recorder._final_flush(client, ())


async def test_a_batch_on_a_hung_master_fails_after_one_socket_timeout_not_two(cluster: EmbeddedRedisCluster) -> None:
    """The node pipeline times out on a frozen master; the PING that makes the cluster client
    refresh its slot map would time out on the same node too, so it must not be awaited before
    the error goes up. When the master thaws, the store writes to it again."""
    timeout_s = 2.0
    store = OnlineFeatureStore(on(cluster).replace(redis={"socket_timeout_ms": int(timeout_s * 1000)}))
    await store.open()
    try:
        await store.claim(0)
        user = users_on(store.keys, cluster, 1, 1)[0]
        await store.compute([txn(0, user)], 0, [0])  # the node connection is open
        pid = cluster.nodes[1].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(1.5 * timeout_s):  # two timeouts would be 2 * timeout_s
                with pytest.raises(FeatureStoreUnavailable):
                    await store.compute([txn(1, user)], 0, [1])
        finally:
            os.kill(pid, signal.SIGCONT)
        for _ in range(100):
            try:
                await store.compute([txn(1, user)], 0, [1])
                break
            except FeatureStoreUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the store never wrote to the thawed master")
        state = await store.user_state(user)
        assert state is not None and len(state.times) == 2
    finally:
        await store.close()
