"""The Redis online store against the real embedded Redis: train/serve parity, replay, outages."""

from __future__ import annotations

import itertools
import random
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
import redis.asyncio as aioredis

from fraudactors.errors import FeatureStoreUnavailable
from fraudactors.features.definition import (
    FEATURE_INDEX,
    FEATURE_NAMES,
    MAX_EVENTS,
    MERCHANT_COUNT_FEATURES,
    hour_of,
    transaction_only_features,
)
from fraudactors.features.offline import offline_features
from fraudactors.features.schema import Label, Transaction, format_timestamp
from fraudactors.features.store import OnlineFeatureStore
from fraudactors.services.redis import EmbeddedRedis
from fraudactors.settings import Settings, load_settings
from tests.features import reference_features

PARTITIONS = 12
T0 = 1790812800.0  # 2026-10-01T00:00:00Z
DAY = 86400.0


@pytest.fixture
def store_settings(redis_server: EmbeddedRedis) -> Settings:
    """Settings on the session Redis with a private key prefix (no broker needed here)."""
    return load_settings(env={}, overrides={
        "redis": {"url": redis_server.url, "key_prefix": f"fa-test-{uuid.uuid4().hex[:12]}:",
                  "socket_timeout_ms": 2000}})


@pytest.fixture
async def store(store_settings: Settings) -> AsyncIterator[OnlineFeatureStore]:
    s = OnlineFeatureStore(store_settings)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def generate(seed: int, n: int, n_users: int = 80, n_merchants: int = 30,
             days: float = 45.0) -> tuple[list[Transaction], list[Label]]:
    """A time-ordered dataset with bursts, ties, travel, a heavy user over the event cap, and
    delayed fraud labels (some within the same hour, some duplicated, some non-fraud)."""
    rng = random.Random(seed)
    times = sorted(T0 + rng.random() * days * DAY for _ in range(n - 600))
    users = [rng.randrange(n_users) for _ in times]
    # a card-testing burst and exact ties
    burst_at = T0 + 20 * DAY
    times += [burst_at + i * 7.0 for i in range(200)] + [burst_at + 3 * DAY] * 20
    users += [3] * 200 + [4] * 20
    # a heavy user with more events in 30 days than MAX_EVENTS
    times += [T0 + 5 * DAY + i * 900.0 for i in range(MAX_EVENTS + 124)]
    users += [5] * (MAX_EVENTS + 124)
    order = sorted(range(len(times)), key=lambda i: times[i])
    txns: list[Transaction] = []
    labels: list[Label] = []
    for k, i in enumerate(order):
        t = round(times[i], 3)
        user = users[i]
        merchant = f"m{min(int(rng.expovariate(0.15)), n_merchants - 1)}" if rng.random() < 0.97 else "unknown"
        category = ("grocery", "fuel", "travel", "electronics", "dining")[user % 3 + rng.randrange(3)]
        txn = Transaction(f"t{k}", f"u{user}", merchant, round(rng.lognormvariate(3.5, 1.2), 2) + 0.01,
                          "USD", category, rng.random() < 0.08, t, format_timestamp(t))
        txns.append(txn)
        fraud = (merchant in ("m2", "m7") and rng.random() < 0.2) or rng.random() < 0.02
        if fraud or rng.random() < 0.01:
            delay = rng.choice([rng.uniform(0, 1800), rng.uniform(0, 3 * DAY), rng.uniform(DAY, 20 * DAY)])
            label = Label(txn.transaction_id, txn.user_id, merchant, fraud, t + delay)
            labels.append(label)
            if rng.random() < 0.1:
                labels.append(label)  # redelivered
    labels.sort(key=lambda lb: lb.labeled_at)
    return txns, labels


