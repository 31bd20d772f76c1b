"""State integrity of the online store: fencing, late records, labels, refusals, bounded keys.

Each test names a fault a 24/7 deployment meets and the promise the store keeps under it
(docs/architecture.md, "State and its invariants").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError
from test_features_store import DAY, T0, assert_parity, generate

from fraudactors.engine.features import FeatureStoreActor
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import FeatureStoreRejected, FeatureStoreUnavailable
from fraudactors.features import scripts
from fraudactors.features.definition import FEATURE_INDEX, HISTORY_S, day_of, hour_of
from fraudactors.features.offline import offline_features
from fraudactors.features.redis_client import make_client
from fraudactors.features.schema import Label, Transaction, format_timestamp
from fraudactors.features.store import OnlineFeatureStore
from fraudactors.services.redis import EmbeddedRedis
from fraudactors.services.redis_cluster import EmbeddedRedisCluster
from fraudactors.settings import Settings, load_settings
from tests.features import reference_features

pytestmark = pytest.mark.asyncio


@pytest.fixture
def store_settings(redis_server: EmbeddedRedis) -> Settings:
    return load_settings(env={}, overrides={
        "redis": {"url": redis_server.url, "key_prefix": f"fa-state-{uuid.uuid4().hex[:12]}:",
                  "socket_timeout_ms": 2000}})


@pytest.fixture(params=["one-redis", "cluster"])
def backend_settings(request: pytest.FixtureRequest, store_settings: Settings) -> Settings:
    """The same invariants on one Redis and on a 3-master Redis Cluster."""
    if request.param == "one-redis":
        return store_settings
    cluster: EmbeddedRedisCluster = request.getfixturevalue("redis_cluster")
    return store_settings.replace(redis={"url": cluster.url, "cluster": True,
                                         "cluster_nodes": cluster.startup_nodes})


@pytest.fixture
async def backend_store(backend_settings: Settings) -> AsyncIterator[OnlineFeatureStore]:
    s = OnlineFeatureStore(backend_settings)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def store(store_settings: Settings) -> AsyncIterator[OnlineFeatureStore]:
    s = OnlineFeatureStore(store_settings)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def client(store_settings: Settings) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(store_settings.redis.url)
    try:
        yield c
    finally:
        await c.aclose()


def txn(tid: str, user: str, merchant: str, t: float, amount: float = 20.0) -> Transaction:
    return Transaction(tid, user, merchant, amount, "USD", "food", False, t, format_timestamp(t))


async def snapshot(client: aioredis.Redis, prefix: str) -> dict[bytes, object]:
    data: dict[bytes, object] = {}
    async for key in client.scan_iter(match=prefix + "*"):
        kind = await client.type(key)
        if kind == b"hash":
            data[key] = await client.hgetall(key)
        elif kind == b"zset":
            data[key] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == b"list":
            data[key] = await client.lrange(key, 0, -1)
        else:
            data[key] = await client.get(key)
    return data


async def test_a_former_owner_whose_write_lands_late_cannot_overwrite_or_double_count(
        backend_settings: Settings) -> None:
    """Rebalance while a batch's write is in flight: the new owner claims the partition and
    processes the same records (uncommitted) and more; the former owner's delayed write then
    lands. Every feature still equals the offline computation and no merchant count is doubled."""
    txns, labels = generate(seed=11, n=1200, n_users=25, n_merchants=6, days=4.0)
    txns = txns[:1200]
    old, new = OnlineFeatureStore(backend_settings), OnlineFeatureStore(backend_settings)
    await old.open()
    await new.open()
    try:
        await old.apply_labels(labels)
        claimed = await old.claim(0)
        first = await old.compute(txns[:300], 0, range(300))
        # the former owner reads its next batch; its write is held until after the rebalance
        release = asyncio.Event()
        held = old._write

        async def delayed_write(*args: object, **kwargs: object) -> None:
            await release.wait()
            await held(*args, **kwargs)  # type: ignore[arg-type]

        old._write = delayed_write  # type: ignore[method-assign]
        stale = asyncio.create_task(old.compute(txns[300:700], 0, range(300, 700)))
        await asyncio.sleep(0)
        assert await new.claim(0) > claimed  # the rebalance: a newer epoch
        second = await new.compute(txns[300:700], 0, range(300, 700))  # uncommitted: read again
        third = await new.compute(txns[700:900], 0, range(700, 900))
        release.set()
        await stale  # the former owner's write lands now
        assert old.stale_refused_total > 0, "the stale writer was refused"
        fourth = await new.compute(txns[900:], 0, range(900, 1200))
    finally:
        await old.close()
        await new.close()
    online = np.concatenate([first, second, third, fourth])
    assert_parity(online, offline_features(txns, labels))


async def test_a_record_given_twice_in_one_call_is_decided_and_counted_once(
        backend_store: OnlineFeatureStore) -> None:
    """A revoked worker's batch still queued at the feature actor and its successor's re-fetch of
    the same uncommitted offsets are served by one coalesced call: each repeated record gets its
    first row's vector, and no merchant count takes it twice (the write counts a partition's
    records by their aggregate when none is below the stored high-water offset)."""
    store = backend_store
    txns, labels = generate(seed=13, n=900, n_users=20, n_merchants=4, days=3.0)
    txns = txns[:600]
    await store.apply_labels(labels)
    await store.claim(2)
    first = await store.compute(txns[:200], 2, range(200))
    # offsets 200..329 of the revoked batch, then the successor's 200..399 (one partition, in order)
    both = await store.compute([*txns[200:330], *txns[200:400]], 2, [*range(200, 330), *range(200, 400)])
    assert np.array_equal(both[130:260], both[:130]), "a repeat is the same decision"
    assert store.repeats_total == 130 and store.replays_total == 0
    rest = await store.compute(txns[400:], 2, range(400, 600))
    online = np.concatenate([first, both[130:], rest])
    assert_parity(online, offline_features(txns, labels))


async def test_records_replayed_after_their_write_get_their_first_vectors(
        backend_store: OnlineFeatureStore) -> None:
    store = backend_store
    txns, _ = generate(seed=12, n=700, n_users=20, n_merchants=5, days=2.0)
    txns = txns[:600]
    await store.claim(3)
    a = await store.compute(txns, 3, range(600))
    again = await store.compute(txns[100:400], 3, range(100, 400))  # the new owner's crash replay
    assert np.array_equal(again, a[100:400])
    assert store.replays_inexact_total == 0


async def test_a_record_older_than_the_history_does_not_reset_the_user(backend_store: OnlineFeatureStore) -> None:
    store = backend_store
    stream = [txn(f"s{i}", "u", f"m{i % 3}", T0 + 35 * DAY + i * 3600.0, 10.0 + i) for i in range(40)]
    before = await store.compute(stream[:20], 0, range(20))
    state = await store.user_state("u")
    assert state is not None
    late = txn("late", "u", "m0", T0 + 35 * DAY - HISTORY_S - 10 * DAY, 999.0)  # 40 days before
    scored = await store.compute([late], 0, [20])
    assert store.late_total == 1
    after = await store.user_state("u")
    assert after is not None and after.times == state.times and after.amounts == state.amounts
    # scored from the current state, not as a brand-new user
    assert scored[0, FEATURE_INDEX["tx_count_30d"]] == 20.0
    assert scored[0, FEATURE_INDEX["is_new_merchant"]] == 0.0
    # and the rest of the stream is exactly the stream without it
    rest = await store.compute(stream[20:], 0, range(21, 41))
    assert np.array_equal(np.concatenate([before, rest]), offline_features(stream))


async def test_an_owner_claiming_after_redis_lost_its_epochs_still_fences_the_former_owner(
        store_settings: Settings, client: aioredis.Redis) -> None:
    """Redis restarted empty (or from an older snapshot) while the former owner kept its epoch in
    memory: the partition's next claim must still be newer than that epoch, else the rightful
    owner's writes are refused as stale wherever the former owner wrote after the loss."""
    old, new = OnlineFeatureStore(store_settings), OnlineFeatureStore(store_settings)
    await old.open()
    await new.open()
    try:
        await old.claim(5)
        # an epoch key that expires is one Redis lost: it carries the state TTL like every key
        assert 0 < await client.ttl(old.keys.epoch(5)) <= store_settings.redis.ttl_s
        await old.compute([txn("a0", "u", "m", T0)], 5, [10])
        # the loss, a little later (a restart or a failover takes seconds; a claim in the same
        # second of Redis's clock as the lost one may get an equal epoch)
        await asyncio.sleep(1.05)
        prefix = store_settings.redis.key_prefix
        await client.delete(*[k async for k in client.scan_iter(match=prefix + "*")])
        await old.compute([txn("a1", "u", "m", T0 + 60.0)], 5, [11])  # before the rebalance reaches it
        assert await new.claim(5) > old.epoch(5)  # type: ignore[operator]
        for i in range(4):
            await new.compute([txn(f"b{i}", "u", "m", T0 + 120.0 + i)], 5, [12 + i])
        assert new.stale_refused_total == 0
        state = await new.user_state("u")
        assert state is not None and len(state.times) == 5 and state.offset == 15
    finally:
        await old.close()
        await new.close()


