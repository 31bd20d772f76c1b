"""Point-in-time offline features: ordering, label timing, columnar input."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fraudactors.errors import InvalidRecord
from fraudactors.features.definition import FEATURE_INDEX, N_FEATURES, transaction_only_features
from fraudactors.features.offline import (
    labels_from_columns,
    offline_features,
    offline_features_columns,
    transactions_from_columns,
)
from fraudactors.features.schema import Label, Transaction, format_timestamp

T0 = 1790812800.0  # 2026-10-01T00:00:00Z
H = 3600.0
D = 86400.0


def txn(tid: str, t: float, user: str = "u", merchant: str = "m", amount: float = 10.0) -> Transaction:
    return Transaction(tid, user, merchant, amount, "USD", "food", False, t, format_timestamp(t))


def col(x: np.ndarray, name: str) -> list[float]:
    return x[:, FEATURE_INDEX[name]].tolist()


def test_rows_follow_the_input_order_and_time_decides_the_state() -> None:
    rng = random.Random(4)
    txns = [txn(f"t{i}", T0 + i * 600.0, user=f"u{i % 3}", merchant=f"m{i % 4}", amount=1.0 + i) for i in range(60)]
    in_order = offline_features(txns)
    shuffled = txns[:]
    rng.shuffle(shuffled)
    out = offline_features(shuffled)
    position = {t.transaction_id: i for i, t in enumerate(txns)}
    for row, t in zip(out, shuffled, strict=True):
        assert np.array_equal(row, in_order[position[t.transaction_id]])
    assert in_order.dtype == np.float32 and in_order.shape == (60, N_FEATURES)
    assert np.array_equal(in_order[0], np.array(transaction_only_features(txns[0]), dtype=np.float32))
    assert offline_features([]).shape == (0, N_FEATURES)


def test_a_label_counts_only_once_reported() -> None:
    day0 = T0 + 10 * D
    txns = [txn("a", day0 + 10 * H + 1800)]  # 10:30
    labels = [
        Label("f1", "x", "m", True, day0 + 9 * H + 100),  # 09:01: counts
        Label("f2", "x", "m", True, day0 + 10 * H + 60),  # 10:01, same hour: not yet
        Label("f3", "x", "m", True, day0 + 11 * H),  # after the transaction: no
        Label("f4", "x", "m", False, day0 + 2 * H),  # not fraud: nothing
        Label("f5", "x", "m", True, day0 - 9 * D),  # 30d only
        Label("f1", "x", "m", True, day0 - 2 * D),  # a second label for f1: the first one wins
        Label("g1", "x", "other", True, day0 - D),  # another merchant
    ]
    out = offline_features(txns, labels)
    assert col(out, "merchant_fraud_count_7d") == [1.0]
    assert col(out, "merchant_fraud_count_30d") == [2.0]
    later = offline_features([txn("b", day0 + 12 * H)], labels)
    assert col(later, "merchant_fraud_count_7d") == [3.0]


def test_a_label_counts_at_its_transactions_merchant() -> None:
    """Labels are joined to their transactions: the merchant a label names (or its missing one,
    "unknown") does not matter when the transaction is in the data; a label for a transaction
    not in the data counts at the merchant it names, and nowhere when it names none."""
    day0 = T0 + 10 * D
    txns = [txn("a", day0), txn("b", day0 + 60.0), txn("c", day0 + 120.0)]
    labels = [Label("a", "u", "unknown", True, day0 + H), Label("b", "u", "m-wrong", True, day0 + H),
              Label("c", "u", "m-x", True, day0 + H), Label("c", "u", "m-y", True, day0 + 2 * H),
              Label("elsewhere", "v", "m-named", True, day0 + H), Label("nowhere", "v", "unknown", True, day0 + H)]
    probes = [txn(f"p-{m}", day0 + D, user="p", merchant=m) for m in ("m", "unknown", "m-wrong", "m-x", "m-y", "m-named")]
    out = offline_features([*txns, *probes], labels)
    assert col(out, "merchant_fraud_count_7d")[3:] == [3.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_a_transaction_not_in_the_data_counts_where_its_first_label_was_placed() -> None:
    """Its labels count at one merchant, as online (the engine records each transaction's
    placement): a reversal naming another merchant, or none, takes the first verdict back where
    it counted; a first label naming none places nothing."""
    day0 = T0 + 10 * D
    labels = [Label("x", "v", "m-first", True, day0 + H), Label("x", "v", "m-second", False, day0 + 2 * H),
              Label("y", "v", "m-first", True, day0 + H), Label("y", "v", "unknown", False, day0 + 2 * H),
              Label("z", "v", "unknown", True, day0 + H), Label("z", "v", "m-second", True, day0 + 2 * H)]
    probes = [txn(f"p-{m}", day0 + D, user="p", merchant=m) for m in ("m-first", "m-second", "unknown")]
    assert col(offline_features(probes, labels), "merchant_fraud_count_7d") == [0.0, 1.0, 0.0]


def test_merchant_counts_are_point_in_time() -> None:
    txns = [txn(f"t{i}", T0 + i * 60.0, user=f"u{i}") for i in range(5)]
    out = offline_features(txns[::-1])  # input order does not matter; event time does
    assert col(out, "merchant_tx_count_24h") == [4.0, 3.0, 2.0, 1.0, 0.0]


def test_progress_is_reported() -> None:
    seen: list[int] = []
    offline_features([txn(f"t{i}", T0 + i, user=f"u{i % 50}") for i in range(10_000)], progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 10_000 and len(seen) >= 2


def test_columns_equal_the_record_path() -> None:
    n = 300
    rng = np.random.default_rng(5)
    times = T0 + np.sort(rng.uniform(0, 20 * D, n))
    columns = {
        "transaction_id": [f"t{i}" for i in range(n)],
        "user_id": np.array([f"u{i % 17}" for i in range(n)]),
        "merchant_id": [f"m{i % 5}" for i in range(n)],
        "amount": np.round(rng.lognormal(3, 1, n), 2) + 0.01,
        "merchant_category": ["food"] * n,
        "is_international": rng.random(n) < 0.1,
        "timestamp": times,  # epoch seconds
    }
    labels = {"transaction_id": np.array(["t3", "t9"]), "merchant_id": ["m3", "m4"],
              "is_fraud": np.array([True, True]), "labeled_at": [format_timestamp(times[5]), float(times[20])]}
    txns = transactions_from_columns(columns)
    assert txns[0].amount == float(columns["amount"][0]) and isinstance(txns[0].is_international, bool)
    expected = offline_features(txns, labels_from_columns(labels))
    assert np.array_equal(offline_features_columns(columns, labels), expected)
    iso = {**columns, "timestamp": [format_timestamp(t) for t in times]}
    assert np.array_equal(offline_features_columns(iso, labels), expected)
    alias = {k: v for k, v in columns.items() if k != "timestamp"} | {"event_time": times}
    assert np.array_equal(offline_features_columns(alias, labels), expected)


def test_column_errors_are_clear() -> None:
    good = {"transaction_id": ["a", "b"], "user_id": ["u", "u"], "amount": [1.0, 2.0], "timestamp": [T0, T0 + 1]}
    with pytest.raises(InvalidRecord, match="missing column\\(s\\): amount"):
        transactions_from_columns({k: v for k, v in good.items() if k != "amount"})
    with pytest.raises(InvalidRecord, match="timestamp or event_time"):
        transactions_from_columns({k: v for k, v in good.items() if k != "timestamp"})
    with pytest.raises(InvalidRecord, match="different lengths"):
        transactions_from_columns({**good, "amount": [1.0]})
    with pytest.raises(InvalidRecord, match="row 1: amount must be >= 0"):
        transactions_from_columns({**good, "amount": [1.0, -2.0]})
    with pytest.raises(InvalidRecord, match="row 0: is_international must be a boolean"):
        transactions_from_columns({**good, "is_international": ["no", "yes"]})
    with pytest.raises(InvalidRecord, match="missing column\\(s\\): is_fraud"):
        labels_from_columns({"transaction_id": ["a"], "labeled_at": [T0]})
    assert transactions_from_columns({k: [] for k in good}) == []
