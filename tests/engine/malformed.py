"""Hypothesis strategies for malformed transactions (each one checked to be refused by the parser)."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fraudactors.errors import InvalidRecord
from fraudactors.features.schema import parse_transaction

_VALID: dict[str, Any] = {"transaction_id": "t-x", "user_id": "u-1", "merchant_id": "m-1", "amount": 10.5,
                          "currency": "USD", "merchant_category": "grocery", "is_international": False,
                          "timestamp": "2026-11-28T21:00:00.123+00:00"}
_REQUIRED = ("transaction_id", "user_id", "amount", "timestamp")
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                          st.text(max_size=20))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # the stdlib writes integers beyond 64 bits too


def _with(field: str, value: Any) -> dict[str, Any]:
    return {**_VALID, field: value}


not_json = st.one_of(
    st.binary(min_size=1, max_size=60).map(lambda b: b"\xff" + b),
    st.text(max_size=40).map(lambda t: ("{" + t).encode()),
    st.just(b'{"transaction_id": "t", "amount": NaN}'),
    st.just(b'{"amount": Infinity}'),
    st.just(b""),
)
not_an_object = st.one_of(st.lists(_JSON_SCALARS, max_size=4), _JSON_SCALARS).map(_dumps)
missing_field = st.sampled_from(_REQUIRED).map(lambda f: _dumps({k: v for k, v in _VALID.items() if k != f}))
wrong_type = st.one_of(
    st.tuples(st.sampled_from(("transaction_id", "user_id")),
              st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2))),
    st.tuples(st.just("amount"), st.one_of(st.text(max_size=8), st.booleans(), st.none(),
                                           st.lists(st.floats(), max_size=2))),
    st.tuples(st.just("is_international"), st.one_of(st.text(max_size=5), st.integers(2, 9), st.none())),
    st.tuples(st.just("timestamp"), st.one_of(st.booleans(), st.none(), st.lists(st.integers(), max_size=2))),
).map(lambda fv: _dumps(_with(*fv)))
bad_amount = st.one_of(
    st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0000001e9, allow_infinity=False),
    st.integers(max_value=0), st.integers(min_value=10**9 + 1),
).map(lambda a: _dumps(_with("amount", a)))
bad_timestamp = st.one_of(
    st.text(min_size=1, max_size=30).filter(lambda t: not t[:1].isdigit()),
    st.sampled_from(["2026-13-01T00:00:00", "2026-02-30", "yesterday", "2026-11-28T25:00:00Z", "9" * 80]),
    st.floats(min_value=5e9, allow_infinity=False), st.integers(max_value=-1),
).map(lambda t: _dumps(_with("timestamp", t)))
huge_values = st.one_of(
    st.integers(65, 5000).map(lambda n: _dumps(_with("transaction_id", "t" * n))),
    st.integers(65, 5000).map(lambda n: _dumps(_with("user_id", "u" * n))),
    st.integers(10**12, 10**30).map(lambda n: _dumps(_with("amount", n))),
)

malformed = st.one_of(not_json, not_an_object, missing_field, wrong_type, bad_amount, bad_timestamp, huge_values)


def _refused(value: bytes) -> bool:
    try:
        parse_transaction(value)
    except InvalidRecord:
        return True
    return False


def generate_malformed(n: int) -> list[bytes]:
    """``n`` malformed values of many kinds, every one refused by ``parse_transaction``."""
    found: list[bytes] = []

    @hsettings(max_examples=n + n // 5, database=None, derandomize=True, deadline=None,
               phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(malformed)
    def collect(value: bytes) -> None:
        if len(found) < n and _refused(value):
            found.append(value)

    collect()
    assert found, "hypothesis produced no malformed value"
    out = list(found)
    i = 0
    while len(out) < n:  # hypothesis may repeat itself; top up with distinct variants
        out.append(_dumps(_with("amount", -1.0 - i)) if i % 2 else _dumps(_with("timestamp", f"bad-{i}")))
        i += 1
    assert all(_refused(v) for v in out)
    assert not any(isinstance(v, float) and math.isnan(v) for v in out)
    return out
