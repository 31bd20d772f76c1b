"""SPEC §2 / §4 parsing: valid inputs, every kind of bad input, and fuzzing."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraudactors.errors import InvalidRecord
from fraudactors.features.schema import (
    MAX_VALUE_BYTES,
    Label,
    Transaction,
    _loads,
    parse_label,
    parse_transaction,
    transaction_from_obj,
    transaction_to_obj,
)

SEED_SCHEMA = {  # the seed request schema is a valid transaction
    "transaction_id": "t-1", "user_id": "c-42", "amount": 57.2, "merchant_category": "grocery",
    "is_international": False, "timestamp": "2026-11-28T21:00:00.123+00:00",
}
FULL = {
    "transaction_id": "t-000001", "user_id": "c-42", "merchant_id": "m-7", "amount": 57.20,
    "currency": "USD", "merchant_category": "grocery", "is_international": False,
    "timestamp": "2026-11-28T21:00:00.123+00:00",
}


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj)


def test_full_spec_example_parses() -> None:
    txn = parse_transaction(dumps(FULL))
    assert txn == Transaction("t-000001", "c-42", "m-7", 57.2, "USD", "grocery", False,
                              1795899600.123, "2026-11-28T21:00:00.123+00:00")


def test_seed_schema_gets_defaults() -> None:
    txn = parse_transaction(dumps(SEED_SCHEMA))
    assert (txn.merchant_id, txn.currency, txn.merchant_category) == ("unknown", "USD", "grocery")
    minimal = {k: SEED_SCHEMA[k] for k in ("transaction_id", "user_id", "amount", "timestamp")}
    txn = parse_transaction(dumps(minimal))
    assert (txn.merchant_id, txn.currency, txn.merchant_category, txn.is_international) == (
        "unknown", "USD", "unknown", False)


def test_unknown_fields_are_ignored_and_ints_are_amounts() -> None:
    txn = parse_transaction(dumps({**FULL, "amount": 5, "extra": {"nested": [1, 2]}, "device": None}))
    assert txn.amount == 5.0 and isinstance(txn.amount, float)


@pytest.mark.parametrize(("ts", "event_time", "normalized"), [
    ("2026-11-28T21:00:00.123+00:00", 1795899600.123, "2026-11-28T21:00:00.123+00:00"),
    ("2026-11-28T21:00:00Z", 1795899600.0, "2026-11-28T21:00:00.000+00:00"),
    ("2026-11-28T21:00:00", 1795899600.0, "2026-11-28T21:00:00.000+00:00"),  # naive = UTC
    ("2026-11-28T22:30:00.5+01:30", 1795899600.5, "2026-11-28T21:00:00.500+00:00"),
    ("2026-11-28T21:00:00.123456+00:00", 1795899600.123456, "2026-11-28T21:00:00.123456+00:00"),
    (1795899600, 1795899600.0, "2026-11-28T21:00:00.000+00:00"),  # epoch seconds
    (1795899600.25, 1795899600.25, "2026-11-28T21:00:00.250+00:00"),
])
def test_timestamps(ts: object, event_time: float, normalized: str) -> None:
    txn = parse_transaction(dumps({**FULL, "timestamp": ts}))
    assert txn.event_time == pytest.approx(event_time, abs=1e-6)
    assert txn.timestamp == normalized
    # the normalized string parses back to the same instant
    again = parse_transaction(dumps({**FULL, "timestamp": txn.timestamp}))
    assert again.event_time == pytest.approx(txn.event_time, abs=1e-6)


BAD_VALUES: list[tuple[bytes | None, str]] = [
    (None, "empty value"),
    (b"", "empty value"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"42", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'{"a": NaN}', "not valid JSON"),
    (b" " * (MAX_VALUE_BYTES + 1), "value too large"),
    (b'{"transaction_id": "t", "user_id": "u", "amount": 1, "timestamp": 0}' + b" " * MAX_VALUE_BYTES,
     "value too large"),  # a valid transaction, padded past the bound
    (b'{"transaction_id": "t", "user_id": "u", "amount": 1e400, "timestamp": 0}', "not valid JSON"),
]


def test_huge_integer_amount_is_out_of_range() -> None:
    value = b'{"transaction_id": "t", "user_id": "u", "amount": 1' + b"0" * 30 + b', "timestamp": 0}'
    with pytest.raises(InvalidRecord, match="amount must be <= 1e"):
        parse_transaction(value)


@pytest.mark.parametrize(("value", "reason"), BAD_VALUES)
def test_bad_values(value: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidRecord, match=reason):
        parse_transaction(value)


def _without(name: str) -> dict[str, object]:
    return {k: v for k, v in FULL.items() if k != name}


BAD_FIELDS: list[tuple[dict[str, object], str]] = [
    (_without("transaction_id"), "missing field 'transaction_id'"),
    (_without("user_id"), "missing field 'user_id'"),
    (_without("amount"), "missing field 'amount'"),
    (_without("timestamp"), "missing field 'timestamp'"),
    ({**FULL, "transaction_id": ""}, "transaction_id must be 1-64 characters"),
    ({**FULL, "transaction_id": "x" * 65}, "transaction_id must be 1-64 characters"),
    ({**FULL, "transaction_id": 17}, "transaction_id must be a string, got number"),
    ({**FULL, "user_id": None}, "user_id must be a string, got null"),
    ({**FULL, "user_id": ["c-1"]}, "user_id must be a string, got array"),
    ({**FULL, "amount": "57.2"}, "amount must be a number, got string"),
    ({**FULL, "amount": True}, "amount must be a number, got boolean"),
    ({**FULL, "amount": None}, "amount must be a number, got null"),
    ({**FULL, "amount": -0.01}, "amount must be >= 0"),
    ({**FULL, "amount": -3.5}, "amount must be >= 0"),
    ({**FULL, "amount": 1e9 + 1}, "amount must be <= 1e\\+09"),
    ({**FULL, "timestamp": "yesterday"}, "timestamp is not ISO-8601"),
    ({**FULL, "timestamp": "2026-13-01T00:00:00Z"}, "timestamp is not ISO-8601"),
    ({**FULL, "timestamp": "2026-11-28T21:00:00" + "0" * 80}, "timestamp is not ISO-8601"),
    ({**FULL, "timestamp": None}, "timestamp must be an ISO-8601 string or epoch seconds, got null"),
    ({**FULL, "timestamp": True}, "got boolean"),
    ({**FULL, "timestamp": 1.7e12}, "timestamp out of range"),  # epoch milliseconds
    ({**FULL, "timestamp": -1}, "timestamp out of range"),
    ({**FULL, "timestamp": "1969-12-31T23:59:59Z"}, "timestamp out of range"),
    ({**FULL, "timestamp": "0001-01-01T00:00:00+01:00"}, "timestamp out of range"),
    # the engine's own form (the fast path) has the same bounds
    ({**FULL, "timestamp": "1969-12-31T23:59:59.999+00:00"}, "timestamp out of range"),
    ({**FULL, "timestamp": "2100-01-01T00:00:00.000+00:00"}, "timestamp out of range"),
    ({**FULL, "timestamp": 4102444800}, "timestamp out of range"),  # 2100-01-01: the end is excluded
    ({**FULL, "merchant_id": 7}, "merchant_id must be a string"),
    ({**FULL, "merchant_id": ""}, "merchant_id must be 1-64 characters"),
    ({**FULL, "currency": None}, "currency must be a string, got null"),
    ({**FULL, "merchant_category": {"a": 1}}, "merchant_category must be a string, got object"),
    ({**FULL, "is_international": "false"}, "is_international must be a boolean, got string"),
    ({**FULL, "is_international": 0}, "is_international must be a boolean, got number"),
    ({**FULL, "is_international": None}, "is_international must be a boolean, got null"),
]


@pytest.mark.parametrize(("obj", "reason"), BAD_FIELDS)
def test_bad_fields(obj: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidRecord, match=reason) as info:
        parse_transaction(dumps(obj))
    assert len(info.value.reason) < 120  # short enough for a DLQ header
    with pytest.raises(InvalidRecord, match=reason):
        transaction_from_obj(obj)


@pytest.mark.parametrize("amount", [math.nan, math.inf, -math.inf])
def test_non_finite_amount_from_obj(amount: float) -> None:
    # JSON cannot carry NaN/inf (orjson rejects them as invalid JSON); POST /predict bodies might.
    with pytest.raises(InvalidRecord, match="amount must be finite"):
        transaction_from_obj({**FULL, "amount": amount})


def test_round_trip_through_spec_json() -> None:
    txn = parse_transaction(dumps(FULL))
    assert parse_transaction(dumps(transaction_to_obj(txn))) == txn


def test_labels() -> None:
    label = parse_label(dumps({"transaction_id": "t-1", "user_id": "c-42", "merchant_id": "m-7",
                               "is_fraud": True, "labeled_at": "2026-12-03T10:00:00+00:00"}))
    assert label == Label("t-1", "c-42", "m-7", True, 1796292000.0)
    minimal = parse_label(dumps({"transaction_id": "t-1", "user_id": "c", "is_fraud": False,
                                 "labeled_at": 1796292000}))
    assert minimal.merchant_id == "unknown" and minimal.is_fraud is False
    for bad, reason in [
        ({"transaction_id": "t-1", "user_id": "c", "labeled_at": 1796292000}, "missing field 'is_fraud'"),
        ({"transaction_id": "t-1", "user_id": "c", "is_fraud": 1, "labeled_at": 1}, "is_fraud must be a boolean"),
        ({"transaction_id": "t-1", "user_id": "c", "is_fraud": True}, "missing field 'labeled_at'"),
        ({"transaction_id": "t-1", "user_id": "c", "is_fraud": True, "labeled_at": "soon"}, "labeled_at is not"),
    ]:
        with pytest.raises(InvalidRecord, match=reason):
            parse_label(dumps(bad))
    with pytest.raises(InvalidRecord):
        parse_label(None)


# -- fuzzing: nothing but InvalidRecord ever escapes ------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what JSON encoders can carry
json_values = st.recursive(
    st.none() | st.booleans() | ints
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=80),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
field_values = {
    "transaction_id": st.text(max_size=70) | json_values,
    "user_id": st.text(max_size=70) | json_values,
    "merchant_id": st.text(max_size=70) | json_values,
    "amount": st.floats(allow_nan=False, allow_infinity=False) | ints | json_values,
    "currency": st.text(max_size=5) | json_values,
    "merchant_category": st.text(max_size=20) | json_values,
    "is_international": st.booleans() | json_values,
    "timestamp": st.datetimes().map(lambda d: d.isoformat()) | st.text(max_size=40)
    | st.floats(allow_nan=False, allow_infinity=False) | ints | json_values,
}
transaction_like = st.fixed_dictionaries({}, optional=field_values)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(value: bytes) -> None:
    try:
        txn = parse_transaction(value)
    except InvalidRecord as exc:
        assert exc.reason
    else:
        assert isinstance(txn, Transaction)
    try:
        parse_label(value)
    except InvalidRecord:
        pass


@settings(max_examples=600, deadline=None)
@given(transaction_like)
def test_fuzz_json_objects(obj: dict[str, object]) -> None:
    value = orjson.dumps(obj)
    try:
        parse_label(orjson.dumps({**obj, "is_fraud": obj.get("is_international"), "labeled_at": obj.get("timestamp")}))
    except InvalidRecord:
        pass
    try:
        txn = parse_transaction(value)
    except InvalidRecord as exc:
        assert exc.reason and "\n" not in exc.reason
        return
    # whatever is accepted satisfies the contract
    assert 0 < len(txn.transaction_id) <= 64 and 0 < len(txn.user_id) <= 64
    assert math.isfinite(txn.amount) and 0 <= txn.amount <= 1e9
    assert isinstance(txn.is_international, bool)
    assert 0 <= txn.event_time < 4102444800
    assert parse_transaction(orjson.dumps(transaction_to_obj(txn))).event_time == pytest.approx(
        txn.event_time, abs=1e-6)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_any_json(obj: object) -> None:
    try:
        parse_transaction(orjson.dumps(obj))
    except InvalidRecord:
        pass
    try:
        transaction_from_obj(obj)
    except InvalidRecord:
        pass


def test_a_zero_amount_is_a_card_verification_and_valid() -> None:
    txn = parse_transaction(orjson.dumps({**FULL, "amount": 0}))
    assert txn.amount == 0.0


def _outcome(parse: object, value: object) -> object:
    try:
        return parse(value)  # type: ignore[operator]
    except InvalidRecord as exc:
        return ("invalid", exc.reason)


ids_near_bounds = st.text(min_size=63, max_size=66) | st.sampled_from(["", "u", "x" * 64, "é" * 64, "x" * 65])
near_bounds = st.fixed_dictionaries({  # well-formed but for one field at the edge of its bound
    "transaction_id": ids_near_bounds, "user_id": ids_near_bounds,
    "amount": st.sampled_from([0, -0.0, -1e-300, 1e9, 1e9 + 1, 2**63, 1.5, True]),
    "timestamp": st.sampled_from(["2026-11-28T21:00:00.123+00:00", 1.5, 0, -1, 4102444800, "x", None]),
}, optional={"merchant_id": ids_near_bounds, "currency": ids_near_bounds, "merchant_category": ids_near_bounds,
             "is_international": st.booleans() | st.none() | st.just(0)})


@settings(max_examples=800, deadline=None)
@given(transaction_like | near_bounds | json_values | st.binary(max_size=120))
def test_the_compiled_decoder_accepts_exactly_what_the_checks_accept(obj: object) -> None:
    # parse_transaction decodes with msgspec and falls back to orjson and explicit checks only for
    # what msgspec refuses: the two must agree on every input, value and error alike
    value = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    assert _outcome(parse_transaction, value) == _outcome(lambda v: transaction_from_obj(_loads(v)), value)


@pytest.mark.parametrize("value", [
    '{"transaction_id": "éé", "user_id": "😀", "amount": 1, "timestamp": 5}'.encode(),
    b'{"transaction_id": "t", "user_id": "u", "amount": -0.0, "timestamp": "2026-11-28T21:00:00Z"}',
    b'{"transaction_id": "t", "user_id": "u", "amount": 1e9, "timestamp": 1.5, "x": [[[{"y": null}]]]}',
    b'{"transaction_id": "t", "user_id": "u", "amount": 1, "timestamp": 1, "user_id": "v"}',
    b'{"transaction_id": "' + b"x" * 64 + b'", "user_id": "u", "amount": 1, "timestamp": 1}',
])
def test_well_formed_edge_cases_parse_the_same_both_ways(value: bytes) -> None:
    txn = parse_transaction(value)
    assert txn == transaction_from_obj(_loads(value))
