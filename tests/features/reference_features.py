"""The pure Python the compiled kernel (``fraudactors/features/_kernel.c``) replaced, and must equal
bit for bit (``test_kernel.py``): the user-window block of the feature vector (``user_features``),
the feature store's parse of a merchant's bucket hashes (``_merchant_from_flat``), a merchant's
window sums at an event hour (``_recompute``), the packed merchant counts written by the write script
(``decode_counts`` / ``encode_counts``, scripts.COUNTS_CODEC) and the state update (``apply_transaction``, whose
membership tests of the seen-sets and the events' merchants are compiled).

This is the code as it was written in Python before it was compiled, with one fix made in both:
``amount_sum_24h_to_daily_30d`` is 0 when the 30-day daily average underflows to 0 (a few
subnormal amounts, e.g. 5e-324; the division raised ZeroDivisionError, which stopped the
partition). A feature changed in the kernel is changed here first, and the differential test
holds the two together.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from itertools import compress
from operator import mul

from fraudactors.features.definition import (
    _NO_HISTORY,
    _NO_SEQUENCE,
    _ZEROS,
    FREQUENT_USES,
    HABIT_HOURS,
    HISTORY_S,
    HOUR_S,
    LAST_N,
    MAX_EVENTS,
    MAX_SEEN_CATEGORIES,
    MAX_SEEN_MERCHANTS,
    NO_PREVIOUS_TX,
    REGULAR_USES,
    UNUSUAL_HOUR_MIN_EVENTS,
    UNUSUAL_HOUR_SHARE,
    W_1H,
    W_6H,
    W_7D,
    W_10M,
    W_24H,
    W_30D,
    ZSCORE_MIN_STD,
    MerchantState,
    UserState,
    _newcomer_abroad_regulars,
    _ratio,
    _time_features,
    category_hash,
    entity_hash,
)
from fraudactors.features.schema import Transaction

_BYTEORDER = sys.byteorder  # of array("I"), whose bytes _uses searches
# _NEAR[h]: a bytes.translate table mapping an hour of the day to 1 when it is "near" hour ``h``
# (circular distance <= HABIT_HOURS) and to 0 otherwise, so how many of a user's event hours are
# near ``h`` is ``hours.translate(_NEAR[h]).count(1)``: two passes in C instead of one per hour.
_NEAR = tuple(bytes(1 if v < 24 and min((v - h) % 24, (h - v) % 24) <= HABIT_HOURS else 0 for v in range(256))
              for h in range(24))
def user_features(state: UserState | None, txn: Transaction, at: float | None = None) -> list[float]:
    """Transaction + user features (everything but the merchant block); reads ``state`` only.

    ``at`` moves the user windows to another reference time (a late record, see the module doc);
    the transaction's own time features stay at its event time.
    """
    out = _time_features(txn)
    t = txn.event_time if at is None else at
    amount = txn.amount
    merchant = entity_hash(txn.merchant_id)
    if state is None or not state.times:
        new_merchant = 1.0 if state is None or merchant not in state.merchants else 0.0
        new_category = 1.0 if state is None or category_hash(txn.merchant_category) not in state.categories else 0.0
        seen_intl = state is not None and state.seen_international
        out += (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, NO_PREVIOUS_TX,
                new_merchant, new_category, 1.0 if txn.is_international and not seen_intl else 0.0, 0.0)
        out += _NO_HISTORY
        out += _NO_SEQUENCE
        out += _newcomer_abroad_regulars(txn.is_international)
        return out
    times = state.times
    amounts = state.amounts
    end = bisect_right(times, t)
    s10m = bisect_right(times, t - W_10M, 0, end)
    s1h = bisect_right(times, t - W_1H, 0, end)
    s24h = bisect_right(times, t - W_24H, 0, end)
    s7d = bisect_right(times, t - W_7D, 0, end)
    s30d = bisect_right(times, t - W_30D, 0, end)
    n30 = end - s30d
    window = amounts[s30d:end].tolist()  # one float object per event, made once (sums, sort)
    sum30 = sum(window)
    sum24 = sum(window[s24h - s30d:])
    if n30:
        avg = sum30 / n30
        var = sum(map(mul, window, window)) / n30 - avg * avg
        std = math.sqrt(var) if var > 0.0 else 0.0
        # amount 0 is a card-verification authorisation: a user whose 30 days are all verifications
        # has an average of 0, and the ratio is taken against one cent instead
        ratio = _ratio(amount, avg)
        zscore = (amount - avg) / (std if std > ZSCORE_MIN_STD else ZSCORE_MIN_STD)
    else:
        avg = std = zscore = 0.0
        ratio = 1.0
    since = t - times[end - 1] if end else NO_PREVIOUS_TX
    since2 = t - times[end - 2] if end >= 2 else NO_PREVIOUS_TX
    last_intl = state.last_international
    out += (
        float(end - s10m),
        float(end - s1h),
        float(end - s24h),
        float(end - s7d),
        float(n30),
        sum(window[s1h - s30d:]),
        sum24,
        sum(window[s7d - s30d:]),
        sum30,
        avg,
        std,
        ratio,
        zscore,
        since,
        0.0 if merchant in state.merchants else 1.0,
        0.0 if category_hash(txn.merchant_category) in state.categories else 1.0,
        1.0 if txn.is_international and not state.seen_international else 0.0,
        1.0 if last_intl is not None and last_intl != txn.is_international else 0.0,
    )
    if not n30:
        out += _NO_HISTORY
        out += (0.0, 0.0, since2, 0.0, 1.0, 0.0)
        out += _abroad_and_regulars(state, txn.is_international, merchant, t, s30d, s7d, s24h, end)
        return out
    hours = state.hours[s30d:end]
    hour = int(out[3])
    near = hours.translate(_NEAR[hour]).count(1)
    ordered = sorted(window)
    median = ordered[n30 // 2]
    recent = state.new_merchant[s24h:end]
    out += (
        near / n30,
        bisect_left(ordered, amount) / n30,
        _ratio(amount, median),
        float(end - s24h) / (n30 / 30.0),
        sum24 / (sum30 / 30.0) if sum30 / 30.0 > 0.0 else 0.0,
        float(sum(recent)),
        float(sum(compress(window[s24h - s30d:], recent))),
        float(len(set(state.merchant_hashes[s24h:end]))),
        float(sum(state.international[s24h:end])),
    )
    # the sequence. Hours are judged against the habit before the last 24 h (the 30 days up to
    # then), so a day of payments at odd hours does not make its own hours look usual.
    s6h = bisect_right(times, t - W_6H, s24h, end)
    last = max(s30d, end - LAST_N)
    n_ref = s24h - s30d
    unusual = 0.0
    habit_last = 0.0
    if n_ref:
        ref = state.hours[s30d:s24h]
        near_of: dict[int, int] = {}  # only the hours asked for (a few per transaction)
        for h in set(state.hours[min(s24h, last):end]):
            near_of[h] = ref.translate(_NEAR[h]).count(1)
        if n_ref >= UNUSUAL_HOUR_MIN_EVENTS:
            limit = UNUSUAL_HOUR_SHARE * n_ref
            unusual = float(sum([1 for h in state.hours[s24h:end] if near_of[h] < limit]))
        habit_last = sum([near_of[h] for h in state.hours[last:end]]) / n_ref / (end - last)
    out += (
        float(sum(state.new_merchant[s6h:end])),
        float(sum(state.new_merchant[last:end])),
        since2,
        unusual,
        sum([_ratio(a, median) for a in window[last - s30d:]]) / (end - last),
        habit_last,
    )
    out += _abroad_and_regulars(state, txn.is_international, merchant, t, s30d, s7d, s24h, end)
    return out


def _abroad_and_regulars(state: UserState, international: bool, merchant: int, t: float,
                         s30d: int, s7d: int, s24h: int, end: int) -> tuple[float, ...]:
    """``international_streak`` .. ``irregular_merchant_count_6h`` (module doc) from the earlier
    events ``[s30d, end)`` of the 30 days and this transaction (``merchant``: its entity hash)."""
    times = state.times
    intl = state.international
    x = 1 if international else 0
    streak = streak_hours = 0.0
    if x:
        last_domestic = intl.rfind(0, s30d, end)
        first = s30d if last_domestic < 0 else last_domestic + 1
        streak = float(end - first + 1)
        if first < end:
            streak_hours = (t - times[first]) / HOUR_S
    count7 = intl.count(1, s7d, end) + x
    first7 = intl.find(1, s7d, end)
    # how often the user used each merchant of the last 24 h (and this one) in the 30 days before
    # them: a search of the events' hashes as bytes (array.count would box every item)
    hashes = state.merchant_hashes.tobytes()
    lo, hi = s30d * 4, s24h * 4
    uses = _uses(hashes, merchant.to_bytes(4, _BYTEORDER), lo, hi)
    irregular = irregular6 = 1 if uses < REGULAR_USES else 0
    infrequent = 1 if uses < FREQUENT_USES else 0
    if s24h < end:
        s6h = bisect_right(times, t - W_6H, s24h, end)
        for i in range(s24h, end):
            uses = _uses(hashes, hashes[i * 4:i * 4 + 4], lo, hi)
            if uses < REGULAR_USES:
                irregular += 1
                if i >= s6h:
                    irregular6 += 1
            if uses < FREQUENT_USES:
                infrequent += 1
    return (
        streak,
        streak_hours,
        float(count7),
        count7 / (end - s7d + 1),
        (t - times[first7]) / HOUR_S if first7 >= 0 else NO_PREVIOUS_TX,
        float(irregular),
        float(infrequent),
        irregular / (end - s24h + 1),
        float(irregular6),
    )


def _uses(hashes: bytes, key: bytes, lo: int, hi: int) -> int:
    """How many of the 4-byte items in ``hashes[lo:hi]`` are ``key``, counted up to ``FREQUENT_USES``."""
    n = 0
    i = hashes.find(key, lo, hi)
    while i >= 0:
        if i % 4:  # straddles two items: not one of them
            i = hashes.find(key, i + 1, hi)
            continue
        n += 1
        if n == FREQUENT_USES:
            break
        i = hashes.find(key, i + 4, hi)
    return n


# Bucket field name -> (0: hour / 1: day / 2: new-customer hour / 3: new-customer day, bucket) or
# None (not a bucket); the merchants of a batch share their field names, so each is parsed once.
# Bounded: cleared when it grows past 4,096.
_FIELDS: dict[bytes, tuple[int, int] | None] = {}
_KINDS = {b"h": 0, b"d": 1, b"nh": 2, b"nd": 3}


def _bucket_field(key: bytes) -> tuple[int, int] | None:
    cut = 2 if key[:1] == b"n" else 1
    kind = _KINDS.get(key[:cut])
    parsed: tuple[int, int] | None = None
    if kind is not None:
        try:
            parsed = (kind, int(key[cut:]))
        except ValueError:
            parsed = None
    if len(_FIELDS) >= 4096:
        _FIELDS.clear()
    _FIELDS[key] = parsed
    return parsed


def _merchant_from_flat(counts: list[bytes], frauds: list[bytes]) -> MerchantState:
    """Full bucket state from two HGETALL replies (flat field/value lists)."""
    m = MerchantState()
    fields = _FIELDS
    for targets, flat in (((m.tx_hours, m.tx_days, m.new_hours, m.new_days), counts),
                          ((m.fraud_hours, m.fraud_days), frauds)):
        for key, value in zip(flat[::2], flat[1::2], strict=False):
            parsed = fields[key] if key in fields else _bucket_field(key)
            if parsed is not None and parsed[0] < len(targets):
                try:
                    targets[parsed[0]][parsed[1]] = int(value)
                except ValueError:
                    continue
    return m


COUNTS_ENTRY = struct.Struct("<Biq")  # kind (1 h, 2 d, 3 nh, 4 nd), bucket, count
CountTables = tuple[dict[int, int], dict[int, int], dict[int, int], dict[int, int]]


def decode_counts(blob: bytes) -> CountTables:
    """A merchant's packed counts (version 2) as four tables: h, d, nh, nd buckets, each bucket's
    entries summed."""
    if blob[:1] != b"\x02" or (len(blob) - 1) % COUNTS_ENTRY.size:
        raise ValueError("not a version 2 merchant counts string")
    tables: CountTables = ({}, {}, {}, {})
    for kind, bucket, count in COUNTS_ENTRY.iter_unpack(blob[1:]):
        if not 1 <= kind <= 4:
            raise ValueError(f"entry of kind {kind}")
        table = tables[kind - 1]
        table[bucket] = table.get(bucket, 0) + count
    return tables


def encode_counts(entries: list[tuple[int, int, int]]) -> bytes:
    """The packed counts of ``(kind, bucket, count)`` entries, in their order (a bucket may repeat)."""
    return b"\x02" + b"".join(COUNTS_ENTRY.pack(*entry) for entry in entries)


def entries_of(tables: CountTables) -> list[tuple[int, int, int]]:
    """One entry per bucket of four tables."""
    return [(kind, bucket, count) for kind, table in enumerate(tables, start=1) for bucket, count in table.items()]


def _recompute(m: MerchantState, hour: int) -> None:
    day = hour // 24
    c24 = sum(map(m.tx_hours.get, range(hour - 23, hour + 1), _ZEROS)) if m.tx_hours else 0
    c7 = c30 = 0
    if m.tx_days:
        get_d = m.tx_days.get
        c7 = sum(map(get_d, range(day - 6, day + 1), _ZEROS))
        c30 = c7 + sum(map(get_d, range(day - 29, day - 6), _ZEROS))
    n24 = sum(map(m.new_hours.get, range(hour - 23, hour + 1), _ZEROS)) if m.new_hours else 0
    n30 = sum(map(m.new_days.get, range(day - 29, day + 1), _ZEROS)) if m.new_days else 0
    f_today = f7_past = f30_past = 0
    if m.fraud_hours:
        f_today = sum(map(m.fraud_hours.get, range(day * 24, hour), _ZEROS))
    if m.fraud_days:
        get_fd = m.fraud_days.get
        f7_past = sum(map(get_fd, range(day - 7, day), _ZEROS))
        f30_past = f7_past + sum(map(get_fd, range(day - 30, day - 7), _ZEROS))
    m.cache_hour = hour
    m.cache = [c24, c7, c30, f_today, f7_past, f30_past, n24, n30]


def _touch(seen: array[int], key: int, cap: int) -> None:
    if key in seen:
        seen.remove(key)
    elif len(seen) >= cap:
        del seen[0]
    seen.append(key)


def apply_transaction(state: UserState, txn: Transaction) -> None:
    """Add ``txn`` to the user's state in place (prune to 30 days and ``MAX_EVENTS``)."""
    times = state.times
    t = txn.event_time
    pos = bisect_right(times, t)
    merchant = entity_hash(txn.merchant_id)
    start = bisect_right(times, t - W_30D, 0, pos)
    new_merchant = 0 if merchant in state.merchant_hashes[start:pos] else 1
    times.insert(pos, t)
    state.amounts.insert(pos, txn.amount)
    state.merchant_hashes.insert(pos, merchant)
    state.hours.insert(pos, int(t // HOUR_S) % 24)
    state.international.insert(pos, 1 if txn.is_international else 0)
    state.new_merchant.insert(pos, new_merchant)
    cut = bisect_right(times, times[-1] - HISTORY_S)
    overflow = len(times) - MAX_EVENTS
    if overflow > cut:
        cut = overflow
    if cut > 0:
        for events in (times, state.amounts, state.merchant_hashes, state.hours, state.international,
                       state.new_merchant):
            del events[:cut]
    _touch(state.merchants, merchant, MAX_SEEN_MERCHANTS)
    _touch(state.categories, category_hash(txn.merchant_category), MAX_SEEN_CATEGORIES)
    if txn.is_international:
        state.seen_international = True
    state.last_international = txn.is_international