class LabelFeed:
    """Applies labels to the store as time goes by: before a transaction at ``t`` is scored,
    every label reported in an hour before ``t``'s hour is in Redis (what live feedback gives)."""

    def __init__(self, store: OnlineFeatureStore, labels: Sequence[Label]) -> None:
        self.store = store
        self.labels = labels
        self.next = 0

    async def until(self, t: float) -> None:
        end = self.next
        while end < len(self.labels) and hour_of(self.labels[end].labeled_at) < hour_of(t):
            end += 1
        if end > self.next:
            await self.store.apply_labels(self.labels[self.next:end])
            self.next = end


def partition_of(user_id: str) -> int:
    return zlib.crc32(user_id.encode()) % PARTITIONS


async def stream_interleaved(store: OnlineFeatureStore, txns: Sequence[Transaction], labels: Sequence[Label],
                             seed: int) -> np.ndarray:
    """Per-partition order, batches of varying sizes (spanning at most 6 hours of event time, as
    live batches span milliseconds), partitions interleaved (half the time the one furthest behind,
    else any within 1.5 days of it), labels flowing in between."""
    rng = random.Random(seed)
    queues: dict[int, list[int]] = {}
    for i, t in enumerate(txns):
        queues.setdefault(partition_of(t.user_id), []).append(i)
    heads = dict.fromkeys(queues, 0)
    out = np.full((len(txns), len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    feed = LabelFeed(store, labels)
    max_skew = 0.0
    while heads:
        head = {q: txns[queues[q][heads[q]]].event_time for q in heads}
        earliest = min(head.values())
        close = [q for q in heads if head[q] - earliest < 1.5 * DAY]
        p = min(heads, key=head.__getitem__) if rng.random() < 0.5 else rng.choice(close)
        max_skew = max(max_skew, head[p] - earliest)
        size = rng.choice([1, 1, 2, 3, 5, 8, 17, 40, 120])
        idx = [i for i in queues[p][heads[p]:heads[p] + size] if txns[i].event_time < head[p] + 6 * 3600]
        batch = [txns[i] for i in idx]
        await feed.until(max(t.event_time for t in batch))
        out[idx] = await store.compute(batch, p, idx)  # the global index is a per-partition offset
        heads[p] += len(idx)
        if heads[p] == len(queues[p]):
            del heads[p]
    # partitions really ran apart in event time (and stayed within the store's pruning margins)
    assert 6 * 3600 < max_skew < 7 * DAY
    return out


def assert_parity(online: np.ndarray, offline: np.ndarray, exclude: Sequence[str] = ()) -> None:
    checked = [i for i, name in enumerate(FEATURE_NAMES) if name not in exclude]
    a = online[:, checked]
    b = offline[:, checked]
    bad = a != b  # bit for bit: the store and offline run the same float64 code, then float32
    if bad.any():
        rows, cols = np.nonzero(bad)
        details = [f"row {r} {FEATURE_NAMES[checked[c]]}: online {a[r, c]} offline {b[r, c]}"
                   for r, c in zip(rows[:10], cols[:10], strict=True)]
        pytest.fail(f"{int(bad.sum())} feature values differ:\n" + "\n".join(details))


async def test_parity_interleaved_partitions(store: OnlineFeatureStore) -> None:
    txns, labels = generate(seed=11, n=6000)
    offline = offline_features(txns, labels)
    online = await stream_interleaved(store, txns, labels, seed=5)
    assert not np.isnan(online).any()
    # merchant transaction counts are eventually consistent across partitions (store.py doc)
    assert_parity(online, offline, exclude=MERCHANT_COUNT_FEATURES)
    # the dataset exercises what the parity is about
    col = {name: offline[:, i] for name, i in FEATURE_INDEX.items()}
    assert col["tx_count_30d"].max() == MAX_EVENTS
    assert col["tx_count_10m"].max() > 50
    assert (col["merchant_fraud_count_7d"] > 0).mean() > 0.2
    assert 0 < col["is_new_merchant"].mean() < 1 and 0 < col["intl_changed"].mean() < 1
    # ... and the habit and 24-hour features (state_codec version 3 round trips what they read)
    assert 0 < col["hour_habit_share_30d"].mean() < 1 and 0 < col["amount_rank_30d"].mean() < 1
    assert col["amount_to_median_30d"].max() > 10 and col["tx_count_24h_to_daily_30d"].max() > 10
    assert col["new_merchant_count_24h"].max() > 2 and 0 < (col["new_merchant_amount_24h"] > 0).mean() < 1
    assert col["distinct_merchants_24h"].max() > 5 and col["international_count_24h"].max() > 2


async def test_parity_single_partition_includes_merchant_counts(store: OnlineFeatureStore,
                                                                store_settings: Settings) -> None:
    txns, labels = generate(seed=23, n=5000, days=40.0)
    offline = offline_features(txns, labels)
    rng = random.Random(3)
    feed = LabelFeed(store, labels)
    online = np.empty_like(offline)
    start = 0
    while start < len(txns):
        end = min(len(txns), start + rng.choice([1, 4, 9, 33, 100, 256]))
        await feed.until(txns[end - 1].event_time)
        online[start:end] = await store.compute(txns[start:end], 0, range(start, end))
        start = end
    assert_parity(online, offline)
    assert offline[:, FEATURE_INDEX["merchant_tx_count_30d"]].max() > 300
    # 40 days of hourly buckets were written (all and new customers'); the merchant counts stay bounded
    client = aioredis.Redis.from_url(store_settings.redis.url)
    try:
        blobs = [await client.get(key) async for key in client.scan_iter(match=store.keys.prefix + "{m*}:c:*")]
    finally:
        await client.aclose()
    buckets = [sum(map(len, reference_features.decode_counts(blob))) for blob in blobs]
    entries = [(len(blob) - 1) // reference_features.COUNTS_ENTRY.size for blob in blobs]
    assert len(blobs) > 10 and max(buckets) <= 192 and max(entries) <= 192 + 4 * 256, (max(buckets), max(entries))
    assert max(entries) > 120, "compacted: the strings do not grow with the 40 days"


async def test_same_user_twice_in_a_batch_sees_itself(store: OnlineFeatureStore) -> None:
    a = Transaction("a", "u1", "m", 10.0, "USD", "food", False, T0, format_timestamp(T0))
    b = Transaction("b", "u1", "m", 30.0, "USD", "food", False, T0 + 60, format_timestamp(T0 + 60))
    out = await store.compute([a, b], 0, [0, 1])
    assert out.shape == (2, len(FEATURE_NAMES)) and out.dtype == np.float32
    assert out[1, FEATURE_INDEX["tx_count_1h"]] == 1.0
    assert out[1, FEATURE_INDEX["amount_to_avg_30d"]] == 3.0
    assert out[1, FEATURE_INDEX["merchant_tx_count_24h"]] == 1.0
    assert out[1, FEATURE_INDEX["is_new_merchant"]] == 0.0


async def _snapshot(store: OnlineFeatureStore, store_settings: Settings) -> dict[bytes, object]:
    client = aioredis.Redis.from_url(store_settings.redis.url)
    try:
        data: dict[bytes, object] = {}
        async for key in client.scan_iter(match=store_settings.redis.key_prefix + "*"):
            kind = await client.type(key)
            if kind == b"hash":
                data[key] = await client.hgetall(key)
            elif kind == b"zset":
                data[key] = await client.zrange(key, 0, -1, withscores=True)
            else:
                data[key] = await client.get(key)
            assert await client.ttl(key) > 0, key  # every key carries a TTL
        return data
    finally:
        await client.aclose()


async def test_replayed_batch_is_not_counted_twice(store: OnlineFeatureStore, store_settings: Settings) -> None:
    txns, labels = generate(seed=2, n=900, n_users=10, n_merchants=5, days=3.0)
    await store.apply_labels(labels)
    first = await store.compute(txns[:500], 4, range(500))
    before = await _snapshot(store, store_settings)
    assert before
    again = await store.compute(txns[:500], 4, range(500))  # a crash before the offset commit
    assert await _snapshot(store, store_settings) == before
    # the replay gets exactly the vectors of its first scoring, from the replay log
    assert np.array_equal(again, first)
    assert store.replays_total == 500 and store.replays_inexact_total == 0
    # overlapping replay: the already-applied half is skipped, the rest applied once
    await store.compute(txns[250:700], 4, range(250, 700))
    await store.compute(txns[700:], 4, range(700, 900))
    for user in {t.user_id for t in txns}:
        state = await store.user_state(user)
        assert state is not None
        expected = sorted(t.event_time for t in txns if t.user_id == user)[-MAX_EVENTS:]
        assert list(state.times) == expected
    # and the result equals a clean run
    offline = offline_features(txns, labels)
    fresh = OnlineFeatureStore(store_settings.replace(redis={"key_prefix": store_settings.redis.key_prefix + "x:"}))
    await fresh.open()
    try:
        await fresh.apply_labels(labels)
        clean = await fresh.compute(txns, 4, range(900))
    finally:
        await fresh.close()
    assert_parity(clean, offline)


async def test_labels_are_idempotent(store: OnlineFeatureStore, store_settings: Settings) -> None:
    t = T0 + 10 * DAY
    txn = Transaction("x", "u", "m9", 5.0, "USD", "food", False, t, format_timestamp(t))
    labels = [Label(f"f{i}", "u", "m9", True, t - DAY) for i in range(3)]
    labels.append(Label("ok", "u", "m9", False, t - DAY))
    await store.apply_labels(labels)
    await store.apply_labels(labels[:2])  # redelivered
    out = await store.compute([txn], 0, [0])
    assert out[0, FEATURE_INDEX["merchant_fraud_count_7d"]] == 3.0


async def test_degraded_vector_is_the_new_user_vector(store: OnlineFeatureStore) -> None:
    txns, _ = generate(seed=9, n=700, days=2.0)
    degraded = store.compute_degraded(txns[:50])
    assert degraded.shape == (50, len(FEATURE_NAMES)) and degraded.dtype == np.float32
    expected = np.array([transaction_only_features(t) for t in txns[:50]], dtype=np.float32)
    assert np.array_equal(degraded, expected)
    # equals what the store computes for a user and merchant it has never seen
    fresh = Transaction("n1", "never-seen", "never-seen-m", 12.5, "USD", "food", True, T0, format_timestamp(T0))
    assert np.array_equal(await store.compute([fresh], 0, [0]), store.compute_degraded([fresh]))
    assert store.compute_degraded([]).shape == (0, len(FEATURE_NAMES))


async def test_redis_down_raises_feature_store_unavailable(fresh_redis: object, store_settings: Settings) -> None:
    server = fresh_redis
    url = server.url  # type: ignore[attr-defined]
    s = OnlineFeatureStore(store_settings.replace(redis={"url": url, "socket_timeout_ms": 500}))
    await s.open()
    try:
        txn = Transaction("a", "u", "m", 1.0, "USD", "food", False, T0, format_timestamp(T0))
        await s.compute([txn], 0, [0])
        assert await s.ping()
        server.stop()  # type: ignore[attr-defined]
        assert not await s.ping()
        with pytest.raises(FeatureStoreUnavailable) as info:
            await s.compute([txn], 0, [1])
        assert info.value.retriable
        with pytest.raises(FeatureStoreUnavailable):
            await s.apply_labels([Label("a", "u", "m", True, T0)])
        server.start()  # type: ignore[attr-defined]
        # back by itself (the embedded server is memory-only: the state starts empty again)
        for _ in range(20):
            if await s.ping():
                break
        assert await s.ping()
        out = await s.compute([txn], 0, [2])
        assert out.shape == (1, len(FEATURE_NAMES))
    finally:
        await s.close()


async def test_open_fails_fast_when_redis_is_unreachable(store_settings: Settings) -> None:
    s = OnlineFeatureStore(store_settings.replace(redis={"url": "redis://127.0.0.1:1/0"}))
    with pytest.raises(FeatureStoreUnavailable):
        await s.open()
    assert not await s.ping()
    await s.close()


async def test_peek_scores_like_compute_and_writes_nothing(store: OnlineFeatureStore,
                                                           store_settings: Settings) -> None:
    txns, labels = generate(seed=31, n=900, n_users=12, n_merchants=6, days=4.0)
    await store.apply_labels(labels)
    await store.compute(txns[:800], 1, range(800))
    before = await _snapshot(store, store_settings)
    peeked = await store.peek(txns[800:])
    assert await _snapshot(store, store_settings) == before
    computed = await store.compute(txns[800:], 1, range(800, 900))
    assert np.array_equal(peeked, computed)
    assert store.compute_degraded(txns[:1]).shape == (await store.peek(txns[:1])).shape


async def test_parity_batches_mixing_partitions(store: OnlineFeatureStore, store_settings: Settings) -> None:
    txns, labels = generate(seed=41, n=5000, days=30.0)
    offline = offline_features(txns, labels)
    partitions = [partition_of(t.user_id) for t in txns]
    next_offset = [0] * PARTITIONS
    offsets = []
    for p in partitions:
        offsets.append(next_offset[p])
        next_offset[p] += 1
    rng = random.Random(8)
    feed = LabelFeed(store, labels)
    online = np.empty_like(offline)
    start = 0
    while start < len(txns):
        end = min(len(txns), start + rng.choice([1, 7, 30, 64, 200]))
        await feed.until(txns[end - 1].event_time)
        online[start:end] = await store.compute(txns[start:end], partitions[start:end], offsets[start:end])
        start = end
    # one writer in event-time order: every feature is exact, merchant counts included
    assert_parity(online, offline)
    # a mixed batch replayed after a crash changes nothing
    before = await _snapshot(store, store_settings)
    await store.compute(txns[-300:], partitions[-300:], offsets[-300:])
    assert await _snapshot(store, store_settings) == before
    with pytest.raises(ValueError, match="partitions"):
        await store.compute(txns[:2], [0], offsets[:2])


async def test_out_of_order_arrivals_match_the_definition_in_arrival_order(store: OnlineFeatureStore) -> None:
    """Late events (up to 2 hours out of order) are handled by the same deterministic rules online
    as the definition applied in arrival order, whatever the batch boundaries."""
    from fraudactors.features.definition import (
        MerchantState,
        UserState,
        count_merchant_tx,
        is_new_customer,
        transition,
    )
    from fraudactors.features.offline import merchant_states_from_labels

    txns, labels = generate(seed=77, n=3000, n_users=25, n_merchants=8, days=10.0)
    rng = random.Random(12)
    arrival = sorted(txns, key=lambda t: t.event_time + rng.uniform(0, 2 * 3600))
    assert any(b.event_time < a.event_time for a, b in itertools.pairwise(arrival))
    merchants = merchant_states_from_labels(labels, {t.transaction_id: t.merchant_id for t in txns})
    users: dict[str, UserState] = {}
    expected = []
    for txn in arrival:
        m = merchants.setdefault(txn.merchant_id, MerchantState())
        row, users[txn.user_id] = transition(users.get(txn.user_id), m, txn)
        count_merchant_tx(m, txn.event_time, is_new_customer(row))
        expected.append(row)
    await store.apply_labels(labels)
    online = np.empty((len(arrival), len(FEATURE_NAMES)), dtype=np.float32)
    start = 0
    while start < len(arrival):
        end = min(len(arrival), start + rng.choice([1, 3, 16, 90]))
        online[start:end] = await store.compute(arrival[start:end], 0, range(start, end))
        start = end
    assert_parity(online, np.array(expected, dtype=np.float32))
