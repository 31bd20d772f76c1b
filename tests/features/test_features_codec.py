"""The user-state blob round-trips exactly (online features equal offline ones bit for bit)."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraudactors.features.definition import UserState
from fraudactors.features.state_codec import StateDecodeError, decode_state, encode_state

ids = st.text(min_size=1, max_size=64)


def _state(times: list[float], events: list[tuple[float, int, int, bool, bool]], merchants: list[str],
           categories: list[str], seen: bool, last: bool | None, partition: int, offset: int) -> UserState:
    events = (events + [(1.0, 0, 0, False, False)] * len(times))[: len(times)]
    return UserState(times=array("d", sorted(times)), amounts=array("d", [e[0] for e in events]),
                     merchant_hashes=array("I", [e[1] for e in events]),
                     hours=bytearray(e[2] for e in events), international=bytearray(e[3] for e in events),
                     new_merchant=bytearray(e[4] for e in events),
                     merchants=dict.fromkeys(merchants),
                     categories=dict.fromkeys(categories), seen_international=seen, last_international=last,
                     partition=partition, offset=offset)


states = st.builds(
    _state,
    st.lists(st.floats(0, 4.1e9), max_size=300),
    st.lists(st.tuples(st.floats(0.0, 1e9), st.integers(0, 2**32 - 1), st.integers(0, 23), st.booleans(),
                       st.booleans()), max_size=300),
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


def test_a_version_2_blob_is_still_read() -> None:
    """Blobs written before the per-event merchant, hour and flags: the events, seen-sets,
    partition and epoch come back; the new columns read as no known merchant, hours from the times."""
    import struct

    import orjson

    header = struct.pack("<BBbiIqH", 2, 1, 0, 7, 3, 41, 2)
    blob = header + struct.pack("<2d", 10.0, 7200.0) + struct.pack("<2d", 1.5, 0.0) + orjson.dumps([["m"], ["g"]])
    state = decode_state(blob)
    assert (list(state.times), list(state.amounts), state.partition, state.epoch, state.offset) == ([10.0, 7200.0],
                                                                                        [1.5, 0.0], 7, 3, 41)
    assert list(state.merchant_hashes) == [0, 0]
    assert state.hours == bytearray([0, 2]) and state.international == state.new_merchant == bytearray(2)
    assert state.seen_international and state.last_international is False and list(state.merchants) == ["m"]
    assert decode_state(encode_state(state)) == state  # rewritten as version 3


def test_bad_blobs_are_refused() -> None:
    blob = encode_state(UserState(times=[1.0], amounts=[2.0], merchants={"m": None}))
    for bad in (b"", b"\x01", blob[:20], b"\x09" + blob[1:], blob[:-3]):
        with pytest.raises(StateDecodeError):
            decode_state(bad)