async def test_degraded_records_of_a_partition_not_in_the_first_batch_after_an_outage_keep_their_epoch(
        store_settings: Settings, fresh_redis: Any) -> None:
    """Partitions assigned while Redis is down are claimed when it is back. The first batch after
    the outage comes from one of them; the backlog also holds another's records, which must be
    written under that partition's new epoch too: written as epoch 0 they are refused as a stale
    owner's wherever a former owner wrote the user, and lost (their offsets are committed)."""
    s = store_settings.replace(redis={"url": fresh_redis.url, "socket_timeout_ms": 300,
                                      "retry_interval_ms": 100})
    former = OnlineFeatureStore(s)
    await former.open()
    try:
        await former.claim(2)
        await former.compute([txn("f0", "u", "m", T0), txn("f1", "u", "m", T0 + 60.0)], 2, [0, 1])
    finally:
        await former.close()
    metrics = EngineMetrics()
    async with running_actor(s, metrics) as actor:
        os.kill(fresh_redis.pid, signal.SIGSTOP)  # hung, its data kept
        try:
            await actor.claim(2)  # the rebalance, during the outage: deferred
            await actor.claim(3)
            _, degraded = await actor.compute([txn("d0", "u", "m", T0 + 120.0)], 2, [2])
            assert degraded
        finally:
            os.kill(fresh_redis.pid, signal.SIGCONT)
        await asyncio.wait_for(actor._up.wait(), 30)
        _, degraded = await actor.compute([txn("q0", "other", "m", T0 + 180.0)], 3, [0])
        assert not degraded
        x, degraded = await actor.compute([txn("d1", "u", "m", T0 + 240.0)], 2, [3])
        assert not degraded
        assert actor.store is not None and actor.store.stale_refused_total == 0
        assert x[0, FEATURE_INDEX["tx_count_1h"]] == 3.0, "the degraded record entered the state"


