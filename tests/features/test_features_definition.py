"""The feature definition on small hand-computed cases."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from fraudactors.features.definition import (
    FEATURE_INDEX,
    FEATURE_NAMES,
    HISTORY_S,
    MAX_EVENTS,
    MAX_SEEN_MERCHANTS,
    MERCHANT_CATEGORIES,
    MERCHANT_RATE_PRIOR,
    NO_PREVIOUS_TX,
    UNKNOWN_CATEGORY_CODE,
    MerchantState,
    UserState,
    count_merchant_fraud,
    count_merchant_tx,
    entity_hash,
    features_of,
    is_late,
    merchant_features,
    transaction_only_features,
    transition,
)
from fraudactors.features.schema import Transaction, format_timestamp
from fraudactors.sim.population import CATEGORY_NAMES

T0 = 1795899600.0  # 2026-11-28T21:00:00Z, a Saturday
H = 3600.0
D = 86400.0


def txn(t: float, amount: float = 10.0, *, user: str = "u", merchant: str = "m", category: str = "grocery",
        international: bool = False, tid: str = "t") -> Transaction:
    return Transaction(tid, user, merchant, amount, "USD", category, international, t, format_timestamp(t))


def f(vec: list[float], name: str) -> float:
    return vec[FEATURE_INDEX[name]]


def run(events: list[Transaction], state: UserState | None = None,
        merchant: MerchantState | None = None) -> tuple[list[list[float]], UserState]:
    rows = []
    for e in events:
        vec, state = transition(state, merchant, e)
        if merchant is not None:
            count_merchant_tx(merchant, e.event_time)
        rows.append(vec)
    assert state is not None
    return rows, state


def test_feature_names_are_unique_and_vector_matches() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    vec, _ = transition(None, None, txn(T0))
    assert len(vec) == len(FEATURE_NAMES)
    assert all(isinstance(v, float) for v in vec)


def test_transaction_only_block() -> None:
    vec = transaction_only_features(txn(T0 + 2 * H + 5, 99.0, international=True))  # 23:00:05 Saturday
    assert f(vec, "amount") == 99.0
    assert f(vec, "log_amount") == pytest.approx(math.log1p(99.0))
    assert f(vec, "is_international") == 1.0
    assert f(vec, "hour_of_day") == 23.0
    assert f(vec, "day_of_week") == 5.0  # Monday = 0
    assert f(vec, "is_night") == 0.0
    assert f(transaction_only_features(txn(T0 + 4 * H)), "is_night") == 1.0  # 01:00 Sunday
    assert f(transaction_only_features(txn(T0 + 4 * H)), "day_of_week") == 6.0
    assert f(vec, "merchant_category_code") == 0.0  # grocery


def test_night_is_midnight_up_to_but_not_including_six() -> None:
    day0 = (T0 // D) * D
    _, state = run([txn(day0 - 2 * H), txn(day0 - H)])  # a user with history: the compiled window path
    for t, night in [(day0, 1.0), (day0 + 6 * H - 0.001, 1.0), (day0 + 6 * H, 0.0), (day0 + 7 * H, 0.0),
                     (day0 + D - 0.001, 0.0)]:
        assert f(transaction_only_features(txn(t)), "is_night") == night, format_timestamp(t)
        assert f(features_of(state, None, txn(t)), "is_night") == night, format_timestamp(t)


def test_merchant_category_code_is_the_place_in_a_fixed_catalogue() -> None:
    def code(category: str) -> float:
        return f(transaction_only_features(txn(T0, category=category)), "merchant_category_code")

    assert [code(c) for c in MERCHANT_CATEGORIES] == [float(i) for i in range(len(MERCHANT_CATEGORIES))]
    assert code("money_transfer") == 15.0
    # "unknown" (the schema's default) and anything outside the catalogue share one code
    assert code("unknown") == code("Grocery") == code("") == UNKNOWN_CATEGORY_CODE == -1.0
    # every category the simulator emits has its own code
    assert set(CATEGORY_NAMES) <= set(MERCHANT_CATEGORIES)
    # a transaction-only feature: the same with or without the user's history
    events = [txn(T0 + i * H, category="electronics") for i in range(3)]
    rows, _ = run(events)
    assert {f(r, "merchant_category_code") for r in rows} == {10.0}


def test_first_transaction_equals_degraded_vector() -> None:
    e = txn(T0, 42.0, international=True)
    first, _ = transition(None, None, e)
    assert first == transaction_only_features(e)
    assert f(first, "tx_count_30d") == 0.0
    assert f(first, "seconds_since_last_tx") == NO_PREVIOUS_TX
    assert f(first, "amount_to_avg_30d") == 1.0 and f(first, "amount_zscore_30d") == 0.0
    assert f(first, "is_new_merchant") == 1.0 and f(first, "is_new_category") == 1.0
    assert f(first, "is_new_country") == 1.0 and f(first, "intl_changed") == 0.0
    assert f(first, "merchant_fraud_rate_30d") == 0.0
    # the state was applied anyway
    assert transition(None, None, replace(e, is_international=False))[0] == transaction_only_features(
        replace(e, is_international=False))


def test_window_boundaries_are_half_open() -> None:
    # earlier events at exactly t-1h (excluded from 1h), just inside 1h, 23h59 ago, 7d ago, 29d ago
    t = T0 + 40 * D
    history = [t - 29 * D, t - 7 * D, t - (24 * H - 1), t - H, t - H + 0.001]
    amounts = [1.0, 2.0, 4.0, 8.0, 16.0]
    events = [txn(ts, a) for ts, a in zip(history, amounts, strict=True)]
    rows, state = run([*events, txn(t, 100.0)])
    vec = rows[-1]
    assert f(vec, "tx_count_10m") == 0.0
    assert f(vec, "tx_count_1h") == 1.0 and f(vec, "amount_sum_1h") == 16.0
    assert f(vec, "tx_count_24h") == 3.0 and f(vec, "amount_sum_24h") == 28.0
    assert f(vec, "tx_count_7d") == 3.0  # exactly 7 days ago is out of (t-7d, t]
    assert f(vec, "tx_count_30d") == 5.0 and f(vec, "amount_sum_30d") == 31.0
    avg = 31.0 / 5
    std = math.sqrt(sum(a * a for a in amounts) / 5 - avg * avg)
    assert f(vec, "amount_avg_30d") == pytest.approx(avg)
    assert f(vec, "amount_std_30d") == pytest.approx(std)
    assert f(vec, "amount_to_avg_30d") == pytest.approx(100.0 / avg)
    assert f(vec, "amount_zscore_30d") == pytest.approx((100.0 - avg) / std)
    assert f(vec, "seconds_since_last_tx") == pytest.approx(H - 0.001)
    # the current transaction is not in its own windows but is in the state
    assert state.times[-1] == t and len(state.times) == 6


def test_zscore_uses_a_std_floor() -> None:
    rows, _ = run([txn(T0, 50.0), txn(T0 + 60, 50.0), txn(T0 + 120, 80.0)])
    assert f(rows[-1], "amount_std_30d") == 0.0
    assert f(rows[-1], "amount_zscore_30d") == pytest.approx(30.0)  # (80-50)/max(0, 1)


def test_history_is_pruned_to_30_days_and_capped() -> None:
    _, state = run([txn(T0, 1.0), txn(T0 + 30 * D, 2.0)])
    assert list(state.times) == [T0 + 30 * D]  # exactly 30 days older than the newest: out
    events = [txn(T0 + i, 1.0) for i in range(MAX_EVENTS + 40)]
    rows, state = run(events)
    assert len(state.times) == MAX_EVENTS and state.times[0] == T0 + 40
    assert f(rows[-1], "tx_count_30d") == MAX_EVENTS  # saturates at the cap (offline too)


def test_a_record_exactly_30_days_older_than_the_newest_is_not_late() -> None:
    """Late means strictly older than the newest event minus 30 days: a record at exactly that time
    is scored at its own time (no earlier event left in its windows) and applied (its merchant is
    seen); one a millisecond older is scored at the newest event and leaves the state as it was."""
    newest = T0 + 40 * D
    _, state = run([txn(newest - 10 * D), txn(newest)])
    edge = newest - HISTORY_S
    assert not is_late(state, edge) and is_late(state, edge - 0.001)

    late_vec = features_of(state, None, txn(edge - 0.001, merchant="older"))
    assert f(late_vec, "tx_count_30d") == 2.0 and f(late_vec, "seconds_since_last_tx") == 0.0
    late_vec, state = transition(state, None, txn(edge - 0.001, merchant="older"))
    assert f(late_vec, "tx_count_30d") == 2.0 and entity_hash("older") not in state.merchants

    assert f(features_of(state, None, txn(edge, merchant="edge")), "tx_count_30d") == 0.0
    vec, state = transition(state, None, txn(edge, merchant="edge"))
    assert f(vec, "tx_count_30d") == 0.0 and f(vec, "seconds_since_last_tx") == NO_PREVIOUS_TX
    assert entity_hash("edge") in state.merchants
    assert list(state.times) == [newest - 10 * D, newest]  # applied, then pruned at once (30 days old)


def test_new_merchant_category_country_flags() -> None:
    rows, _ = run([
        txn(T0, merchant="a", category="food"),
        txn(T0 + 1, merchant="a", category="food"),
        txn(T0 + 2, merchant="b", category="food"),
        txn(T0 + 3, merchant="c", category="travel", international=True),
        txn(T0 + 4, merchant="c", category="travel", international=True),
        txn(T0 + 5, merchant="a", category="food"),
    ])
    assert [f(r, "is_new_merchant") for r in rows] == [1, 0, 1, 1, 0, 0]
    assert [f(r, "is_new_category") for r in rows] == [1, 0, 0, 1, 0, 0]
    assert [f(r, "is_new_country") for r in rows] == [0, 0, 0, 1, 0, 0]
    assert [f(r, "intl_changed") for r in rows] == [0, 0, 0, 1, 0, 1]


def test_seen_merchants_are_a_bounded_lru() -> None:
    events = [txn(T0 + i, merchant=f"m{i}") for i in range(MAX_SEEN_MERCHANTS)]
    events.append(txn(T0 + 100, merchant="m0"))  # refresh m0: m1 is now the oldest
    events.append(txn(T0 + 101, merchant="new"))  # evicts m1
    _, state = run(events)
    assert len(state.merchants) == MAX_SEEN_MERCHANTS
    assert entity_hash("m0") in state.merchants and entity_hash("m1") not in state.merchants
    assert f(features_of(state, None, txn(T0 + 200, merchant="m1")), "is_new_merchant") == 1.0
    assert f(features_of(state, None, txn(T0 + 200, merchant="m0")), "is_new_merchant") == 0.0


def test_out_of_order_event_only_sees_its_past() -> None:
    _, state = run([txn(T0, 1.0), txn(T0 + 2 * H, 2.0)])
    late, state = transition(state, None, txn(T0 + H, 4.0))
    assert f(late, "tx_count_24h") == 1.0 and f(late, "amount_sum_24h") == 1.0
    assert f(late, "seconds_since_last_tx") == H
    assert list(state.times) == [T0, T0 + H, T0 + 2 * H] and list(state.amounts) == [1.0, 4.0, 2.0]
    nxt, _ = transition(state, None, txn(T0 + 2 * H + 10, 8.0))
    assert f(nxt, "tx_count_1h") == 1.0 and f(nxt, "amount_sum_1h") == 2.0
    assert f(nxt, "tx_count_24h") == 3.0 and f(nxt, "amount_sum_24h") == 7.0


def test_merchant_counts_use_event_hour_and_day_buckets() -> None:
    m = MerchantState()
    day0 = (T0 // D) * D
    for t in [day0 - 31 * D, day0 - 29 * D, day0 - 6 * D, day0 - H, day0 + 5, day0 + H, day0 + H + 5]:
        count_merchant_tx(m, t)
    vec = features_of(None, m, txn(day0 + H + 10))  # hour 1 of day D
    assert f(vec, "merchant_tx_count_24h") == 4.0  # hours [H-23, H]: day0-1h, day0+5, two in hour 1
    assert f(vec, "merchant_tx_count_7d") == 5.0  # days [D-6, D]
    assert f(vec, "merchant_tx_count_30d") == 6.0  # days [D-29, D]: day D-31 is out


def test_merchant_new_customers_use_the_same_buckets() -> None:
    """New customers (``is_new_merchant``) in hours [H-23, H] against their 30-day daily average, and
    the 30-day frauds per new customer."""
    m = MerchantState()
    assert merchant_features(m, T0)[-2:] == merchant_features(None, T0)[-2:] == (1.0, 0.0)
    day0 = (T0 // D) * D
    for t, new in [(day0 - 31 * D, True), (day0 - 29 * D, True), (day0 - 6 * D, False), (day0 - H, True),
                   (day0 + 5, True), (day0 + H, False), (day0 + H + 5, True)]:
        count_merchant_tx(m, t, new)
    count_merchant_fraud(m, day0 - 2 * D)
    vec = features_of(None, m, txn(day0 + H + 10))
    # 24 h: day0-1h, day0+5, day0+1h+5 (3); 30 d: day D-29 and those three (4)
    assert f(vec, "merchant_new_customer_24h_to_daily_30d") == pytest.approx((3 + 1) / (4 / 30 + 1))
    assert f(vec, "merchant_fraud_per_new_customer_30d") == pytest.approx(1 / (4 + MERCHANT_RATE_PRIOR))
    # the window cache follows later hours and new counts like a fresh computation
    count_merchant_tx(m, day0 + 3 * H, True)
    fresh = MerchantState(m.tx_hours.copy(), m.tx_days.copy(), m.fraud_hours.copy(), m.fraud_days.copy(),
                          m.new_hours.copy(), m.new_days.copy())
    assert merchant_features(m, day0 + 5 * H) == merchant_features(fresh, day0 + 5 * H)


def test_fraud_labels_count_from_the_hour_after_they_are_reported() -> None:
    day0 = (T0 // D) * D
    t = day0 + 10 * H + 30 * 60  # 10:30 on day D
    m = MerchantState()
    count_merchant_fraud(m, t - 30 * 60 - 1)  # 09:59:59 today: counts
    count_merchant_fraud(m, t - 60)  # 10:29 today, same hour: not yet
    count_merchant_fraud(m, t + 60)  # after the transaction: never
    count_merchant_fraud(m, day0 - 1)  # yesterday: counts
    count_merchant_fraud(m, day0 - 7 * D + 5)  # day D-7: in 7d
    count_merchant_fraud(m, day0 - 8 * D + 5)  # day D-8: only in 30d
    count_merchant_fraud(m, day0 - 31 * D + 5)  # out of both
    for _ in range(10):
        count_merchant_tx(m, day0 - D)
    vec = features_of(None, m, txn(t))
    assert f(vec, "merchant_fraud_count_7d") == 3.0
    assert f(vec, "merchant_fraud_count_30d") == 4.0
    assert f(vec, "merchant_fraud_rate_7d") == pytest.approx(3.0 / (10 + MERCHANT_RATE_PRIOR))
    assert f(vec, "merchant_fraud_rate_30d") == pytest.approx(4.0 / (10 + MERCHANT_RATE_PRIOR))
    # an hour later (11:30) the 10:29 and 10:31 labels count too
    assert f(features_of(None, m, txn(t + H)), "merchant_fraud_count_7d") == 5.0


def test_the_30_day_fraud_rate_divides_by_the_30_day_transactions() -> None:
    day0 = (T0 // D) * D
    t = day0 + 10 * H
    m = MerchantState()
    for days_back, n in [(1, 2), (6, 1), (8, 3), (20, 1), (29, 1), (30, 4)]:  # day D-30 is out of both
        for _ in range(n):
            count_merchant_tx(m, day0 - days_back * D + 5)
    count_merchant_fraud(m, day0 - 2 * D)  # in 7d and 30d
    count_merchant_fraud(m, day0 - 10 * D)  # in 30d only
    count_merchant_fraud(m, day0 - 20 * D)  # in 30d only
    vec = features_of(None, m, txn(t))
    assert f(vec, "merchant_tx_count_7d") == 3.0 and f(vec, "merchant_tx_count_30d") == 8.0
    assert f(vec, "merchant_fraud_count_7d") == 1.0 and f(vec, "merchant_fraud_count_30d") == 3.0
    assert f(vec, "merchant_fraud_rate_7d") == 1.0 / (3 + MERCHANT_RATE_PRIOR)
    assert f(vec, "merchant_fraud_rate_30d") == 3.0 / (8 + MERCHANT_RATE_PRIOR)


def test_counting_into_the_cached_window_at_other_hours_and_days_keeps_it_exact() -> None:
    """The window sums are cached at the hour of the last lookup; a transaction counted at another
    hour or day (late, or another partition's) enters each window only when inside it."""
    day0 = (T0 // D) * D
    t = day0 + 10 * H + 30 * 60  # 10:30 on day D
    m = MerchantState()
    count_merchant_tx(m, t - H)
    merchant_features(m, t)  # caches the sums at t's hour
    for at, new in [(day0 + 10 * H + 5, False),  # t's own hour
                    (t - 23 * H, True),  # hour H-23: the oldest of the 24 h window
                    (t - 24 * H, True),  # hour H-24: out of 24 h, in 7 d and 30 d
                    (day0 - 6 * D + 5, False),  # day D-6: the oldest of 7 d
                    (day0 - 7 * D + 5, False),  # day D-7: out of 7 d, in 30 d
                    (day0 - 29 * D + 5, True),  # day D-29: the oldest of 30 d
                    (day0 - 30 * D + 5, True)]:  # day D-30: out of every window
        count_merchant_tx(m, at, new)
    cached = merchant_features(m, t)
    fresh = merchant_features(MerchantState(m.tx_hours.copy(), m.tx_days.copy(), m.fraud_hours.copy(),
                                            m.fraud_days.copy(), m.new_hours.copy(), m.new_days.copy()), t)
    assert cached == fresh
    assert cached[:3] == (3.0, 5.0, 7.0)  # c24, c7, c30
    assert cached[7] == (1 + 1.0) / (3 / 30.0 + 1.0)  # new customers: 1 in 24 h, 3 in 30 d


def test_state_dependent_features_are_deterministic() -> None:
    events = [txn(T0 + i * 137.0, 5.0 + i, merchant=f"m{i % 3}") for i in range(50)]
    rows_a, _ = run(events, merchant=MerchantState())
    rows_b, _ = run(events, merchant=MerchantState())
    assert rows_a == rows_b


def test_merchant_window_cache_equals_a_fresh_computation() -> None:
    rng = random.Random(1)
    m = MerchantState()
    t = T0
    for _ in range(3000):
        t += rng.expovariate(1 / 900.0)
        late = t - rng.uniform(0, 40 * D) if rng.random() < 0.1 else t  # out-of-order events too
        if rng.random() < 0.05:
            count_merchant_fraud(m, late)
        cached = merchant_features(m, late)
        fresh = merchant_features(MerchantState(m.tx_hours.copy(), m.tx_days.copy(), m.fraud_hours.copy(),
                                                m.fraud_days.copy(), m.new_hours.copy(), m.new_days.copy()), late)
        assert cached == fresh
        count_merchant_tx(m, late, rng.random() < 0.3)


def test_a_user_whose_history_is_all_zero_amount_verifications_gets_a_finite_ratio() -> None:
    from fraudactors.features.definition import FEATURE_INDEX, transition
    from fraudactors.features.schema import Transaction, format_timestamp

    t0 = 1_790_000_000.0
    state = None
    rows = []
    for i, amount in enumerate([0.0, 0.0, 0.0, 25.0]):
        t = t0 + 60 * i
        row, state = transition(state, None, Transaction(f"z{i}", "u", "m", amount, "USD", "food", False, t,
                                                         format_timestamp(t)))
        rows.append(row)
    ratio = FEATURE_INDEX["amount_to_avg_30d"]
    assert rows[1][ratio] == 1.0 and rows[3][ratio] == 2500.0


def test_a_sub_cent_history_gives_finite_ratios_against_one_cent() -> None:
    """SPEC §2 allows any amount >= 0: a history of one 1e-310 payment (a subnormal) made the next
    payment's ratios to the 30-day average and median infinite. Below one cent, the base is one cent."""
    from fraudactors.features.definition import FEATURE_INDEX, transition
    from fraudactors.features.schema import Transaction, format_timestamp

    t0 = 1_790_000_000.0
    state = None
    rows = []
    for i, amount in enumerate([1e-310, 25.0]):
        t = t0 + 60 * i
        row, state = transition(state, None, Transaction(f"s{i}", "u", "m", amount, "USD", "food", False, t,
                                                         format_timestamp(t)))
        rows.append(row)
    assert all(math.isfinite(float(np.float32(v))) for row in rows for v in row), "finite as the models read them"
    for name in ("amount_to_avg_30d", "amount_to_median_30d"):
        assert rows[1][FEATURE_INDEX[name]] == pytest.approx(2500.0), name  # 25 against one cent


def test_time_of_day_habit_share() -> None:
    """Share of the 30-day history in this hour of the day or up to 2 either side (circular)."""
    day = (T0 // D) * D - 20 * D
    at = [23 * H + 10, 23 * H + 50, 0.5 * H, 0.25 * H]  # hours 23, 23, 0, 0: across midnight
    events = [txn(day + i * D + s, 10.0) for i, s in enumerate(at)]
    _, state = run(events)
    assert state.hours == bytearray([23, 23, 0, 0])
    assert f(features_of(state, None, txn(day + 10 * D + 1.5 * H)), "hour_habit_share_30d") == 1.0  # hour 1
    assert f(features_of(state, None, txn(day + 10 * D + 2.5 * H)), "hour_habit_share_30d") == 0.5  # 23 is 3 away
    assert f(features_of(state, None, txn(day + 10 * D + 21.1 * H)), "hour_habit_share_30d") == 0.5  # 0 is 3 away
    assert f(features_of(state, None, txn(day + 10 * D + 12 * H)), "hour_habit_share_30d") == 0.0


def test_amount_against_the_users_own_distribution() -> None:
    rows, _ = run([txn(T0 + i * H, a) for i, a in enumerate([5.0, 20.0, 10.0, 40.0, 30.0])] + [txn(T0 + 6 * H, 25.0)])
    vec = rows[-1]
    assert f(vec, "amount_rank_30d") == 3 / 5  # 5, 10, 20 are below 25
    assert f(vec, "amount_to_median_30d") == 25.0 / 20.0
    assert f(vec, "tx_count_24h_to_daily_30d") == 5 / (5 / 30)
    assert f(vec, "amount_sum_24h_to_daily_30d") == pytest.approx(30.0)  # all 30 days' spend in 24 h


def test_new_merchants_distinct_merchants_and_abroad_in_the_last_24_hours() -> None:
    events = [
        txn(T0 - 3 * D, 10.0, merchant="a"),
        txn(T0 - 2 * D, 30.0, merchant="b"),
        txn(T0 - 20 * H, 10.0, merchant="a"),  # visited before: not new
        txn(T0 - 10 * H, 50.0, merchant="c", international=True),  # new
        txn(T0 - 5 * H, 20.0, merchant="d", international=True),  # new
    ]
    rows, state = run([*events, txn(T0, 7.0, merchant="a")])
    vec = rows[-1]
    assert state.new_merchant == bytearray([1, 1, 0, 1, 1, 0]) and state.international == bytearray([0, 0, 0, 1, 1, 0])
    assert f(vec, "new_merchant_count_24h") == 2.0 and f(vec, "new_merchant_amount_24h") == 70.0
    assert f(vec, "distinct_merchants_24h") == 3.0 and f(vec, "international_count_24h") == 2.0


def test_a_merchant_is_new_again_after_30_days_without_it_and_an_out_of_order_event_judges_by_its_past() -> None:
    _, state = run([txn(T0, merchant="a"), txn(T0 + 31 * D - 10, merchant="b"), txn(T0 + 31 * D, merchant="a")])
    assert state.new_merchant == bytearray([1, 1])  # the first "a" fell out of the window: "a" was new again
    _, state = run([txn(T0, merchant="a"), txn(T0 + 2 * H, merchant="b")])
    _, state = transition(state, None, txn(T0 + H, merchant="b"))  # before the first "b": new then
    assert state.new_merchant == bytearray([1, 1, 1])


def test_the_sequence_of_the_last_transactions() -> None:
    # ten days of habit: one payment a day at 12:00 UTC at merchant "h", amount 20
    noon = T0 - 21 * H + 12 * H - 10 * D  # 12:00 ten days before T0's day
    habit = [txn(noon + i * D, 20.0, merchant="h") for i in range(10)]
    # then, on T0's day, three payments at new merchants in the night (03:00, 04:00, 05:00 UTC)
    night = T0 - 21 * H + 3 * H
    spree = [txn(night + i * H, 30.0, merchant=f"n{i}") for i in range(3)]
    rows, _ = run([*habit, *spree, txn(night + 3.5 * H, 25.0, merchant="n9")])  # 06:30
    vec = rows[-1]
    assert f(vec, "new_merchant_count_6h") == 3.0  # the spree ("h" was new ten days ago)
    assert f(vec, "new_merchant_last3") == 3.0
    assert f(vec, "seconds_since_2nd_last_tx") == 2.5 * H  # 04:00 -> 06:30
    # before the last 24 h the user paid only around 12:00: hours 3-5 are unusual, even though the
    # spree's own three payments are near each other
    assert f(vec, "unusual_hour_count_24h") == 3.0
    assert f(vec, "amount_to_median_last3") == 30.0 / 20.0  # the median of 10 x 20 and 3 x 30 is 20
    assert f(vec, "hour_habit_share_last3") == 0.0
    # an ordinary payment at the habit hour and merchant: nothing new, nothing unusual
    rows, _ = run([*habit, txn(noon + 10 * D, 20.0, merchant="h")])
    vec = rows[-1]
    assert f(vec, "new_merchant_count_6h") == 0.0 and f(vec, "new_merchant_last3") == 0.0
    assert f(vec, "seconds_since_2nd_last_tx") == 2 * D
    assert f(vec, "unusual_hour_count_24h") == 0.0 and f(vec, "amount_to_median_last3") == 1.0
    assert f(vec, "hour_habit_share_last3") == 1.0  # every earlier payment was at 12:00


def test_the_sequence_features_of_a_new_user_and_in_degraded_mode() -> None:
    names = ("new_merchant_count_6h", "new_merchant_last3", "seconds_since_2nd_last_tx", "unusual_hour_count_24h",
             "amount_to_median_last3", "hour_habit_share_last3")
    assert [f(transaction_only_features(txn(T0)), n) for n in names] == [0.0, 0.0, NO_PREVIOUS_TX, 0.0, 1.0, 0.0]
    rows, _ = run([txn(T0), txn(T0 + H), txn(T0 + 2 * H)])
    assert f(rows[1], "seconds_since_2nd_last_tx") == NO_PREVIOUS_TX  # one earlier event only
    assert f(rows[2], "seconds_since_2nd_last_tx") == 2 * H
    assert f(rows[2], "hour_habit_share_last3") == 0.0  # no event before the last 24 h to judge hours by


def test_the_cardholder_abroad_the_run_of_international_payments() -> None:
    home = [txn(T0 - 12 * D + i * D, 20.0, merchant="h") for i in range(5)]  # days -12 .. -8 at home
    trip = [txn(T0 - 2 * D + i * 6 * H, 30.0, merchant=f"t{i}", international=True) for i in range(4)]  # from day -2
    rows, _ = run([*home, *trip, txn(T0, 25.0, merchant="t9", international=True)])
    vec = rows[-1]
    assert f(vec, "international_streak") == 5.0  # the four of the trip and this one
    assert f(vec, "international_streak_hours") == 48.0  # since the trip's first payment
    assert f(vec, "international_count_7d") == 5.0 and f(vec, "international_share_7d") == 1.0  # home is > 7 days ago
    assert f(vec, "hours_since_first_international_7d") == 48.0
    # a payment at home after the trip ends the run; the trip still counts in the 7 days
    rows, _ = run([*home, *trip, txn(T0, 25.0, merchant="h")])
    vec = rows[-1]
    assert f(vec, "international_streak") == 0.0 and f(vec, "international_streak_hours") == 0.0
    assert f(vec, "international_count_7d") == 4.0 and f(vec, "international_share_7d") == 4.0 / 5.0
    # a domestic payment inside the run: only the international ones after it continue
    mixed = [*trip[:2], txn(T0 - 2 * D + 7 * H, 9.0, merchant="h"), *trip[2:]]
    rows, _ = run([*home, *mixed, txn(T0, 25.0, merchant="t9", international=True)])
    assert f(rows[-1], "international_streak") == 3.0 and f(rows[-1], "international_streak_hours") == 36.0


def test_the_cardholder_regular_merchants_against_the_30_days_before_the_last_24_hours() -> None:
    # before the last 24 h: "r" three times, "s" twice, "o" once
    before = [txn(T0 - (20 - i) * D, 20.0, merchant=m) for i, m in enumerate(("r", "r", "r", "s", "s", "o"))]
    today = [txn(T0 - 20 * H, 20.0, merchant="r"),  # regular and frequent
             txn(T0 - 10 * H, 20.0, merchant="s"),  # regular (2 uses), not frequent
             txn(T0 - 5 * H, 20.0, merchant="o"),  # 1 use: irregular
             txn(T0 - 2 * H, 20.0, merchant="x")]  # never used: irregular
    rows, _ = run([*before, *today, txn(T0, 20.0, merchant="x")])  # "x" again: today's use does not make it regular
    vec = rows[-1]
    assert f(vec, "irregular_merchant_count_24h") == 3.0  # "o", "x" and this "x"
    assert f(vec, "infrequent_merchant_count_24h") == 4.0  # and "s"
    assert f(vec, "irregular_merchant_share_24h") == 3.0 / 5.0
    assert f(vec, "irregular_merchant_count_6h") == 3.0  # "o" (5 h ago), "x" and this one
    rows, _ = run([*before, txn(T0, 20.0, merchant="r")])
    vec = rows[-1]
    assert f(vec, "irregular_merchant_count_24h") == 0.0 and f(vec, "infrequent_merchant_count_24h") == 0.0
    assert f(vec, "irregular_merchant_share_24h") == 0.0 and f(vec, "irregular_merchant_count_6h") == 0.0


def test_abroad_and_regular_merchant_features_of_a_new_user_and_in_degraded_mode() -> None:
    names = ("international_streak", "international_streak_hours", "international_count_7d", "international_share_7d",
             "hours_since_first_international_7d", "irregular_merchant_count_24h", "infrequent_merchant_count_24h",
             "irregular_merchant_share_24h", "irregular_merchant_count_6h")
    assert [f(transaction_only_features(txn(T0)), n) for n in names] == [0.0, 0.0, 0.0, 0.0, NO_PREVIOUS_TX,
                                                                         1.0, 1.0, 1.0, 1.0]
    abroad = txn(T0, international=True)
    assert [f(transaction_only_features(abroad), n) for n in names] == [1.0, 0.0, 1.0, 1.0, NO_PREVIOUS_TX,
                                                                        1.0, 1.0, 1.0, 1.0]
    # a user whose events are all older than 30 days gets the same as a new one
    rows, _ = run([txn(T0 - 40 * D, merchant="a", international=True), abroad])
    assert [f(rows[-1], n) for n in names] == [1.0, 0.0, 1.0, 1.0, NO_PREVIOUS_TX, 1.0, 1.0, 1.0, 1.0]


def test_subnormal_amounts_whose_daily_average_underflows_do_not_stop_the_user() -> None:
    """An amount of 5e-324 passes validation (>= 0, finite). Its 30-day daily average, 5e-324 / 30,
    underflows to 0: the spend ratio is then 0 (there is no spend to compare), not a division by
    zero -- which raised in the Python definition and would stop the partition on every retry."""
    rows, state = run([txn(T0, 5e-324), txn(T0 + 60.0, 10.0), txn(T0 + 120.0, 5e-324)])
    assert f(rows[1], "amount_sum_24h_to_daily_30d") == 0.0
    assert f(rows[1], "tx_count_24h") == 1.0
    assert len(state.times) == 3
    assert all(not math.isnan(v) for row in rows for v in row)
