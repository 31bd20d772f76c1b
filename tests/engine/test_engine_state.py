"""State integrity through the running engine: event-time guard, keys, exact replays, a hung Redis.

docs/architecture.md ("State and its invariants") names the invariant each test holds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from engine_helpers import (
    BASE_TIME,
    EngineProcess,
    committed,
    engine_env,
    private_topics,
    produce,
    reading,
    running,
    transactions,
    wait_until,
)

from fraudactors.engine.engine import Engine
from fraudactors.features.definition import FEATURE_INDEX, FEATURE_NAMES
from fraudactors.features.keys import KeyLayout
from fraudactors.features.offline import offline_features
from fraudactors.features.redis_client import make_client
from fraudactors.features.schema import Transaction, format_timestamp, parse_label, parse_transaction
from fraudactors.features.store import OnlineFeatureStore
from fraudactors.services.kafka import create_topics, delete_topics
from fraudactors.settings import Settings


def txn_record(tid: str, user: str, merchant: str, t: float, amount: float = 25.0,
               key: bytes | None = None) -> tuple[bytes | None, bytes]:
    obj = {"transaction_id": tid, "user_id": user, "merchant_id": merchant, "amount": amount,
           "merchant_category": "grocery", "timestamp": t}
    return (user.encode() if key is None else key), orjson.dumps(obj)


def vectors(decisions: list[dict[str, Any]], ids: list[str]) -> np.ndarray:
    by_id = {d["transaction_id"]: d for d in decisions}
    return np.array([[by_id[t]["features"][n] for n in FEATURE_NAMES] for t in ids], dtype=np.float32)


async def test_a_record_from_2099_and_a_miskeyed_record_are_dead_letters_and_change_no_state(
        engine_settings: Settings) -> None:
    """One future-dated record followed by 100 normal ones gives exactly the features of the same
    stream without it -- the user's windows and the merchant's buckets survive it."""
    s = engine_settings.replace(engine={"emit_features": True})
    normal = [txn_record(f"n{i}", "u-time", "m-time", BASE_TIME + i * 300.0, 10.0 + i) for i in range(101)]
    records = [normal[0], txn_record("future", "u-time", "m-time", 4_070_908_800.0),  # 2099-01-01
               txn_record("miskeyed", "u-time", "m-time", BASE_TIME + 10.0, key=b"someone-else"),
               *normal[1:]]
    async with running(s), reading(s, s.topics.predictions) as decided, reading(s, s.topics.dlq) as dead:
        await produce(s, records)
        await decided.wait_for(lambda recs: len(recs) >= 101, timeout_s=60)
        await dead.wait_for(lambda recs: len(recs) >= 2, timeout_s=30)
    ids = [f"n{i}" for i in range(101)]
    decisions = decided.decisions()
    assert sorted(d["transaction_id"] for d in decisions) == sorted(ids)
    offline = offline_features([parse_transaction(v) for _, v in normal])
    assert np.array_equal(vectors(decisions, ids), offline), "exactly the stream without the two"
    assert offline[-1, FEATURE_INDEX["tx_count_24h"]] > 0 and offline[-1, FEATURE_INDEX["merchant_tx_count_24h"]] > 0
    errors = {orjson.loads(r.value)["transaction_id"]: dict(r.headers) for r in dead.records}
    assert errors["future"]["stage"] == b"validate" and b"ahead of the clock" in errors["future"]["error"]
    assert errors["miskeyed"]["stage"] == b"validate" and b"user_id" in errors["miskeyed"]["error"]


async def test_a_producer_clock_running_ahead_cannot_walk_the_event_time_past_the_clock(
        engine_settings: Settings) -> None:
    """Records each within the skew of the one before it, one batch each (a producer whose clock
    drifts ahead): only the one within the skew of the wall clock enters the state; the others are
    dead letters, and the records after them get exactly the features of the stream without them."""
    s = engine_settings.replace(engine={"emit_features": True})
    step = 0.7 * s.engine.max_future_skew_s
    async with running(s), reading(s, s.topics.predictions) as decided, reading(s, s.topics.dlq) as dead:
        now = time.time()
        history = [txn_record(f"h{i}", "u-walk", "m-walk", now - 3000.0 + i * 100.0, 10.0 + i) for i in range(20)]
        await produce(s, history)
        await decided.wait_for(lambda recs: len(recs) >= 20, timeout_s=60)
        walk = [txn_record(f"w{k}", "u-walk", "m-walk", now + k * step) for k in range(1, 9)]
        for k, record in enumerate(walk, 1):  # each one decided or dead before the next is sent
            await produce(s, [record])
            await wait_until(lambda k=k: len(decided.records) + len(dead.records) >= 20 + k, timeout_s=30)
        after = [txn_record(f"a{i}", "u-walk", "m-walk", now + step + 10.0 * (i + 1), 50.0) for i in range(3)]
        await produce(s, after)
        await wait_until(lambda: len(decided.records) + len(dead.records) >= 31, timeout_s=30)
    assert sorted(orjson.loads(r.value)["transaction_id"] for r in dead.records) == [f"w{k}" for k in range(2, 9)]
    assert all(dict(r.headers)["stage"] == b"validate" and b"ahead of the clock" in dict(r.headers)["error"]
               for r in dead.records)
    taken = [*history, walk[0], *after]
    ids = [orjson.loads(v)["transaction_id"] for _, v in taken]
    assert np.array_equal(vectors(decided.decisions(), ids), offline_features([parse_transaction(v) for _, v in taken]))


async def test_a_record_replayed_after_its_state_write_gets_exactly_its_first_decision(
        engine_settings: Settings) -> None:
    """kill -9 after the state writes landed, with (almost) nothing committed: the restarted engine
    decides every uncommitted record again, each with the features and probability of its first
    decision."""
    s = engine_settings
    txns = transactions(1500, prefix="r", users=60)
    env = engine_env(s, FRAUDACTORS_ENGINE__EMIT_FEATURES="true")
    first = EngineProcess({**env, "FRAUDACTORS_ENGINE__COMMIT_INTERVAL_MS": "3600000"})  # no periodic commit
    async with reading(s, s.topics.predictions) as reader:
        await first.start()
        try:
            await first.wait_event("engine_ready", timeout_s=60)
            ends = await produce(s, [(k, v) for k, v, _ in txns])
            await reader.wait_for(lambda recs: len(recs) >= 1500, timeout_s=120)
        finally:
            await first.kill()  # SIGKILL
        before = {d["transaction_id"]: d for d in reader.decisions()}
        assert len(before) == 1500
        # a rebalance (slow start under load) may have committed a prefix: those are not replayed
        done = await committed(s)
        replayed = sum(end - done.get(p, 0) for p, end in ends.items())
        assert replayed > 1000, "most records are delivered again"
        second = EngineProcess(env)
        await second.start()
        try:
            await second.wait_event("engine_ready", timeout_s=60)
            await reader.wait_for(lambda recs: len(recs) >= 1500 + replayed, timeout_s=90)
        finally:
            await second.signal(signal.SIGTERM)
            assert await second.wait(timeout_s=30) == 0
    repeats = reader.decisions()[1500:]
    assert len(repeats) == replayed and len({d["transaction_id"] for d in repeats}) == replayed
    volatile = {"decided_at", "latency_ms"}
    for again in repeats:
        first_decision = before[again["transaction_id"]]
        same = {k: v for k, v in again.items() if k not in volatile}
        assert same == {k: v for k, v in first_decision.items() if k not in volatile}, again["transaction_id"]


async def test_a_hung_redis_is_an_outage_its_decisions_go_on_degraded_and_enter_the_state(
        engine_settings: Settings, fresh_redis: Any) -> None:
    """SIGSTOP of Redis (a hang, not a refused connection) mid-stream: the store is marked down and
    decisions go on degraded; after SIGCONT the degraded transactions are applied to the state
    before the user's next one is scored, which counts them. (That the hang is given up on after
    the socket timeout and one PING, not later, is held by the order of events in
    tests/features/test_features_state.py::
    test_a_hung_redis_degrades_a_batch_before_a_client_with_three_times_the_socket_timeout_gives_up.)"""
    timeout_ms = 400
    s = engine_settings.replace(redis={"url": fresh_redis.url, "socket_timeout_ms": timeout_ms,
                                       "retry_interval_ms": 200},
                                engine={"emit_features": True})
    t0 = BASE_TIME + 5000.0
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, [txn_record("warm", "u-hang", "m-hang", t0)])
        await reader.wait_for(lambda recs: len(recs) >= 1, timeout_s=30)
        os.kill(fresh_redis.pid, signal.SIGSTOP)
        try:
            await produce(s, [txn_record(f"h{i}", "u-hang", "m-hang", t0 + 10 + i) for i in range(30)])
            await reader.wait_for(lambda recs: len(recs) >= 31, timeout_s=30)
            assert not engine.features.up, "the hang is an outage: the store is down until Redis answers"
        finally:
            os.kill(fresh_redis.pid, signal.SIGCONT)
        frozen = reader.decisions()[1:]
        assert all(d["degraded"] for d in frozen)
        await wait_until(lambda: engine.features.up, timeout_s=30)
        await produce(s, [txn_record("after", "u-hang", "m-hang", t0 + 100)])
        await reader.wait_for(lambda recs: len(recs) >= 32, timeout_s=30)
        text = engine.metrics.render().decode()
    after = reader.decisions()[-1]
    assert after["transaction_id"] == "after" and not after["degraded"]
    assert after["features"]["tx_count_10m"] == 31.0, "the 30 degraded transactions entered the state"
    assert after["features"]["merchant_tx_count_24h"] == 31.0
    assert "fraudactors_state_backlog_applied_total 30.0" in text


async def test_malformed_labels_are_dead_letters_with_stage_labels(engine_settings: Settings) -> None:
    s = engine_settings
    async with running(s) as engine, reading(s, s.topics.dlq) as dead:
        good = orjson.dumps({"transaction_id": "t1", "user_id": "u1", "merchant_id": "m1",
                             "is_fraud": True, "labeled_at": "2026-11-20T10:00:00+00:00"})
        await produce(s, [(b"u1", b"{not json"), (b"u1", good)], topic=s.topics.labels)
        await dead.wait_for(lambda recs: len(recs) >= 1, timeout_s=60)
        await wait_until(lambda: engine.labels.applied >= 1, timeout_s=30)
        text = engine.metrics.render().decode()
    record = dead.records[0]
    headers = dict(record.headers)
    assert record.value == b"{not json" and headers["stage"] == b"labels"
    assert headers["source_topic"] == s.topics.labels.encode()
    assert 'fraudactors_dlq_total{stage="labels"} 1.0' in text


async def test_labels_dated_ahead_step_by_step_cannot_walk_past_the_clock(engine_settings: Settings) -> None:
    """Labels each within the skew of the one before it, one batch each: only the one within the
    skew of the wall clock is taken (it would otherwise be its merchant's newest mark, and age the
    others out of the dedup); the others are dead letters with stage=labels."""
    s = engine_settings
    step = 0.7 * s.engine.max_future_skew_s
    async with running(s) as engine, reading(s, s.topics.dlq) as dead:
        now = time.time()
        for k in range(1, 7):
            label = orjson.dumps({"transaction_id": f"w{k}", "user_id": "u-walk", "merchant_id": "m-walk",
                                  "is_fraud": True, "labeled_at": now + k * step})
            await produce(s, [(b"u-walk", label)], topic=s.topics.labels)
            await wait_until(lambda k=k: engine.labels.applied + engine.labels.invalid >= k, timeout_s=30)
        assert engine.labels.applied == 1 and engine.labels.invalid == 5
        await dead.wait_for(lambda recs: len(recs) >= 5, timeout_s=30)
    client = aioredis.Redis.from_url(s.redis.url)
    try:
        marks = await client.hkeys(KeyLayout(s.redis.key_prefix).label_marks("m-walk"))
    finally:
        await client.aclose()
    assert sorted(orjson.loads(r.value)["transaction_id"] for r in dead.records) == [f"w{k}" for k in range(2, 7)]
    assert all(dict(r.headers)["stage"] == b"labels" and b"ahead of the clock" in dict(r.headers)["error"]
               for r in dead.records)
    assert marks == [b"lw1"]


async def test_a_label_counts_at_its_transactions_merchant_whatever_merchant_it_names(
        engine_settings: Settings) -> None:
    await labels_count_at_their_transactions_merchant(engine_settings)  # a cluster: test_engine_cluster.py


async def labels_count_at_their_transactions_merchant(s: Settings) -> None:
    """A label counts in the risk of the merchant its transaction was decided at (remembered in the
    user's outcome list): a label without merchant_id does not count at "unknown", one naming
    another merchant does not count there, and a transaction labelled twice under two merchant ids
    counts once. A label whose decision is not remembered counts at the merchant it names, and
    nowhere when it names none; an entry the previous engine wrote (no merchant) still parses. The
    features are the offline ones, which join labels to their transactions."""
    t = BASE_TIME + 7000.0
    decided = [txn_record(f"t-{u}", f"u-{u}", "m-true", t + i) for i, u in enumerate("abc")]
    at = t + 86400.0

    def label(tid: str, user: str, merchant: str | None, labeled_at: float) -> tuple[bytes, bytes]:
        obj: dict[str, Any] = {"transaction_id": tid, "user_id": user, "is_fraud": True, "labeled_at": labeled_at}
        if merchant is not None:
            obj["merchant_id"] = merchant
        return user.encode(), orjson.dumps(obj)

    labels = [label("t-a", "u-a", None, at),  # names no merchant
              label("t-b", "u-b", "m-wrong", at),  # names another
              label("t-c", "u-c", "m-x", at), label("t-c", "u-c", "m-y", at + 60.0),  # twice, two merchants
              label("t-z", "u-z", "m-named", at),  # decided elsewhere: its own merchant
              label("t-q", "u-q", None, at),  # decided elsewhere, names none: nowhere
              label("t-old", "u-old", "m-old", at)]  # the previous engine's outcome entry
    merchants = ["m-true", "unknown", "m-wrong", "m-x", "m-y", "m-named", "m-old"]
    probes = [Transaction(f"p-{m}", "u-probe", m, 5.0, "USD", "grocery", False, t + 3 * 86400.0,
                          format_timestamp(t + 3 * 86400.0)) for m in merchants]
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, decided)
        await reader.wait_for(lambda recs: len(recs) >= 3, timeout_s=30)
        await engine.outcomes.flush()
        client = make_client(s, 5.0)
        try:  # what an engine before the merchant was remembered wrote
            await client.lpush(KeyLayout(s.redis.key_prefix).outcomes("u-old"),
                               f"t-old\t{int(t // s.ab.bucket_s)}\td:A/v1=1".encode())
        finally:
            await client.aclose()
        await produce(s, labels, topic=s.topics.labels)
        await wait_until(lambda: engine.labels.applied >= len(labels), timeout_s=60)
        store = engine.features.store
        assert store is not None
        online = await store.peek(probes)
        text = engine.metrics.render().decode()
    column = FEATURE_INDEX["merchant_fraud_count_7d"]
    assert dict(zip(merchants, online[:, column].tolist(), strict=True)) == {
        "m-true": 3.0, "unknown": 0.0, "m-wrong": 0.0, "m-x": 0.0, "m-y": 0.0, "m-named": 1.0, "m-old": 1.0}
    assert "fraudactors_labels_unplaced_total 1.0" in text and "fraudactors_labels_unmatched_total 1.0" in text
    offline = offline_features([*(parse_transaction(v) for _, v in decided), *probes],
                               [parse_label(v) for _, v in labels])
    assert np.array_equal(online, offline[3:]), "online and offline place the labels alike"


async def test_a_reversal_counts_where_its_first_verdict_did_after_the_decision_is_forgotten(
        engine_settings: Settings) -> None:
    await a_reversal_counts_where_its_first_verdict_did(engine_settings)  # a cluster: test_engine_cluster.py


async def a_reversal_counts_where_its_first_verdict_did(s: Settings) -> None:
    """A transaction's labels count at one merchant, whatever the outcome list remembers by the
    time each comes: a "fraud" placed at the decision's merchant and reversed ("not fraud") after
    the user made OUTCOMES_PER_USER more payments (the decision has left the list) takes the count
    back there, whether the reversal names another merchant or none; a transaction decided
    elsewhere stays at the merchant its first label named. Online equals offline (joined by
    transaction_id), and each reversal is a flip."""
    from fraudactors.engine.labels import OUTCOMES_PER_USER

    t = BASE_TIME + 7000.0
    first = [txn_record("t-a", "u-a", "m-true", t), txn_record("t-b", "u-b", "m-true", t + 1)]
    later = [txn_record(f"t-{u}{i}", f"u-{u}", "m-other", t + 10 + i) for u in "ab" for i in range(OUTCOMES_PER_USER)]
    at = t + 3600.0

    def label(tid: str, user: str, merchant: str | None, fraud: bool, labeled_at: float) -> tuple[bytes, bytes]:
        obj: dict[str, Any] = {"transaction_id": tid, "user_id": user, "is_fraud": fraud, "labeled_at": labeled_at}
        if merchant is not None:
            obj["merchant_id"] = merchant
        return user.encode(), orjson.dumps(obj)

    verdicts = [label("t-a", "u-a", "m-named", True, at), label("t-b", "u-b", None, True, at),
                label("t-z", "u-z", "m-first", True, at)]  # decided elsewhere
    reversals = [label("t-a", "u-a", "m-named", False, at + 86400.0),  # names another merchant
                 label("t-b", "u-b", None, False, at + 86400.0),  # names none
                 label("t-z", "u-z", "m-second", False, at + 86400.0)]  # names another than its first
    merchants = ["m-true", "m-named", "m-first", "m-second"]
    probe_t = t + 3 * 86400.0
    probes = [Transaction(f"p-{m}", "u-probe", m, 5.0, "USD", "grocery", False, probe_t, format_timestamp(probe_t))
              for m in merchants]
    column = FEATURE_INDEX["merchant_fraud_count_7d"]
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, first)
        await reader.wait_for(lambda recs: len(recs) >= len(first), timeout_s=30)
        await engine.outcomes.flush()
        await produce(s, verdicts, topic=s.topics.labels)
        await wait_until(lambda: engine.labels.applied >= len(verdicts), timeout_s=60)
        store = engine.features.store
        assert store is not None
        counted = dict(zip(merchants, (await store.peek(probes))[:, column].tolist(), strict=True))
        assert counted == {"m-true": 2.0, "m-named": 0.0, "m-first": 1.0, "m-second": 0.0}
        await produce(s, later)
        await reader.wait_for(lambda recs: len(recs) >= len(first) + len(later), timeout_s=60)
        await engine.outcomes.flush()
        await produce(s, reversals, topic=s.topics.labels)
        await wait_until(lambda: engine.labels.applied >= len(verdicts) + len(reversals), timeout_s=60)
        online = await store.peek(probes)
        text = engine.metrics.render().decode()
    assert dict(zip(merchants, online[:, column].tolist(), strict=True)) == dict.fromkeys(merchants, 0.0)
    assert "fraudactors_label_flips_total 3.0" in text and "fraudactors_labels_unplaced_total 0.0" in text
    assert "fraudactors_labels_unmatched_total 4.0" in text, "t-z's labels and the reversals: not remembered"
    offline = offline_features([*(parse_transaction(v) for _, v in first + later), *probes],
                               [parse_label(v) for _, v in verdicts + reversals])
    assert np.array_equal(online, offline[-len(probes):]), "online and offline place the labels alike"


async def test_a_rebalance_while_a_write_is_delayed_leaves_every_feature_exact(engine_settings: Settings) -> None:
    """Two engines: the first one's state write is held while a second engine joins and takes half
    of the partitions (the first gives up its batch in hand after its revoke timeout), decides
    their uncommitted records and more; then the held write lands. Fencing refuses it where the new
    owner wrote; afterwards every user feature equals the offline computation and no merchant count
    exceeds it (a doubled count would)."""
    from test_parity_stream import simulate

    s = engine_settings.replace(engine={"emit_features": True, "shutdown_timeout_s": 8.0})
    data = simulate(seed=59, n_users=240, n_merchants=200, days=6.0, minimum=3500)
    n = len(data.transactions)
    first, second, third = data.transactions[:n // 3], data.transactions[n // 3:2 * n // 3], \
        data.transactions[2 * n // 3:]
    async with running(s) as a, reading(s, s.topics.predictions) as reader:
        await produce(s, first)
        await reader.wait_for(lambda recs: len(recs) >= len(first), timeout_s=60)
        store = a.features.store
        assert store is not None
        held, release = asyncio.Event(), asyncio.Event()
        real_write = store._write
        # The held write must hold every partition, so that whichever half the second engine takes
        # was in it: the first engine's feature actor takes nothing from its mailbox until a batch
        # of every partition of the second third is queued, and the write of that call is held.
        mailbox = a.features.mailbox
        real_get_batch = mailbox.get_batch
        gathering, gathered = asyncio.Event(), asyncio.Event()
        partitions = {partition_of(k, s.topics.partitions) for k, _ in second[1:]}

        def queued() -> set[int]:
            return {p for req in mailbox._items for p in req.payload[1]}

        async def gathering_get_batch(max_items: int, linger_s: float) -> list[Any]:
            if not gathered.is_set():
                gathering.set()
                await wait_until(lambda: partitions <= queued(), timeout_s=60)
                gathered.set()
            return await real_get_batch(max_items, linger_s)

        async def delayed_write(*args: Any, **kwargs: Any) -> None:
            if gathered.is_set():
                held.set()
                await release.wait()
            await real_write(*args, **kwargs)

        mailbox.get_batch = gathering_get_batch  # type: ignore[method-assign]
        store._write = delayed_write  # type: ignore[method-assign]
        # The actor has waited in the real get_batch since the first third: one record wakes it,
        # then it gathers.
        await produce(s, second[:1])
        await asyncio.wait_for(gathering.wait(), 30)
        await produce(s, second[1:])
        await asyncio.wait_for(held.wait(), 30)
        b = Engine(s)
        await b.start()
        try:
            await b.wait_ready(timeout_s=90)
            assert b.ingestor.assigned, "the second engine took partitions"
            taken = set(b.ingestor.assigned)
            ids_b = {orjson.loads(v)["transaction_id"] for k, v in second
                     if partition_of(k, s.topics.partitions) in taken}
            await reader.wait_for(lambda recs: ids_b <= {orjson.loads(r.value)["transaction_id"] for r in recs},
                                  timeout_s=90)
            release.set()  # the former owner's write lands now
            await produce(s, third)
            ids_3 = {orjson.loads(v)["transaction_id"] for _, v in third}
            await reader.wait_for(lambda recs: ids_3 <= {orjson.loads(r.value)["transaction_id"] for r in recs},
                                  timeout_s=90)
            stale = a.features.store.stale_refused_total if a.features.store else 0
            died = a.metrics.registry.get_sample_value("fraudactors_actor_restarts_total",
                                                       {"actor": "feature_store"}) or 0.0
        finally:
            await b.stop()
    assert stale > 0, "the held write was refused where the new owner had written"
    # the revoked workers gave up on the held write: that must not take the feature store down
    assert died == 0, "the first engine's feature-store actor died"
    latest = {d["transaction_id"]: d for d in reader.decisions()}
    third_ids = [orjson.loads(v)["transaction_id"] for _, v in third]
    got = vectors(list(latest.values()), third_ids)
    txns = [parse_transaction(v) for _, v in data.transactions]
    expected = offline_features(txns)[2 * n // 3:]
    user_features = [j for j, name in enumerate(FEATURE_NAMES) if not name.startswith("merchant_")]
    assert np.array_equal(got[:, user_features], expected[:, user_features]), "every user feature is exact"
    # Merchant counts: partitions run at their own pace, so a live count may include a later event
    # of another partition; once everything is applied they are exact -- a doubled count is not.
    end = max(t.event_time for t in txns) + 1.0
    probes = [Transaction(f"probe-{m}", f"probe-user-{m}", m, 1.0, "USD", "food", False, end,
                          format_timestamp(end)) for m in sorted({t.merchant_id for t in txns})]
    store = OnlineFeatureStore(s)
    await store.open()
    try:
        online = await store.peek(probes)
    finally:
        await store.close()
    offline_probes = offline_features([*txns, *probes])[len(txns):]
    counts = [FEATURE_NAMES.index(name) for name in ("merchant_tx_count_24h", "merchant_tx_count_7d",
                                                      "merchant_tx_count_30d")]
    assert np.array_equal(online[:, counts], offline_probes[:, counts]), "no merchant count is doubled or lost"


async def test_partitions_handed_over_in_a_rebalance_are_committed_first_and_decided_once(
        engine_settings: Settings) -> None:
    """Before it gives partitions up the engine commits what it decided, so their new owner starts
    after it. With no periodic commit at all (every 10 minutes), a second engine joining and
    taking half the partitions decides nothing twice, and nothing is lost."""
    s = engine_settings.replace(engine={"commit_interval_ms": 600_000})
    first = transactions(1200, prefix="hand-a", users=300)
    second = transactions(1200, start=1200, prefix="hand-b", users=300)
    ids = {t for _, _, t in first + second}
    async with running(s) as a, reading(s, s.topics.predictions) as reader:
        await produce(s, [(k, v) for k, v, _ in first])
        await reader.wait_for(lambda recs: len(recs) >= len(first), timeout_s=60)
        assert a.ingestor.assigned
        b = Engine(s)
        await b.start()
        try:
            await b.wait_ready(timeout_s=90)
            assert b.ingestor.assigned, "the second engine took partitions"
            await produce(s, [(k, v) for k, v, _ in second])
            await reader.wait_for(lambda recs: ids <= {orjson.loads(r.value)["transaction_id"] for r in recs},
                                  timeout_s=90)
        finally:
            await b.stop()
    decided = [orjson.loads(r.value)["transaction_id"] for r in reader.records]
    assert sorted(decided) == sorted(ids), "every transaction decided exactly once across the hand-over"


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2 of the key), as the producer used it."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


async def test_records_fetched_while_an_assignment_is_registered_are_not_lost(engine_settings: Settings) -> None:
    """aiokafka hands a running consumer records of a newly assigned partition before the assignment
    callback has run to its end, and the callback awaits a fencing claim per partition (slow here):
    records fetched meanwhile are routed, never dropped (dropping them lost a partition's records
    when a second engine joined a running one)."""
    s = engine_settings
    txns = transactions(3000, prefix="asg", users=300)
    async with running(s) as a, reading(s, s.topics.predictions) as reader:
        real_claim = a.features.claim

        async def slow_claim(partition: int) -> None:
            await asyncio.sleep(0.5)
            await real_claim(partition)

        a.features.claim = slow_claim  # type: ignore[method-assign]

        async def feed() -> None:
            for start in range(0, len(txns), 100):
                await produce(s, [(k, v) for k, v, _ in txns[start:start + 100]])
                await asyncio.sleep(0.1)  # a steady stream across the rebalances

        feeder = asyncio.create_task(feed())
        b = Engine(s)  # joins: the running engine gives up half its partitions and is assigned the rest
        await b.start()
        try:
            await b.wait_ready(timeout_s=90)
            await feeder
            ids = {t for _, _, t in txns}
            await reader.wait_for(lambda recs: ids <= {orjson.loads(r.value)["transaction_id"] for r in recs},
                                  timeout_s=60)
        finally:
            await b.stop()


async def test_a_replica_left_without_a_partition_is_not_ready_until_it_takes_one_over(
        engine_settings: Settings) -> None:
    """More replicas than partitions: the one the group leaves without a partition answers /readyz
    503 naming only ``partitions`` (SPEC §6: ready only with partitions assigned) while its owner
    answers 200; once the owner stops, it takes the partition over, answers 200 with it and decides
    what comes next."""
    s = private_topics(engine_settings, "standby", 1)
    first = transactions(200, prefix="standby-a", users=50)
    second = transactions(200, start=200, prefix="standby-b", users=50)
    ids = {t for _, _, t in first + second}
    await create_topics(s)
    try:
        async with reading(s, s.topics.predictions) as reader:
            a, b = Engine(s), Engine(s)
            joined = asyncio.Event()
            assign = b.ingestor.assign

            async def assigned_to_b(partitions: list[Any]) -> None:
                await assign(partitions)
                joined.set()  # b is a member of the group: this is its share, empty or not

            b.ingestor.assign = assigned_to_b  # type: ignore[method-assign]
            await a.start()
            try:
                await a.wait_ready(timeout_s=90)
                await b.start()
                try:
                    await asyncio.wait_for(joined.wait(), timeout=90)
                    await wait_until(lambda: sorted([a.ingestor.assigned, b.ingestor.assigned]) == [[], [0]],
                                     timeout_s=60)
                    owner, standby = (a, b) if a.ingestor.assigned else (b, a)
                    # b may still be loading its models (a slow machine): wait for all else to be up
                    await wait_until(lambda: not owner.readiness() and set(standby.readiness()) == {"partitions"},
                                     timeout_s=60)
                    code, _, body = standby.readyz()
                    assert (code, orjson.loads(body)) == (
                        503, {"ready": False, "not_ready": {"partitions": "no partitions assigned"}})
                    code, _, body = owner.readyz()
                    assert (code, orjson.loads(body)) == (200, {"ready": True, "partitions": [0]})
                    await produce(s, [(k, v) for k, v, _ in first])
                    await reader.wait_for(lambda recs: len(recs) >= len(first), timeout_s=60)
                    await owner.stop()
                    await standby.wait_ready(timeout_s=90)
                    code, _, body = standby.readyz()
                    assert (code, orjson.loads(body)) == (200, {"ready": True, "partitions": [0]})
                    await produce(s, [(k, v) for k, v, _ in second])
                    await reader.wait_for(
                        lambda recs: ids <= {orjson.loads(r.value)["transaction_id"] for r in recs}, timeout_s=90)
                finally:
                    await b.stop()
            finally:
                await a.stop()
    finally:
        await delete_topics(s)
    decided = [orjson.loads(r.value)["transaction_id"] for r in reader.records]
    assert sorted(decided) == sorted(ids), "every transaction decided once, before and after the take-over"