async def test_a_partition_whose_claim_redis_refuses_does_not_degrade_the_others(
        store_settings: Settings, fresh_redis: Any) -> None:
    """Partition 7's epoch key holds something else (Redis refuses its claim whatever we retry).
    Its degraded records from the outage cannot enter the state (dropped, counted); partition
    1's batches after the outage are still written, not degraded with it."""
    s = store_settings.replace(redis={"url": fresh_redis.url, "socket_timeout_ms": 300,
                                      "retry_interval_ms": 100})
    metrics = EngineMetrics()
    async with running_actor(s, metrics) as actor:
        assert actor.store is not None
        client = aioredis.Redis.from_url(fresh_redis.url)
        try:
            await client.hset(actor.store.keys.epoch(7), "not", "an epoch")
        finally:
            await client.aclose()
        os.kill(fresh_redis.pid, signal.SIGSTOP)
        try:
            await actor.claim(1)
            await actor.claim(7)
            _, degraded = await actor.compute([txn("d7", "seven", "m", T0)], 7, [0])
            assert degraded
        finally:
            os.kill(fresh_redis.pid, signal.SIGCONT)
        await asyncio.wait_for(actor._up.wait(), 30)
        for i in range(3):
            _, degraded = await actor.compute([txn(f"o{i}", "one", "m", T0 + 60.0 * (i + 1))], 1, [i])
            assert not degraded
        state = await actor.store.user_state("one")
        assert state is not None and len(state.times) == 3
        assert await actor.store.user_state("seven") is None
        assert 'fraudactors_state_skipped_total{reason="wrongtype"} 1.0' in metrics.render().decode()


async def test_a_hung_redis_degrades_a_batch_before_a_client_with_three_times_the_socket_timeout_gives_up(
        store_settings: Settings, fresh_redis: Any) -> None:
    """SIGSTOP of Redis (a hang): the batch's call times out after socket_timeout_ms, a PING to tell
    a hang from load times out after as long again, and the batch is decided degraded -- before a
    client made like the store's, with three times the timeout and asked at the same moment, gives
    up. Timers of one event loop fire in deadline order, so this is an order of events, not a
    wall-clock bound: a store that waited longer than its setting (or a PING that did) loses."""
    timeout_ms = 300
    s = store_settings.replace(redis={"url": fresh_redis.url, "socket_timeout_ms": timeout_ms,
                                      "retry_interval_ms": 100})
    metrics = EngineMetrics()
    reference = make_client(s, 3 * timeout_ms / 1000.0)
    async with running_actor(s, metrics) as actor:
        try:
            await actor.claim(1)
            _, degraded = await actor.compute([txn("w", "u", "m", T0)], 1, [0])
            assert not degraded
            assert await reference.ping()  # connected before the hang
            order: list[str] = []

            async def reference_ping() -> None:
                with pytest.raises(RedisTimeoutError):
                    await reference.ping()
                order.append("reference gave up")

            async def batch() -> None:
                _, degraded = await actor.compute([txn("h", "u", "m", T0 + 60.0)], 1, [1])
                order.append("degraded" if degraded else "scored")

            os.kill(fresh_redis.pid, signal.SIGSTOP)
            try:
                await asyncio.gather(reference_ping(), batch())
            finally:
                os.kill(fresh_redis.pid, signal.SIGCONT)
        finally:
            await reference.aclose()
        assert order == ["degraded", "reference gave up"]
        assert "fraudactors_feature_store_slow_total 0.0" in metrics.render().decode()  # an outage, not load
        await asyncio.wait_for(actor._up.wait(), 30)


