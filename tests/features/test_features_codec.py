"""The user-state blob round-trips exactly (online features equal offline ones bit for bit)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraudactors.features.definition import UserState
from fraudactors.features.state_codec import StateDecodeError, decode_state, encode_state

ids = st.text(min_size=1, max_size=64)
states = st.builds(
    lambda times, amounts, merchants, categories, seen, last, partition, offset: UserState(
        times=sorted(times), amounts=amounts[: len(times)] + [1.0] * (len(times) - len(amounts)),
        merchants=dict.fromkeys(merchants), categories=dict.fromkeys(categories), seen_international=seen,
        last_international=last, partition=partition, offset=offset),
    st.lists(st.floats(0, 4.1e9), max_size=300),
    st.lists(st.floats(0.01, 1e9), max_size=300),
    st.lists(ids, max_size=64, unique=True),
    st.lists(ids, max_size=32, unique=True),
    st.booleans(),
    st.none() | st.booleans(),
    st.integers(-1, 2**31 - 1),
    st.integers(-1, 2**63 - 1),
)


@settings(max_examples=200, deadline=None)
@given(states)
def test_round_trip(state: UserState) -> None:
    decoded = decode_state(encode_state(state))
    assert decoded == state
    assert list(decoded.merchants) == list(state.merchants)  # LRU order kept


def test_bad_blobs_are_refused() -> None:
    blob = encode_state(UserState(times=[1.0], amounts=[2.0], merchants={"m": None}))
    for bad in (b"", b"\x01", blob[:20], b"\x09" + blob[1:], blob[:-3]):
        with pytest.raises(StateDecodeError):
            decode_state(bad)
