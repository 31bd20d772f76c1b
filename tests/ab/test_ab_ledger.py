"""The A/B ledger in a real Redis: bounded by event time, flips taken back, refusals atomic, a
resent flush counted once."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from recorder_faults import flush_failing_while_frozen, flush_until_through
from redis.crc import key_slot

from fraudactors.ab.ledger import (
    AB_ADD,
    CARD_GROUPS,
    Deltas,
    LedgerKeys,
    card_group,
    label_deltas,
    read_window,
)
from fraudactors.settings import Settings

BUCKET_S = 3600


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(settings.redis.url)
    yield c
    keys = [k async for k in c.scan_iter(match=settings.redis.key_prefix + "*")]
    if keys:
        await c.delete(*keys)
    await c.aclose()


async def _add(client: aioredis.Redis, keys: LedgerKeys, deltas: Deltas, keep: int) -> int:
    call_keys, args = deltas.call(keys, BUCKET_S, keep, 86400)
    return int(await client.eval(AB_ADD, len(call_keys), *call_keys, *args))


async def test_the_ledger_keeps_a_window_of_event_time_whatever_the_traffic(
        client: aioredis.Redis, settings: Settings) -> None:
    keys = LedgerKeys(settings.redis.key_prefix)
    keep = 24
    base = 1_700_000_000 // BUCKET_S
    for hour in range(200):  # 200 hours of event time, a backfill: far behind the wall clock
        deltas = Deltas()
        for name in ("d:A/v1", "d:B/v2", "s:S/v2"):
            deltas.add(base + hour, name, "n", 10)
        deltas.saw((base + hour) * BUCKET_S + 1800.0)
        await _add(client, keys, deltas, keep)
    all_keys = [k async for k in client.scan_iter(match=settings.redis.key_prefix + "*")]
    assert len(all_keys) == 3 * keep + 2, "buckets older than the window are deleted (plus index and clock)"
    # a ledger nobody writes any more (a retired key prefix) goes by itself
    assert all([0 < await client.ttl(k) <= 86400 for k in all_keys])
    window = await read_window(client, keys, BUCKET_S, keep * BUCKET_S)
    assert set(window.buckets) == {"d:A/v1", "d:B/v2", "s:S/v2"}
    assert sorted(window.buckets["d:A/v1"]) == list(range(base + 200 - keep, base + 200))
    # a late increment for a bucket that left the window changes nothing
    late = Deltas()
    late.add(base + 10, "d:A/v1", "tp", 1)
    assert await _add(client, keys, late, keep) == 0
    assert not await client.exists(keys.bucket(base + 10, "d:A/v1"))


async def test_a_flipped_label_takes_its_earlier_verdict_back(client: aioredis.Redis, settings: Settings) -> None:
    keys = LedgerKeys(settings.redis.key_prefix)
    bucket = 1_700_000_000 // BUCKET_S
    said = {"d:A/v1": True, "s:S/v2": False}
    group = card_group("u-42")
    first = Deltas()
    first.saw(bucket * BUCKET_S)
    label_deltas(first, bucket, said, is_fraud=True, flipped=False, group=group)
    await _add(client, keys, first, 24)
    fields = await client.hgetall(keys.bucket(bucket, "d:A/v1"))
    assert fields == {b"tp": b"1", b"p:s:S/v2": b"1", b"x:s:S/v2": b"1",
                      f"gc{group}".encode(): b"1", f"gx{group}:s:S/v2".encode(): b"1"}
    assert await client.hgetall(keys.bucket(bucket, "s:S/v2")) == {b"fn": b"1", b"p:d:A/v1": b"1",
                                                                    f"gm{group}".encode(): b"1"}
    flip = Deltas()
    label_deltas(flip, bucket, said, is_fraud=False, flipped=True, group=group)  # a chargeback reversed
    await _add(client, keys, flip, 24)
    fields = await client.hgetall(keys.bucket(bucket, "d:A/v1"))
    assert {k: int(v) for k, v in fields.items()} == {b"tp": 0, b"p:s:S/v2": 0, b"x:s:S/v2": 0, b"fp": 1,
                                                      f"gc{group}".encode(): 0, f"gx{group}:s:S/v2".encode(): 0}
    s_fields = await client.hgetall(keys.bucket(bucket, "s:S/v2"))
    assert {k: int(v) for k, v in s_fields.items()} == {b"fn": 0, b"p:d:A/v1": 0, b"tn": 1,
                                                        f"gm{group}".encode(): 0}


def test_a_cards_group_is_the_same_in_every_process_and_spreads_the_cards() -> None:
    assert card_group("u-42") == zlib.crc32(b"u-42") % CARD_GROUPS  # not hash(): salted per process
    counts = Counter(card_group(f"u-{i}") for i in range(64_000))
    assert set(counts) == set(range(CARD_GROUPS))
    assert max(counts.values()) < 1.2 * 64_000 / CARD_GROUPS


async def test_a_wrong_type_key_is_refused_before_any_write(client: aioredis.Redis, settings: Settings) -> None:
    keys = LedgerKeys(settings.redis.key_prefix)
    bucket = 1_700_000_000 // BUCKET_S
    await client.set(keys.bucket(bucket + 1, "d:B/v2"), "not a hash")
    deltas = Deltas()
    deltas.add(bucket, "d:A/v1", "n", 5)
    deltas.add(bucket + 1, "d:B/v2", "n", 5)
    deltas.saw(bucket * BUCKET_S)
    with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
        await _add(client, keys, deltas, 24)
    assert not await client.exists(keys.bucket(bucket, "d:A/v1"), keys.index, keys.clock)


async def test_a_payload_sent_again_with_its_number_is_applied_once_and_an_unnumbered_call_still_adds(
        client: aioredis.Redis, settings: Settings) -> None:
    """AB_ADD with a writer and a payload number skips a number the writer has applied (a resend
    of a call whose reply was lost) and anything below it; a call without one (an engine from
    before the numbers) adds as it always did."""
    keys = LedgerKeys(settings.redis.key_prefix)
    bucket = 1_700_000_000 // BUCKET_S

    def payload(n: int) -> Deltas:
        deltas = Deltas()
        deltas.add(bucket, "d:A/v1", "n", n)
        deltas.saw(bucket * BUCKET_S)
        return deltas

    async def add(deltas: Deltas, number: int | None) -> int:
        call_keys, args = deltas.call(keys, BUCKET_S, 24, 86400, "w1" if number else None, number)
        return int(await client.eval(AB_ADD, len(call_keys), *call_keys, *args))

    assert await add(payload(1), 1) == 1
    assert await add(payload(1), 1) == -1, "a resend of an applied payload does nothing"
    assert await add(payload(10), 2) == 1
    assert await add(payload(1), 1) == -1, "nor does a stale copy of an older one"
    assert await add(payload(100), None) == 1
    assert await client.hget(keys.bucket(bucket, "d:A/v1"), "n") == b"111"
    assert await client.get(keys.writer("w1")) == b"2"
    assert 0 < await client.ttl(keys.writer("w1")) <= 86400
    assert key_slot(keys.writer("w1").encode()) == key_slot(keys.index.encode()), "one slot: one call on a cluster"


async def test_a_ledger_flush_whose_reply_a_frozen_redis_lost_counts_once_after_its_retry(
        settings: Settings, fresh_redis: Any) -> None:
    """Redis frozen (SIGSTOP) while a ledger flush is on its way: the call times out, and Redis
    runs the request it holds when it thaws (SIGCONT) -- the increments landed, the reply was lost.
    The recorder sends the failed payload again, and whatever was recorded meanwhile after it:
    each increment must count once (before the payload numbers the resend counted it twice, and
    redis-py's own retries of the timed-out call more)."""
    from fraudactors.engine.labels import OutcomeRecorder
    from fraudactors.engine.metrics import EngineMetrics

    recorder = OutcomeRecorder(settings.replace(redis={"url": fresh_redis.url}), EngineMetrics())
    client = recorder.connect()
    probe = aioredis.Redis.from_url(fresh_redis.url)
    bucket = 1_700_000_000 // BUCKET_S
    key = recorder.ledger_keys.bucket(bucket, "d:A/v1")

    def decide(n: int) -> None:
        recorder.deltas.add(bucket, "d:A/v1", "n", n)
        recorder.deltas.saw(bucket * BUCKET_S)

    async def counted() -> int:
        return int(await probe.hget(key, "n") or 0)

    try:
        decide(1)
        await recorder.flush()  # the connection open, the script loaded
        decide(10)
        await flush_failing_while_frozen(recorder, fresh_redis.pid)
        async with asyncio.timeout(10):
            # the request Redis held has run: the reply was lost, not the call (polling Redis: no event)
            while await counted() < 11:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        decide(100)  # recorded while the payload is in doubt: goes in a payload of its own, after it
        await flush_until_through(recorder)
        assert await counted() == 111
        assert not recorder.deltas and recorder._sending is None
        assert await probe.exists(recorder.ledger_keys.writer(recorder._writer))
        await recorder._final_flush(client, ())
        assert not await probe.exists(recorder.ledger_keys.writer(recorder._writer)), \
            "a recorder that stopped with nothing in doubt removes its writer's key"
    finally:
        if recorder._scripts is not None:
            await recorder._final_flush(client, ())
        await probe.aclose()


async def test_an_outcome_flush_whose_reply_a_frozen_redis_lost_lists_each_decision_once(
        settings: Settings, fresh_redis: Any) -> None:
    """The outcome lists' twin of the ledger test above, on one Redis: frozen (SIGSTOP) while an
    outcome flush is on its way, Redis runs the request it holds when it thaws; the flush is sent
    again with the check for an entry already listed. No copy may come from the client itself
    (redis-py's own retries of a timed-out call go out without that check)."""
    from fraudactors.engine.inference import Scored
    from fraudactors.engine.labels import OutcomeRecorder
    from fraudactors.engine.metrics import EngineMetrics
    from fraudactors.features.schema import Transaction, format_timestamp

    recorder = OutcomeRecorder(settings.replace(redis={"url": fresh_redis.url}), EngineMetrics())
    client = recorder.connect()
    users = [f"u{i}" for i in range(8)]

    def decide(first: int) -> None:
        txns = [Transaction(f"t{first + i}", u, "m1", 20.0, "USD", "food", False, 1_700_000_000.0 + first + i,
                            format_timestamp(1_700_000_000.0 + first + i)) for i, u in enumerate(users)]
        recorder.record(txns, [Scored("A", "v1", 0.1, "approve", False, []) for _ in txns])

    try:
        decide(0)
        await recorder.flush()  # the connection open, the scripts loaded
        decide(len(users))
        await flush_failing_while_frozen(recorder, fresh_redis.pid)
        await flush_until_through(recorder)
        for i, user in enumerate(users):
            listed = [entry.split(b"\x1f", 1)[0] for entry in await client.lrange(recorder.keys.outcomes(user), 0, -1)]
            assert listed == [f"t{len(users) + i}".encode(), f"t{i}".encode()], user
    finally:
        await recorder._final_flush(client, ())


def test_a_batch_of_decisions_adds_each_models_count_flags_and_score_bin() -> None:
    """OutcomeRecorder.record tallies a batch once: per bucket and model, the decisions (n), the
    flagged (f) and the histogram of scores (h0..h19: 20 equal bins of [0, 1], 1.0 in the last),
    and remembers what every model said per transaction for its label."""
    from fraudactors.engine.inference import Scored, ShadowScore
    from fraudactors.engine.labels import OutcomeRecorder
    from fraudactors.engine.metrics import EngineMetrics
    from fraudactors.features.schema import Transaction, format_timestamp
    from fraudactors.settings import load_settings

    recorder = OutcomeRecorder(load_settings(env={}, overrides={"ab": {"bucket_s": BUCKET_S}}), EngineMetrics())
    rng = random.Random(3)
    t0 = 1_700_000_000.0
    probabilities = [0.0, 0.05, 0.0499999, 0.95, 0.99, 1.0, *(rng.random() for _ in range(300))]
    txns, scored, expected = [], [], {}

    def add(bucket: int, name: str, p: float, flagged: bool) -> None:
        fields = expected.setdefault((bucket, name), {})
        for key in ("n", *(("f",) if flagged else ()), f"h{min(int(p * 20), 19)}"):
            fields[key] = fields.get(key, 0) + 1

    for i, p in enumerate(probabilities):
        t = t0 + i * 37.0  # three hours: three buckets
        txns.append(Transaction(f"t{i}", f"u{i % 7}", "m", 5.0, "USD", "food", False, t, format_timestamp(t)))
        variant, version = ("A", "v1") if i % 10 else ("B", "v2")
        q = rng.random()
        scored.append(Scored(variant, version, p, "approve", p > 0.5, [], (ShadowScore("S", "v3", q, "review" if q > 0.7 else "approve", q > 0.7),)))
        bucket = int(t // BUCKET_S)
        add(bucket, f"d:{variant}/{version}", p, p > 0.5)
        add(bucket, "s:S/v3", q, q > 0.7)
    recorder.record(txns[:100], scored[:100])
    recorder.record(txns[100:], scored[100:])
    assert recorder.deltas.counts == expected
    assert recorder.deltas.newest == txns[-1].event_time
    remembered = list(recorder._buffer)
    assert remembered[0] == ("u0", f"t0\x1f{int(t0 // BUCKET_S)}\td:B/v2=0,s:S/v3={int(scored[0].shadows[0].is_fraud)}"
                                   f"\t{txns[0].merchant_id}".encode())
    assert [user for user, _ in remembered] == [t.user_id for t in txns]
    for (_, entry), s, txn in zip(remembered, scored, txns, strict=True):
        assert entry.decode().split("\t")[1:] == \
            [f"d:{s.variant}/{s.model_version}={int(s.is_fraud)},s:S/v3={int(s.shadows[0].is_fraud)}", txn.merchant_id]


async def test_each_user_keeps_their_newest_decisions_whatever_the_flush_size(
        client: aioredis.Redis, settings: Settings) -> None:
    """The outcome memory through OutcomeRecorder.flush on a real Redis: a flush larger than one
    script call goes out in several and loses nothing; each user's list keeps the newest
    OUTCOMES_PER_USER entries (a label for an older transaction is unmatched) and expires."""
    from fraudactors.engine.inference import Scored
    from fraudactors.engine.labels import OUTCOMES_PER_USER, OutcomeRecorder
    from fraudactors.engine.metrics import EngineMetrics
    from fraudactors.features.schema import Label, Transaction, format_timestamp

    recorder = OutcomeRecorder(settings, EngineMetrics())
    recorder.connect()
    try:
        t0 = 1_700_000_000.0
        busy = OUTCOMES_PER_USER + 7
        users = ["busy"] * busy + [f"u{i}" for i in range(2_000)]  # far more than a call's entries
        txns = [Transaction(f"t{i}", user, "m", 5.0, "USD", "food", False, t0 + i, format_timestamp(t0 + i))
                for i, user in enumerate(users)]
        recorder.record(txns, [Scored("A", "v1", 0.9, "decline", i % 2 == 0, []) for i in range(len(txns))])
        await recorder.flush()
        assert not recorder._buffer
        labels = [Label(t.transaction_id, t.user_id, "m", True, t.event_time + 86_400) for t in txns]
        said = [s for s, _ in await recorder.lookup(labels)]
        assert [s is None for s in said[:busy]] == [True] * 7 + [False] * OUTCOMES_PER_USER, \
            "the busy user's seven oldest decisions are no longer remembered, the newest are"
        assert all(s is not None for s in said[busy:]), "every other decision is remembered"
        assert [s.flags for s in said[busy:busy + 2] if s] == [{"d:A/v1": (busy % 2 == 0)},
                                                              {"d:A/v1": (busy % 2 == 1)}]
        assert {s.merchant for s in said if s} == {"m"}, "each entry holds the merchant decided at"
        # the lookup of the engines before the merchant was kept (a rollback) finds none of them: it
        # counts their labels as unmatched instead of reading the merchant into the last flag
        previous = """local prefix = ARGV[1] .. '\\t'
for _, entry in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.sub(entry, 1, #prefix) == prefix then return entry end
end
return false"""
        assert await client.eval(previous, 1, recorder.keys.outcomes("u0"), f"t{busy}") is None
        key = recorder.keys.outcomes("busy")
        assert await client.llen(key) == OUTCOMES_PER_USER
        assert 0 < await client.ttl(key) <= settings.redis.ttl_s
        assert await client.llen(recorder.keys.outcomes("u0")) == 1
    finally:
        await recorder._final_flush(recorder._redis, ())


async def test_a_ledger_payload_redis_refuses_is_kept_counted_and_said_once_a_minute(
        client: aioredis.Redis, settings: Settings) -> None:
    """A payload Redis refuses (a key of the ledger's with the wrong type) is sent again as it is at
    every flush, refused again, and what is newer waits behind it. Before, nothing showed it but a
    debug line per try; now each failure is counted by part and kind (the alert's metric) and the
    refusal is logged at error level once a minute. Once the key is mended it is applied, once."""
    from structlog.testing import capture_logs

    from fraudactors.engine.labels import OutcomeRecorder
    from fraudactors.engine.metrics import EngineMetrics

    metrics = EngineMetrics()
    recorder = OutcomeRecorder(settings, metrics)
    redis = recorder.connect()
    bucket = 1_700_000_000 // BUCKET_S
    key = recorder.ledger_keys.bucket(bucket, "d:A/v1")

    def decide(n: int) -> None:
        recorder.deltas.add(bucket, "d:A/v1", "n", n)
        recorder.deltas.saw(bucket * BUCKET_S)

    def failures(kind: str) -> float | None:
        return metrics.registry.get_sample_value(
            "fraudactors_outcome_flush_failures_total", {"part": "ledger", "kind": kind})

    try:
        await client.hset(recorder.ledger_keys.clock, "x", "1")  # the ledger's clock key, wrong type
        decide(1)
        with capture_logs() as logs:
            for n in (10, 100):
                with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
                    await recorder.flush()
                assert recorder._sending is not None and recorder._sending[0] == 1, "kept, with its number"
                decide(n)  # waits behind it
            with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
                await recorder.flush()
        assert failures("wrongtype") == 3
        refused = [e for e in logs if e["event"] == "outcomes_flush_refused"]
        assert [(e["log_level"], e["part"], e["kind"], e["ledger_payload"]) for e in refused] == [
            ("error", "ledger", "wrongtype", 1)], "once a minute per part and kind, not once per try"
        assert "WRONGTYPE" in refused[0]["error"]

        await client.delete(recorder.ledger_keys.clock)  # mended
        await recorder.flush()
        assert int(await client.hget(key, "n") or 0) == 111
        assert recorder._sending is None and not recorder.deltas
        assert failures("wrongtype") == 3 and failures("unavailable") is None
    finally:
        await client.delete(recorder.ledger_keys.clock)
        await recorder._final_flush(redis, ())
