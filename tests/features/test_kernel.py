"""The compiled kernel (``fraudactors/features/_kernel.c``) against the pure Python it replaced
(``reference_features.py``): the user-window block, the merchant bucket parse, the merchant window
sums, the packed merchant counts and the state update, equal bit for bit on random inputs and on a simulated population."""

from __future__ import annotations

from array import array

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fraudactors.features import _kernel, definition
from fraudactors.features.definition import (
    FEATURE_NAMES,
    MerchantState,
    UserState,
    count_merchant_tx,
    entity_hash,
    is_new_customer,
    transition,
    user_features,
)
from fraudactors.features.schema import Transaction, format_timestamp, parse_transaction
from fraudactors.features.store import _merchant_from_flat
from fraudactors.sim.simulator import Simulator
from tests.features import reference_features

T0 = 1795899600.0
H = 3600.0
D = 86400.0
MERCHANTS = [f"m{i}" for i in range(6)]
CATEGORIES = ["grocery", "travel", "jewelry", "unknown"]


def bits(values: list[float]) -> list[str]:
    """Values compared bit for bit (an int 0 of Python's ``sum([])`` is the float 0.0)."""
    return [float(v).hex() for v in values]


def make_txn(t: float, amount: float, merchant: str, category: str, international: bool) -> Transaction:
    return Transaction("t", "u", merchant, amount, "USD", category, international, t, format_timestamp(t))


def test_the_kernel_compiles_in_the_definitions_constants() -> None:
    names = set(_kernel.CONSTANTS)
    assert names == {"W_10M", "W_1H", "W_6H", "W_24H", "W_7D", "W_30D", "HOUR_S", "NO_PREVIOUS_TX",
                     "ZSCORE_MIN_STD", "MIN_AVERAGE", "HABIT_HOURS", "UNUSUAL_HOUR_SHARE",
                     "UNUSUAL_HOUR_MIN_EVENTS", "LAST_N", "REGULAR_USES", "FREQUENT_USES"}
    for name in names:
        assert _kernel.CONSTANTS[name] == getattr(definition, name), name


