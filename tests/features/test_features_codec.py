"""The user-state blob round-trips exactly (online features equal offline ones bit for bit)."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraudactors.features.definition import UserState, entity_hash
from fraudactors.features.state_codec import StateDecodeError, decode_state, encode_state

hashes = st.integers(0, 2**32 - 1)


def _state(times: list[float], events: list[tuple[float, int, int, bool, bool]], merchants: list[int],
           categories: list[int], seen: bool, last: bool | None, partition: int, offset: int) -> UserState:
    events = (events + [(1.0, 0, 0, False, False)] * len(times))[: len(times)]
    return UserState(times=array("d", sorted(times)), amounts=array("d", [e[0] for e in events]),
                     merchant_hashes=array("I", [e[1] for e in events]),
                     hours=bytearray(e[2] for e in events), international=bytearray(e[3] for e in events),
                     new_merchant=bytearray(e[4] for e in events),
                     merchants=array("I", merchants),
                     categories=array("I", categories), seen_international=seen, last_international=last,
                     partition=partition, offset=offset)


states = st.builds(
    _state,
    st.lists(st.floats(0, 4.1e9), max_size=300),
    st.lists(st.tuples(st.floats(0.0, 1e9), st.integers(0, 2**32 - 1), st.integers(0, 23), st.booleans(),
                       st.booleans()), max_size=300),
    st.lists(hashes, max_size=64, unique=True),
    st.lists(hashes, max_size=32, unique=True),
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
    assert state.seen_international and state.last_international is False
    assert list(state.merchants) == [entity_hash("m")] and list(state.categories) == [entity_hash("g")]
    assert decode_state(encode_state(state)) == state  # rewritten as version 4


def test_a_version_3_blob_is_read_and_upgraded_without_changing_a_feature() -> None:
    """Blobs written before the seen-sets were hashes (JSON lists of the ids): the same state, and
    the same features as before the upgrade; the next write stores version 4."""
    import struct

    import orjson

    from fraudactors.features.definition import features_of, transition
    from fraudactors.features.schema import Transaction

    def txn(i: int, merchant: str, category: str) -> Transaction:
        t = 1_790_812_800.0 + 3600.0 * i
        return Transaction(f"t{i}", "u", merchant, 10.0 + i, "USD", category, i % 2 == 0, t, "")

    state = None
    for i in range(40):
        _, state = transition(state, None, txn(i, f"m{i % 7}", ("grocery", "fuel", "xyz")[i % 3]))
    assert state is not None
    n = len(state.times)
    v3 = b"".join((struct.pack("<BBbiIqH", 3, 1, 0, 7, 3, 41, n), state.times.tobytes(), state.amounts.tobytes(),
                   state.merchant_hashes.tobytes(), state.hours, state.international, state.new_merchant,
                   orjson.dumps([[f"m{i % 7}" for i in range(33, 40)], ["fuel", "xyz", "grocery"]])))
    upgraded = decode_state(v3)
    assert upgraded.times == state.times and upgraded.merchant_hashes == state.merchant_hashes
    assert list(upgraded.merchants) == list(state.merchants)  # the same LRU order, hashed
    assert list(upgraded.categories) == list(state.categories)
    for probe in (txn(41, "m3", "fuel"), txn(42, "new", "other"), txn(43, "m6", "xyz")):
        assert features_of(upgraded, None, probe) == features_of(state, None, probe)
    upgraded.partition, upgraded.epoch, upgraded.offset = state.partition, state.epoch, state.offset
    rewritten = encode_state(upgraded)
    assert rewritten[0] == 4 and decode_state(rewritten) == upgraded


def test_bad_blobs_are_refused() -> None:
    blob = encode_state(UserState(times=array("d", [1.0]), amounts=array("d", [2.0]), merchant_hashes=array("I", [5]),
                                  hours=bytearray(1), international=bytearray(1), new_merchant=bytearray(1),
                                  merchants=array("I", [entity_hash("m")])))
    for bad in (b"", b"\x01", blob[:20], b"\x09" + blob[1:], blob[:-3], blob + b"\x00", blob[:-1]):
        with pytest.raises(StateDecodeError):
            decode_state(bad)