async def test_an_actor_cancelled_while_its_probe_ping_is_answered_still_stops(
        store_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py can answer a PING whose task was cancelled meanwhile and return the reply: the
    CancelledError is lost (seen when an actor stopped just as Redis came back from a hang). The
    probe must stop anyway; before, it marked the store up and waited for the next outage, and the
    actor's stop waited for it for ever."""
    s = store_settings.replace(redis={"retry_interval_ms": 10})
    actor = FeatureStoreActor(s, EngineMetrics())
    ready = Started()
    task = asyncio.create_task(actor.run(ready))
    await asyncio.wait_for(ready.event.wait(), 30)
    assert actor.up
    pinging = asyncio.Event()

    async def answered_despite_the_cancel(_store: OnlineFeatureStore) -> bool:
        pinging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # the reply came in with the cancellation: answered, the cancellation lost
        return True

    monkeypatch.setattr(OnlineFeatureStore, "ping", answered_despite_the_cancel)
    actor._mark_down(FeatureStoreUnavailable("a hang"))  # the probe starts pinging
    await asyncio.wait_for(pinging.wait(), 30)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done, "the actor did not stop"
    assert task.cancelled()


async def test_an_actor_cancelled_while_a_store_call_is_answered_still_stops(
        store_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same lost cancellation on the serving path: a store read answered as the actor is
    stopped. The actor must stop, not wait for its next request."""
    actor = FeatureStoreActor(store_settings, EngineMetrics())
    ready = Started()
    task = asyncio.create_task(actor.run(ready))
    await asyncio.wait_for(ready.event.wait(), 30)
    reading = asyncio.Event()
    real_stage = OnlineFeatureStore.stage

    async def answered_despite_the_cancel(self: OnlineFeatureStore, *args: Any, **kwargs: Any) -> Any:
        reading.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # the reply came in with the cancellation: answered, the cancellation lost
        return await real_stage(self, *args, **kwargs)

    monkeypatch.setattr(OnlineFeatureStore, "stage", answered_despite_the_cancel)
    caller = asyncio.create_task(actor.compute_staged([txn("c0", "u", "m", T0)], 0, [0]))
    await asyncio.wait_for(reading.wait(), 30)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done, "the actor did not stop"
    assert task.cancelled()
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)


async def test_a_label_dated_far_ahead_does_not_age_out_the_marks_that_keep_a_repeat_from_counting(
        store: OnlineFeatureStore) -> None:
    """A merchant's label marks are pruned against its own newest mark, and only past the keep
    time: a mis-dated label of another merchant prunes nothing, and a redelivery of every label
    (at-least-once) still counts each fraud once."""
    t = T0 + 10 * DAY
    labels = [Label(f"t{i}", "u", "m", True, t + i) for i in range(64)]
    assert set(await store.apply_labels(labels[:63])) == {1}
    # the 64th mark of "m" (its prune) in one call with another merchant's label from 2090
    assert await store.apply_labels([labels[63], Label("bad", "u9", "other", True, t + 64 * 365 * DAY)]) == [1, 1]
    assert set(await store.apply_labels(labels)) == {0}, "a redelivered label changed something"
    probe = txn("probe", "u", "m", t + DAY)
    assert (await store.peek([probe]))[0, FEATURE_INDEX["merchant_fraud_count_7d"]] == 64.0


async def test_label_marks_are_pruned_whatever_the_number_of_new_marks_per_call(
        store: OnlineFeatureStore, client: aioredis.Redis) -> None:
    """Marks past the keep time go when a call takes the hash past a multiple of 64, also when it
    adds several at once (it jumps over the multiple): memory stays bounded by the labels of
    the keep time."""
    t = T0
    assert await store.apply_labels([Label("first", "u", "m", True, t)]) == [1]
    for k in range(150):  # two labels per call, 5 days apart: the count is always odd
        at = t + (k + 1) * 5 * DAY
        assert await store.apply_labels([Label(f"a{k}", "u", "m", False, at),
                                         Label(f"b{k}", "u", "m", False, at)]) == [1, 1]
    # 45 days of marks are 9 calls (18 marks); at most 64 more accumulate before the next prune
    assert await client.hlen(store.keys.label_marks("m")) <= 18 + 2 + 64


async def test_the_latest_label_stands_and_a_repeat_changes_nothing(backend_store: OnlineFeatureStore) -> None:
    store = backend_store
    t = T0 + 20 * DAY
    probe = txn("probe", "u", "m", t)

    async def frauds() -> float:
        return float((await store.peek([probe]))[0, FEATURE_INDEX["merchant_fraud_count_7d"]])

    assert await store.apply_labels([Label("x", "u", "m", False, t - 3 * DAY)]) == [1]
    assert await frauds() == 0.0
    assert await store.apply_labels([Label("x", "u", "m", True, t - 2 * DAY)]) == [2]  # chargeback
    assert await frauds() == 1.0
    assert await store.apply_labels([Label("x", "u", "m", True, t - 2 * DAY)]) == [0]  # repeated
    assert await store.apply_labels([Label("x", "u", "m", False, t - 4 * DAY)]) == [0]  # older
    assert await store.apply_labels([Label("x", "u", "m", True, t - DAY)]) == [3]  # confirmed
    assert await frauds() == 1.0
    assert await store.apply_labels([Label("x", "u", "m", False, t - DAY / 2)]) == [2]  # overturned
    assert await frauds() == 0.0
    # offline agrees on the standing verdict
    labels = [Label("y", "u", "m", False, t - 3 * DAY), Label("y", "u", "m", True, t - 2 * DAY),
              Label("y", "u", "m", True, t - 2 * DAY)]
    assert offline_features([probe], labels)[0, FEATURE_INDEX["merchant_fraud_count_7d"]] == 1.0


async def test_the_counts_hashes_of_an_engine_before_the_blob_are_read_and_converted(
        store: OnlineFeatureStore, client: aioredis.Redis) -> None:
    """An upgrade: the merchant counts an engine before the packed blob left in Redis (a hash of
    ``h<hour>`` .. ``o<partition>`` fields) give the same features, replays of their records are not
    counted again, and each merchant's next write replaces its hash by the blob."""
    txns, labels = generate(seed=31, n=1500, n_users=30, n_merchants=6, days=6.0)
    await store.apply_labels(labels)
    first = await store.compute(txns[:700], 0, range(700))
    keys = [key async for key in client.scan_iter(match=store.keys.prefix + "{m*}:c:*")]
    assert len(keys) >= 6
    for key in keys:  # what the engine before wrote: the same counts as hash fields
        tables = reference_features.decode_counts(await client.get(key))
        offsets_key = key.replace(b"}:c:", b"}:o:")
        offsets = {int(p): int(o) for p, o in (await client.hgetall(offsets_key)).items()}
        assert offsets
        offsets[5] = 123  # a partition this test does not feed: its offset moves with the counts
        fields = {f"{kind}{bucket}": count for kind, table in zip(("h", "d", "nh", "nd", "o"), (*tables, offsets),
                                                                   strict=True) for bucket, count in table.items()}
        ttl = await client.ttl(key)
        await client.delete(key, offsets_key)
        await client.hset(key, mapping=fields)  # type: ignore[arg-type]
        await client.expire(key, ttl)
    # one record: its merchant's window sums at one hour, from a hash
    second = await store.compute(txns[700:701], 0, [700])
    # a replay of 101 records and 50 new ones: the hashes' offsets keep the 101 from counting twice
    again = await store.compute(txns[600:751], 0, range(600, 751))
    assert np.array_equal(again[:101], np.concatenate([first[600:], second]))
    # many hours per merchant: the whole hash, or the blob that replaced it
    third = await store.compute(txns[751:], 0, range(751, 1500))
    assert_parity(np.concatenate([first, second, again[101:], third]), offline_features(txns, labels))
    later = {store.keys.merchant_counts(t.merchant_id).encode() for t in txns[700:]}
    assert later and later <= set(keys)
    for key in keys:
        assert await client.type(key) == (b"string" if key in later else b"hash") and await client.ttl(key) > 0
        if key in later:
            assert (await client.hgetall(key.replace(b"}:c:", b"}:o:")))[b"5"] == b"123"
    assert store.corrupt_counts_total == 0


async def test_merchant_counts_that_cannot_be_read_start_afresh_and_refuse_nothing(
        store: OnlineFeatureStore, client: aioredis.Redis) -> None:
    """A counts key holding a string the codec did not write (a bug, a foreign writer): read as no
    counts, counted, and replaced by the batch's counts -- the batch is neither refused nor degraded."""
    one, many = store.keys.merchant_counts("one"), store.keys.merchant_counts("many")
    await client.set(one, b"\x01garbage", ex=3600)
    await client.set(many, b"not a blob at all", ex=3600)
    t = T0 + 3 * DAY
    batch = [txn("a", "u1", "one", t), txn("b", "u2", "many", t), txn("c", "u2", "many", t + 7200)]
    out = await store.compute(batch, 0, range(3))
    assert store.corrupt_counts_total == 2
    count_24h = FEATURE_INDEX["merchant_tx_count_24h"]
    assert out[:, count_24h].tolist() == [0.0, 0.0, 1.0]
    assert reference_features.decode_counts(await client.get(one))[:2] == ({hour_of(t): 1}, {day_of(t): 1})
    assert reference_features.decode_counts(await client.get(many))[0] == {hour_of(t): 1, hour_of(t + 7200): 1}
    assert (await store.peek([txn("d", "u3", "many", t + 7300)]))[0, count_24h] == 2.0
    # the codec's head and length, an entry of no kind: refused by the reader, replaced by the writer
    odd = store.keys.merchant_counts("odd")
    await client.set(odd, b"\x02\x09" + bytes(12), ex=3600)
    out = await store.compute([txn("e", "u4", "odd", t)], 0, [3])
    assert store.corrupt_counts_total == 3 and out[0, count_24h] == 0.0
    assert reference_features.decode_counts(await client.get(odd))[0] == {hour_of(t): 1}
    assert (await store.peek([txn("f", "u5", "odd", t + 60)]))[0, count_24h] == 1.0
    assert store.corrupt_counts_total == 3


async def test_a_key_of_the_wrong_type_refuses_the_whole_write_before_any_of_it(
        store: OnlineFeatureStore, store_settings: Settings, client: aioredis.Redis) -> None:
    good = [txn(f"g{i}", f"ok{i}", "m1", T0 + i) for i in range(5)]
    await store.compute(good, 0, range(5))
    prefix = store_settings.redis.key_prefix
    before = await snapshot(client, prefix)
    await client.rpush(store.keys.merchant_counts("broken"), b"a list")
    batch = [*(txn(f"n{i}", f"ok{i}", "m1", T0 + 100 + i) for i in range(5)), txn("b", "v", "broken", T0 + 200)]
    with pytest.raises(FeatureStoreRejected) as info:
        await store.compute(batch, 0, range(5, 11))
    assert info.value.kind == "wrongtype" and not info.value.retriable
    after = await snapshot(client, prefix)
    del after[store.keys.merchant_counts("broken").encode()]
    assert after == before, "nothing of the refused batch was written"


@pytest.mark.parametrize("increment", [[9, 490_000, 1], [1, "490000", 1], [1, 490_000, "1"], [1, 490_000]])
async def test_a_malformed_count_increment_refuses_the_whole_write_before_any_of_it(
        store: OnlineFeatureStore, store_settings: Settings, client: aioredis.Redis, increment: list[object]) -> None:
    """The write script checks a merchant's increments (kind 1-4, numeric bucket and count, whole
    triplets) before its first write: a bad one refuses the call and writes nothing."""
    await store.compute([txn("g0", "ok0", "m1", T0)], 0, [0])
    prefix = store_settings.redis.key_prefix
    before = await snapshot(client, prefix)
    keys = [*store.keys.merchant_pair("m1"), store.keys.merchant_offsets("m1")]
    plan = {"u": [], "m": [[[[0, 1, 1, 1, *increment]], 192, 0, 0, 0, 0, 0]], "r": [], "s": 8}
    with pytest.raises(aioredis.ResponseError, match="INVALID merchant"):
        await client.eval(scripts.WRITE_BATCH, len(keys), *keys, 60, 0, 1, orjson.dumps(plan),
                          orjson.dumps([[0, 1, 490_000, 20_416, 0]]), b"")
    assert await snapshot(client, prefix) == before


async def test_a_server_out_of_memory_refuses_the_write_up_front(
        store: OnlineFeatureStore, store_settings: Settings, client: aioredis.Redis) -> None:
    await store.compute([txn("a", "u", "m", T0)], 0, [0])
    before = await snapshot(client, store_settings.redis.key_prefix)
    await client.config_set("maxmemory", "1")
    try:
        with pytest.raises(FeatureStoreRejected) as info:
            await store.compute([txn("b", "u", "m", T0 + 60), txn("c", "w", "m2", T0 + 61)], 0, [1, 2])
        assert info.value.kind == "oom", str(info.value)
    finally:
        await client.config_set("maxmemory", "0")
    assert await snapshot(client, store_settings.redis.key_prefix) == before


async def test_a_refused_request_is_degraded_alone_and_the_store_stays_up(
        store_settings: Settings, client: aioredis.Redis) -> None:
    metrics = EngineMetrics()
    async with running_actor(store_settings, metrics) as actor:
        assert actor.store is not None and actor.up
        await client.set(actor.store.keys.user("poisoned"), b"\x07garbage")
        await client.delete(actor.store.keys.user("poisoned"))
        await client.rpush(actor.store.keys.user("poisoned"), b"a list")
        bad = [txn("b1", "poisoned", "m", T0)]
        good = [txn("g1", "fine", "m", T0), txn("g2", "fine", "m", T0 + 1)]
        (_, degraded_bad), (x_good, degraded_good) = await asyncio.gather(
            actor.compute(bad, 1, [0]), actor.compute(good, 2, [0, 1]))
        assert degraded_bad and not degraded_good
        assert x_good[1, FEATURE_INDEX["tx_count_1h"]] == 1.0
        assert actor.up, "a refusal is not an outage"
        text = metrics.render().decode()
        assert 'fraudactors_feature_store_errors_total{kind="wrongtype"} 1.0' in text
        assert 'fraudactors_state_skipped_total{reason="wrongtype"} 1.0' in text


def _failing_writes(store: OnlineFeatureStore, error: BaseException) -> list[int]:
    """The store's next state write raises ``error`` (the read before it went through); the
    writes after it are real. Returns the count of writes tried."""
    real = store._write
    tried: list[int] = []

    async def write(*args: Any) -> None:
        tried.append(1)
        if len(tried) == 1:
            raise error
        await real(*args)

    store._write = write  # type: ignore[method-assign]
    return tried


async def test_a_state_write_that_fails_after_the_features_went_out_is_retried_and_applied_once(
        store_settings: Settings) -> None:
    """The actor hands a batch its features before the state write lands (the caller scores
    meanwhile). That write failing on a broken connection is retried like a failed call: the
    batch's features come back the same, the transaction enters the state once, the store
    stays up."""
    async with running_actor(store_settings, EngineMetrics()) as actor:
        store = actor.store
        assert store is not None and actor.up
        tried = _failing_writes(store, FeatureStoreUnavailable("injected: connection reset"))
        first = [txn("w1", "writer", "m", T0), txn("w2", "writer", "m", T0 + 60.0)]
        X, degraded, written = await actor.compute_staged(first, 0, [0, 1])
        assert not degraded and written is not None
        replaced = await asyncio.wait_for(written, 10)
        assert replaced is not None, "the failed write is reported with the batch's features"
        X_again, degraded_again = replaced
        assert not degraded_again and np.array_equal(X_again, X)
        assert len(tried) == 2 and actor.up
        x, _ = await actor.compute([txn("w3", "writer", "m", T0 + 120.0)], 0, [2])
        assert x[0, FEATURE_INDEX["tx_count_1h"]] == 2.0, "both records entered the state, once"


async def test_a_state_write_refused_after_the_features_went_out_gives_the_batch_degraded_features(
        store_settings: Settings) -> None:
    """Redis refusing the write (out of memory, say) is not an outage: the batch is scored on
    degraded features instead and does not enter the state; the store stays up."""
    metrics = EngineMetrics()
    async with running_actor(store_settings, metrics) as actor:
        store = actor.store
        assert store is not None and actor.up
        _failing_writes(store, FeatureStoreRejected("injected: OOM", "oom"))
        _, degraded, written = await actor.compute_staged([txn("r1", "refused", "m", T0)], 0, [0])
        assert not degraded and written is not None
        replaced = await asyncio.wait_for(written, 10)
        assert replaced is not None
        X_instead, degraded_instead = replaced
        assert degraded_instead
        assert np.array_equal(X_instead, store.compute_degraded([txn("r1", "refused", "m", T0)]))
        assert await store.user_state("refused") is None, "a refused write changes nothing"
        assert actor.up, "a refusal is not an outage"
        assert 'fraudactors_state_skipped_total{reason="oom"} 1.0' in metrics.render().decode()


async def test_a_caller_that_gives_up_on_its_state_write_leaves_the_actor_serving(
        store_settings: Settings) -> None:
    """A worker stopped (revoked, restarted) while its batch's write is in flight cancels what it
    waits on. The write still lands, the actor lives on and serves the next call (it used to die
    setting the result of the cancelled future, and every worker with it)."""
    async with running_actor(store_settings, EngineMetrics()) as actor:
        store = actor.store
        assert store is not None and actor.up
        real, release = store._write, asyncio.Event()

        async def held(*args: Any) -> None:
            await release.wait()
            await real(*args)

        store._write = held  # type: ignore[method-assign]
        _, _, written = await actor.compute_staged([txn("c1", "quitter", "m", T0)], 0, [0])
        assert written is not None
        waiter = asyncio.ensure_future(written)
        await asyncio.sleep(0)
        waiter.cancel()  # awaiting the future itself: cancelling the waiter cancels the future
        await asyncio.gather(waiter, return_exceptions=True)
        assert written.cancelled()
        release.set()
        x, degraded = await asyncio.wait_for(actor.compute([txn("c2", "quitter", "m", T0 + 60.0)], 0, [1]), 10)
        assert not degraded and actor.up
        assert x[0, FEATURE_INDEX["tx_count_1h"]] == 1.0, "the given-up batch's write landed"


async def test_degraded_records_of_a_partition_revoked_during_an_outage_never_enter_the_state(
        store_settings: Settings, fresh_redis: Any) -> None:
    """Redis down: the decided records wait in the backlog for the state. A partition revoked
    meanwhile is the new owner's: its waiting records are dropped (counted as revoked), and a
    batch of it still arriving (a revoked worker's, queued) is scored but not kept. Once Redis is
    back only the partition still owned enters the state."""
    s = store_settings.replace(redis={"url": fresh_redis.url, "socket_timeout_ms": 300,
                                      "retry_interval_ms": 100})
    metrics = EngineMetrics()
    async with running_actor(s, metrics) as actor:
        await actor.claim(0)
        await actor.claim(1)
        await fresh_redis.stop()
        kept = [txn(f"k{i}", "kept-user", "m", T0 + i * 60.0) for i in range(3)]
        moved = [txn(f"r{i}", "moved-user", "m", T0 + i * 60.0) for i in range(3)]
        (_, d0), (_, d1) = await asyncio.gather(actor.compute(kept[:2], 0, [0, 1]), actor.compute(moved[:2], 1, [0, 1]))
        assert d0 and d1, "scored degraded while Redis is down"
        actor.release(1)  # the rebalance: partition 1 is someone else's now
        _, late = await actor.compute(moved[2:], 1, [2])  # a revoked worker's batch, still queued
        _, d0 = await actor.compute(kept[2:], 0, [2])
        assert late and d0
        text = metrics.render().decode()
        assert 'fraudactors_state_skipped_total{reason="revoked"} 2.0' in text
        await fresh_redis.start()
        await asyncio.wait_for(actor._up.wait(), 30)  # the probe found Redis again
        store = actor.store
        assert store is not None
        after = [txn("k3", "kept-user", "m", T0 + 600.0)]
        x, degraded = await actor.compute(after, 0, [3])
        assert not degraded
        assert x[0, FEATURE_INDEX["tx_count_1h"]] == 3.0, "the three degraded records of partition 0 entered"
        assert await store.user_state("moved-user") is None, "nothing of the revoked partition did"


async def test_keys_grow_with_users_and_merchants_not_with_decisions(
        store: OnlineFeatureStore, store_settings: Settings, client: aioredis.Redis) -> None:
    users, merchants = 30, 8
    stream = [txn(f"t{i}", f"u{i % users}", f"m{i % merchants}", T0 + i * 60.0) for i in range(3000)]
    await store.claim(0)
    for start in range(0, 1500, 100):
        await store.compute(stream[start:start + 100], 0, range(start, start + 100))
        store.note_committed(0, start)
    prefix = store_settings.redis.key_prefix

    async def durable_keys() -> list[bytes]:
        return sorted([k async for k in client.scan_iter(match=prefix + "*") if b"}:rl:" not in k])

    half = await durable_keys()
    for start in range(1500, 3000, 100):
        await store.compute(stream[start:start + 100], 0, range(start, start + 100))
        store.note_committed(0, start)
    # one blob per user, the counts and the counted offsets of each merchant, the partition's epoch:
    # 1,500 more decisions added no key (frauds hashes and label marks come with labels, none here)
    assert await durable_keys() == half and len(half) == users + 2 * merchants + 1
    # the replay logs (one per user shard with uncommitted records) hold only what is not committed
    logged = [await client.zcard(key) async for key in client.scan_iter(match=store.keys.prefix + "{u*}:rl:*")]
    assert 0 < sum(logged) <= 200


@contextlib.asynccontextmanager
async def running_actor(settings: Settings, metrics: EngineMetrics) -> AsyncIterator[FeatureStoreActor]:
    """A started feature-store actor (ready even while Redis is down), stopped on exit."""
    actor = FeatureStoreActor(settings, metrics)
    ready = Started()
    task = asyncio.create_task(actor.run(ready))
    try:
        await asyncio.wait_for(ready.event.wait(), 30)
        yield actor
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class Started:
    """A task status whose ``started()`` sets an event."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def started(self, value: object = None) -> None:
        self.event.set()


async def test_users_stored_by_the_former_release_keep_their_history_and_features(
        store: OnlineFeatureStore, client: aioredis.Redis) -> None:
    """An upgrade over stored users: their state_codec v3 blobs (seen-sets as JSON ids) are read,
    every feature of their next transactions equals the offline one, and the write stores v4."""
    import struct

    import orjson

    txns, _ = generate(11, 1_500, days=10.0)
    half = len(txns) // 2
    await store.compute(txns[:half], 0, list(range(half)))
    # rewrite every stored user as the former release wrote it, the seen-sets as the ids themselves
    seen: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for t in txns[:half]:
        merchants, categories = seen.setdefault(t.user_id, ({}, {}))
        for ids, key, cap in ((merchants, t.merchant_id, 64), (categories, t.merchant_category, 32)):
            if key in ids:
                del ids[key]
            elif len(ids) >= cap:
                del ids[next(iter(ids))]
            ids[key] = None
    for user_id, (merchants, categories) in seen.items():
        key = store.keys.user(user_id)
        s = await store.user_state(user_id)
        assert s is not None
        v3 = b"".join((struct.pack("<BBbiIqH", 3, int(s.seen_international),
                                   -1 if s.last_international is None else int(s.last_international),
                                   s.partition, s.epoch, s.offset, len(s.times)),
                       s.times.tobytes(), s.amounts.tobytes(), s.merchant_hashes.tobytes(), s.hours,
                       s.international, s.new_merchant, orjson.dumps([list(merchants), list(categories)])))
        assert (await client.get(key))[:1] == b"\x04"
        await client.set(key, v3)
    online = await store.compute(txns[half:], 0, list(range(half, len(txns))))
    assert store.corrupt_states_total == 0
    assert_parity(online, offline_features(txns)[half:])
    for user_id in {t.user_id for t in txns[half:]}:
        assert (await client.get(store.keys.user(user_id)))[:1] == b"\x04"


@pytest.mark.parametrize("reply", ["MOVED 3999 127.0.0.1:6381", "ASK 3999 127.0.0.1:6381", "TRYAGAIN Multiple keys",
                                   "CLUSTERDOWN The cluster is down", "MASTERDOWN Link with MASTER is down"])
async def test_a_cluster_in_motion_is_an_outage_not_a_refusal(reply: str) -> None:
    """Replies a cluster gives while it moves slots or fails over change on retry: the store must
    keep the batch for later (outage), never decide it degraded and drop its state write (refusal).
    redis-py turns them into its own error classes and strips the reply's first word."""
    from redis._parsers.base import BaseParser

    from fraudactors.features.store import store_error

    assert isinstance(store_error(BaseParser.parse_error(reply), "write"), FeatureStoreUnavailable)


async def test_a_write_a_replica_refuses_as_read_only_is_an_outage_not_a_refusal(
        redis_server: EmbeddedRedis, fresh_redis: Any) -> None:
    """A former master that became a replica (a failover the client has not seen yet) answers
    READONLY: the write is kept for later, as in an outage. Before, it was a refusal: the batch was
    decided degraded and its state write skipped for good, and a label's placement record dropped."""
    from redis.exceptions import ResponseError

    from fraudactors.features.store import store_error

    replica = aioredis.Redis.from_url(fresh_redis.url)
    host, _, port = redis_server.url.removeprefix("redis://").split("/")[0].rpartition(":")
    try:
        await replica.execute_command("REPLICAOF", host, port)
        with pytest.raises(ResponseError) as refused:
            await replica.eval("return redis.call('SET', KEYS[1], '1')", 1, "k")
        assert isinstance(store_error(refused.value, "write"), FeatureStoreUnavailable), refused.value
    finally:
        await replica.execute_command("REPLICAOF", "NO", "ONE")
        await replica.aclose()


async def test_a_redis_demoted_to_a_replica_keeps_the_store_down_until_it_is_a_master_again(
        redis_server: EmbeddedRedis, fresh_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica answers PING but refuses every write (READONLY, an outage): the probe must not
    bring the store up while it is one. Before, each probe's PING brought it up, the next batch
    took it down again (a flap every retry interval: the up gauge and /readyz flickering, and
    FraudactorsFeatureStoreDown never firing)."""
    import fraudactors.features.store as store_module
    from fraudactors.features.redis_client import ping

    probes = 0

    async def counted(client: Any) -> bool:
        nonlocal probes
        probes += 1
        return await ping(client)

    monkeypatch.setattr(store_module, "redis_ping", counted)
    settings = load_settings(env={}, overrides={
        "redis": {"url": fresh_redis.url, "key_prefix": f"fa-replica-{uuid.uuid4().hex[:8]}:",
                  "retry_interval_ms": 20}})
    admin = aioredis.Redis.from_url(fresh_redis.url)
    host, _, port = redis_server.url.removeprefix("redis://").split("/")[0].rpartition(":")
    await admin.execute_command("REPLICAOF", host, port)
    metrics = EngineMetrics()
    try:
        async with running_actor(settings, metrics) as actor:
            async with asyncio.timeout(30):
                while probes < 10 and not actor.up:  # noqa: ASYNC110 (the probe has no event to wait on)
                    await asyncio.sleep(0.01)
            assert not actor.up, "never up while a replica"
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            async with asyncio.timeout(30):
                await actor._up.wait()
            _, degraded = await actor.compute([txn("after", "u-r", "m", T0)], 0, [0])
            assert not degraded
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await admin.aclose()