def state_of(history: list[tuple[float, float, str, bool, bool]], seen: list[str], categories: list[str]) -> UserState:
    """A user's state from events ``(seconds after T0, amount, merchant, international, new merchant)``
    (sorted here) and seen-sets of merchant ids and categories."""
    history = sorted(history, key=lambda e: e[0])
    return UserState(
        times=array("d", [T0 + e[0] for e in history]),
        amounts=array("d", [e[1] for e in history]),
        merchant_hashes=array("I", [entity_hash(e[2]) for e in history]),
        hours=bytearray(int((T0 + e[0]) // H) % 24 for e in history),
        international=bytearray(int(e[3]) for e in history),
        new_merchant=bytearray(int(e[4]) for e in history),
        merchants=array("I", [entity_hash(m) for m in seen]),
        categories=array("I", [entity_hash(c) for c in categories]),
    )


amounts = st.one_of(st.sampled_from([0.0, 1.0, 9.99, 25.0, 25.0, 120.5]),
                    st.floats(min_value=0.0, max_value=50_000.0, allow_nan=False))
events = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 40 * 24 * 4).map(lambda q: q * 900.0),  # quarter hours: ties and window edges
                  st.floats(min_value=0.0, max_value=40 * D, allow_nan=False)),
        amounts,
        st.sampled_from(MERCHANTS),
        st.booleans(),
        st.booleans(),
    ),
    max_size=300,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=events,
    offset=st.one_of(st.integers(-5 * 24 * 4, 45 * 24 * 4).map(lambda q: q * 900.0),
                     st.floats(min_value=-5 * D, max_value=45 * D, allow_nan=False)),
    amount=amounts,
    merchant=st.sampled_from([*MERCHANTS, "never-seen"]),
    category=st.sampled_from(CATEGORIES),
    international=st.booleans(),
    last_international=st.sampled_from([None, False, True]),
    seen_international=st.booleans(),
    late_at=st.booleans(),
)
def test_the_kernel_equals_the_python_definition_bit_for_bit(
    history: list[tuple[float, float, str, bool, bool]], offset: float, amount: float, merchant: str,
    category: str, international: bool, last_international: bool | None, seen_international: bool,
    late_at: bool,
) -> None:
    state = state_of(history, MERCHANTS[:3], CATEGORIES[:2])
    state.seen_international = seen_international
    state.last_international = last_international
    txn = make_txn(T0 + offset, amount, merchant, category, international)
    at = state.times[-1] if late_at and state.times else None
    got = user_features(state, txn, at)
    want = reference_features.user_features(state, txn, at)
    assert len(got) == len(want) == len(FEATURE_NAMES) - 9
    assert bits(got) == bits(want), [
        (FEATURE_NAMES[i], g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if float(g).hex() != float(w).hex()]


def test_a_long_history_beyond_the_kernels_stack_buffer() -> None:
    """More events in 30 days than the kernel sorts on its stack (a blob from a larger MAX_EVENTS)."""
    n = 700
    state = UserState(
        times=array("d", [T0 + i * 3000.0 for i in range(n)]),
        amounts=array("d", [float((i * 7919) % 1000) for i in range(n)]),
        merchant_hashes=array("I", [entity_hash(MERCHANTS[i % 5]) for i in range(n)]),
        hours=bytearray(int((T0 + i * 3000.0) // H) % 24 for i in range(n)),
        international=bytearray(i % 3 == 0 for i in range(n)),
        new_merchant=bytearray(i % 4 == 0 for i in range(n)),
    )
    txn = make_txn(T0 + n * 3000.0, 333.0, "m1", "grocery", True)
    assert bits(user_features(state, txn)) == bits(reference_features.user_features(state, txn))


def test_a_simulated_population_gets_the_same_vectors() -> None:
    """35 days of a small simulated population through the transition, each vector against the
    Python definition on the same state (every branch a real history takes)."""
    sim = Simulator(seed=11, n_users=150, n_merchants=200, days=35.0)
    users: dict[str, UserState] = {}
    merchants: dict[str, MerchantState] = {}
    compared = 0
    for ev in sim.stream():
        txn = parse_transaction(orjson.dumps(ev.txn))
        state = users.get(txn.user_id)
        want = reference_features.user_features(state, txn) if state is not None else None
        m = merchants.setdefault(txn.merchant_id, MerchantState())
        row, users[txn.user_id] = transition(state, m, txn)
        count_merchant_tx(m, txn.event_time, is_new_customer(row))
        if want is not None:
            assert bits(row[:len(want)]) == bits(want)
            compared += 1
    assert compared > 15_000


@pytest.mark.parametrize("bad", ["hours", "amounts", "merchant_hashes"])
def test_columns_of_different_lengths_are_refused(bad: str) -> None:
    columns = {
        "times": array("d", [T0, T0 + 60.0]),
        "amounts": array("d", [1.0, 2.0]),
        "merchant_hashes": array("I", [1, 2]),
        "hours": bytearray(b"\x01\x01"),
        "international": bytearray(2),
        "new_merchant": bytearray(2),
    }
    columns[bad] = columns[bad][:1]
    with pytest.raises(ValueError, match=f"{bad} holds 1 events, times 2"):
        _kernel.user_window(*columns.values(), T0 + 120.0, 1.0, 3, False, 1, 0.0, 0.0, 0.0, 0.0)


def test_the_kernel_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="15 arguments"):
        _kernel.user_window(array("d"))  # type: ignore[call-arg]
    with pytest.raises(OverflowError):
        _kernel.user_window(array("d"), array("d"), array("I"), bytearray(), bytearray(), bytearray(),
                            T0, 1.0, 1 << 40, False, 1, 0.0, 0.0, 0.0, 0.0)


def tables(m: MerchantState) -> tuple[dict[int, int], ...]:
    return m.tx_hours, m.tx_days, m.new_hours, m.new_days, m.fraud_hours, m.fraud_days


# What the store's scripts write (h/d/nh/nd buckets, p<partition> offsets) and what they never
# write but int() has an opinion on: signs, leading zeros, spaces, underscores, non-digits.
field_names = st.one_of(
    st.builds(lambda kind, n: kind + str(n).encode(), st.sampled_from([b"h", b"d", b"nh", b"nd", b"p"]),
              st.integers(-5, 10**6)),
    st.builds(lambda kind, tail: kind + tail, st.sampled_from([b"h", b"d", b"nh", b"nd", b"n", b"x", b""]),
              st.sampled_from([b"", b"+7", b"007", b" 12", b"1_000", b"12a", b"-", b"9" * 25, b"\xff"])),
)
field_values = st.one_of(
    st.integers(-(10**20), 10**20).map(lambda v: str(v).encode()),
    st.sampled_from([b"", b"+3", b" 4 ", b"5_0", b"x", b"1e3", b"-0", b"\xff"]),
)


@settings(max_examples=300, deadline=None)
@given(counts=st.lists(st.one_of(field_names, field_values), max_size=60),
       frauds=st.lists(st.one_of(field_names, field_values), max_size=30))
def test_the_merchant_parse_equals_the_python_parse(counts: list[bytes], frauds: list[bytes]) -> None:
    """Any flat field/value list, odd lengths included: the same tables, the same int values."""
    assert tables(_merchant_from_flat(counts, frauds)) == tables(reference_features._merchant_from_flat(counts, frauds))


def test_the_merchant_parse_of_a_real_hash() -> None:
    counts = [b"p3", b"1042", b"h490001", b"4", b"d20416", b"17", b"nh490001", b"1", b"nd20416", b"3",
              b"h490000", b"2"]
    frauds = [b"h489990", b"1", b"d20415", b"2", b"nh489990", b"5"]  # no new-customer kind in the frauds
    m = _merchant_from_flat(counts, frauds)
    assert tables(m) == ({490001: 4, 490000: 2}, {20416: 17}, {490001: 1}, {20416: 3}, {489990: 1}, {20415: 2})
    assert all(type(k) is int and type(v) is int for t in tables(m) for k, v in t.items())


def test_the_merchant_parse_checks_its_arguments() -> None:
    with pytest.raises(TypeError):
        _kernel.merchant_tables((b"h1", b"1"), ({},))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _kernel.merchant_tables([b"h1", b"1"], ([],))  # type: ignore[arg-type]


HOUR = 490_000  # 2025-11-24T16:00Z; its day starts at hour 489,984
bucket_counts = st.one_of(st.integers(0, 40), st.integers(-(2**70), 2**70), st.just(2**63 - 1))


def bucket_table(around: int, spread: int) -> st.SearchStrategy[dict[int, int]]:
    return st.dictionaries(st.integers(around - spread, around + spread), bucket_counts, max_size=80)


@settings(max_examples=300, deadline=None)
@given(tx_hours=bucket_table(HOUR, 40), tx_days=bucket_table(HOUR // 24, 40), new_hours=bucket_table(HOUR, 40),
       new_days=bucket_table(HOUR // 24, 40), fraud_hours=bucket_table(HOUR, 40),
       fraud_days=bucket_table(HOUR // 24, 40), hour=st.integers(HOUR - 30, HOUR + 30))
def test_the_merchant_window_sums_equal_the_python_sums(
    tx_hours: dict[int, int], tx_days: dict[int, int], new_hours: dict[int, int], new_days: dict[int, int],
    fraud_hours: dict[int, int], fraud_days: dict[int, int], hour: int,
) -> None:
    """Pruned tables (fewer items than the window: summed over the items) and large ones (one lookup
    per bucket), counts beyond 64 bits and sums that overflow them (the exact fallback)."""
    got = MerchantState(dict(tx_hours), dict(tx_days), dict(fraud_hours), dict(fraud_days), dict(new_hours),
                        dict(new_days))
    want = MerchantState(dict(tx_hours), dict(tx_days), dict(fraud_hours), dict(fraud_days), dict(new_hours),
                         dict(new_days))
    definition._recompute(got, hour)
    reference_features._recompute(want, hour)
    assert (got.cache_hour, got.cache) == (want.cache_hour, want.cache)
    assert all(type(v) is int for v in got.cache)


def test_the_window_sums_of_an_unpruned_offline_table_and_odd_keys() -> None:
    """91 days of hour buckets (offline, nothing pruned), and keys Python's lookups would also match
    (a float 490000.0 is the key 490000 to a dict): the same sums."""
    hours = {h: h % 7 for h in range(HOUR - 91 * 24, HOUR + 1)}
    days = {d: 100 + d % 5 for d in range(HOUR // 24 - 91, HOUR // 24 + 1)}
    odd: dict[int, int] = {HOUR - 1: 3}
    odd[float(HOUR)] = 5  # type: ignore[index]
    for tx_hours in (hours, odd):
        got = MerchantState(tx_hours=dict(tx_hours), tx_days=dict(days), new_hours=dict(tx_hours))
        want = MerchantState(tx_hours=dict(tx_hours), tx_days=dict(days), new_hours=dict(tx_hours))
        definition._recompute(got, HOUR)
        reference_features._recompute(want, HOUR)
        assert got.cache == want.cache


def test_the_window_sums_check_their_arguments() -> None:
    with pytest.raises(TypeError, match="7 arguments"):
        _kernel.window_sums({}, {}, 5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="must be dicts"):
        _kernel.window_sums({}, {}, {}, {}, {}, [], HOUR)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        _kernel.window_sums({}, {}, {}, {}, {}, {}, 2**50)


def test_the_window_sums_at_their_edges() -> None:
    """Each window's oldest bucket is in it and the one before is out, in both compiled sums:
    24 h = hours [H-23, H], 7 d / 30 d = days [D-6, D] / [D-29, D]; frauds today before hour H, and
    the past days [D-7, D-1] / [D-30, D-1]."""
    day = HOUR // 24
    entries = [(1, HOUR, 1), (1, HOUR - 23, 2), (1, HOUR - 24, 4),
               (2, day, 8), (2, day - 6, 16), (2, day - 7, 32), (2, day - 29, 64), (2, day - 30, 128),
               (3, HOUR - 23, 1), (3, HOUR - 24, 2), (4, day - 29, 4), (4, day - 30, 8)]
    assert _kernel.counts_sums(reference_features.encode_counts(entries), HOUR) == [3, 24, 120, 1, 4]
    tx_hours, tx_days, new_hours, new_days = reference_features.decode_counts(reference_features.encode_counts(entries))
    fraud_hours = {day * 24: 1, HOUR - 1: 2, HOUR: 4}
    fraud_days = {day: 8, day - 1: 16, day - 7: 32, day - 8: 64, day - 30: 128, day - 31: 256}
    sums = _kernel.window_sums(tx_hours, tx_days, new_hours, new_days, fraud_hours, fraud_days, HOUR)
    assert sums == [3, 24, 120, 3, 48, 240, 1, 4]


packed_counts = st.one_of(st.integers(0, 40), st.integers(-(2**63), 2**63 - 1))
packed_entries = st.lists(st.tuples(
    st.sampled_from([1, 2, 3, 4]),
    st.one_of(st.integers(HOUR - 40, HOUR + 40), st.integers(HOUR // 24 - 40, HOUR // 24 + 40)),
    packed_counts), max_size=200)


@settings(max_examples=300, deadline=None)
@given(entries=packed_entries, hour=st.integers(HOUR - 30, HOUR + 30))
def test_the_packed_counts_read_as_the_tables_they_hold(entries: list[tuple[int, int, int]], hour: int) -> None:
    """A merchant's packed counts (appended increments: a bucket may have several entries) fill the
    tables their entries sum to, and their window sums are the Python window sums of those tables."""
    blob = reference_features.encode_counts(entries)
    want_tables = reference_features.decode_counts(blob)
    tables: tuple[dict[int, int], dict[int, int], dict[int, int], dict[int, int]] = ({}, {}, {}, {})
    _kernel.counts_tables(blob, tables)
    assert tables == want_tables
    tx_hours, tx_days, new_hours, new_days = want_tables
    want = MerchantState(tx_hours=dict(tx_hours), tx_days=dict(tx_days), new_hours=dict(new_hours),
                         new_days=dict(new_days))
    reference_features._recompute(want, hour)
    c24, c7, c30, _, _, _, n24, n30 = want.cache
    if all(-(2**63) <= v < 2**63 for v in want.cache):
        assert _kernel.counts_sums(blob, hour) == [c24, c7, c30, n24, n30]
    else:
        with pytest.raises(ValueError, match="overflows"):
            _kernel.counts_sums(blob, hour)


def test_a_blob_the_codec_did_not_write_is_refused() -> None:
    blob = reference_features.encode_counts([(1, HOUR, 3), (2, HOUR // 24, 5), (1, HOUR, 4)])
    for bad in (b"", b"\x02" + b"\x00" * 12, blob[:-1], blob + b"\x00", b"\x01" + blob[1:],
                b"\x02" + bytes([5]) + blob[2:14], b"\x02garbage"):
        with pytest.raises(ValueError):
            _kernel.counts_sums(bad, HOUR)
        tables: tuple[dict[int, int], dict[int, int], dict[int, int], dict[int, int]] = ({}, {}, {}, {})
        with pytest.raises(ValueError):
            _kernel.counts_tables(bad, tables)
        assert tables == ({}, {}, {}, {}), "nothing filled from a refused string"
    assert _kernel.counts_sums(blob, HOUR) == [7, 5, 5, 0, 0]
    assert _kernel.counts_sums(b"\x02", HOUR) == [0, 0, 0, 0, 0]
    with pytest.raises(TypeError):
        _kernel.counts_tables(blob, ({}, {}, {}))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _kernel.counts_sums(bytearray(blob), HOUR)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        _kernel.counts_sums(blob, 2**50)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=events,
    seen=st.lists(st.sampled_from([*MERCHANTS, "never-seen", "m-other"]), max_size=70),
    seen_categories=st.lists(st.sampled_from(CATEGORIES), max_size=4),
    offset=st.one_of(st.integers(-5 * 24 * 4, 45 * 24 * 4).map(lambda q: q * 900.0),
                     st.floats(min_value=-5 * D, max_value=45 * D, allow_nan=False)),
    merchant=st.sampled_from([*MERCHANTS, "never-seen"]),
    category=st.sampled_from(CATEGORIES),
    international=st.booleans(),
)
def test_the_state_update_equals_the_python_update(
    history: list[tuple[float, float, str, bool, bool]], seen: list[str], seen_categories: list[str],
    offset: float, merchant: str, category: str, international: bool,
) -> None:
    """The compiled membership tests (the events' merchants in 30 days, the bounded LRU seen-sets,
    full ones included) leave the state exactly as the Python update did."""
    seen = seen[-definition.MAX_SEEN_MERCHANTS:]
    got, want = state_of(history, seen, seen_categories), state_of(history, seen, seen_categories)
    txn = make_txn(T0 + offset, 12.5, merchant, category, international)
    definition.apply_transaction(got, txn)
    reference_features.apply_transaction(want, txn)
    assert got == want


def test_find_u32_is_membership_in_a_slice() -> None:
    column = array("I", [7, 3, 7, 2**32 - 1])
    assert [_kernel.find_u32(column, k) for k in (7, 3, 2**32 - 1, 5)] == [0, 1, 3, -1]
    assert _kernel.find_u32(column, 7, 1, 4) == 2 and _kernel.find_u32(column, 7, 1, 2) == -1
    assert _kernel.find_u32(column, 7, -5, 99) == 0  # bounds clamped, as a slice's
    assert _kernel.find_u32(column, -1) == -1 and _kernel.find_u32(column, 2**40) == -1  # as `in` says
    with pytest.raises(ValueError, match="4-byte items"):
        _kernel.find_u32(bytearray(b"abc"), 1)
