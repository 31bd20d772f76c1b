"""The ONE feature definition, shared by training (``offline.py``) and serving (``store.py``).

Everything here is a deterministic function of (user state, merchant context, transaction);
the only clock is the transaction's own ``event_time``, so replaying old data computes exactly
what live traffic computed. ``offline.py`` and ``store.py`` both call :func:`transition` (and
the merchant helpers below), so training and serving cannot drift apart.

Compiled
    For a user with stored events, the block ``tx_count_10m`` .. ``irregular_merchant_count_6h``
    is computed by :func:`fraudactors.features._kernel.user_window` (C, ``_kernel.c``) over the
    state's arrays: the per-event loops are most of a transaction's feature work. A merchant's
    window sums (``_kernel.window_sums``) and the membership tests of the seen-sets and the
    events' merchants (``_kernel.find_u32``) are compiled too. Their arithmetic is the Python
    definition's (``tests/features/reference_features.py``) operation for operation, and
    ``tests/features/test_kernel.py`` holds the two equal bit for bit. A feature of that block
    changes in both, reference first.

User state (:class:`UserState`)
    The user's recent events (event time, amount, a 32-bit hash of the merchant, the hour of the
    day, whether it was international, whether its merchant was new in the user's 30 days)
    kept sorted by event time, pruned to the
    ``HISTORY_S`` (30 days) before the newest event and capped at the ``MAX_EVENTS`` most recent
    ones (the same cap applies offline, so a user with more than ``MAX_EVENTS`` transactions in
    30 days saturates identically in training and serving); bounded LRU seen-sets of merchants
    (``MAX_SEEN_MERCHANTS``) and categories (``MAX_SEEN_CATEGORIES``), kept as the same 32-bit
    hashes as the events' merchants (see "Habits" below); whether the user was ever
    seen abroad; the previous transaction's ``is_international``; and the last applied
    ``(partition, epoch, offset)`` so a replayed record is not counted twice and a former owner of
    the partition cannot overwrite the current one's state.

Late records
    A transaction older than the user's history (event time before the newest stored event minus
    ``HISTORY_S``) is scored from the current state -- its user windows are evaluated at the
    newest stored event, as if it arrived right after it -- and leaves the state unchanged: a
    record from last month can neither erase the history nor make the user look new.

User windows
    A window of length ``w`` for a transaction at time ``t`` holds the user's *earlier* events
    with event time in ``(t - w, t]`` -- the current transaction itself is not counted.
    Out-of-order events (earlier than the user's newest) are handled deterministically: windows
    only look at stored events at or before ``t``, and the event is then inserted at its place
    in time. The seen-sets and ``intl_changed`` follow arrival order, so a late event can see a
    merchant that was first used "after" it; with events in time order (the normal case and the
    offline order) both views agree.

Habits and the last 24 hours
    Over the same earlier 30-day window: the share of the user's transactions in this hour of the
    day (UTC, as ``hour_of_day``) or up to 2 hours either side (circular); where the amount ranks
    among the user's amounts and its ratio to their median; the last 24 h against the 30-day
    daily average (count and spend). In the last 24 h: the transactions at merchants new to the
    user (no earlier transaction of theirs there in 30 days, judged when each was applied), their
    spend, the distinct merchants and the international transactions. Merchants are compared by
    ``zlib.crc32`` of their id (deterministic, so training and serving agree bit for bit; a
    collision within one user's 30 days is vanishingly rare and only merges two merchants).

The sequence of the last transactions
    From the same stored events: the transactions at merchants new to the user in the last 6 h
    and among the user's last 3 (within 30 days), the time since the second-to-last transaction,
    the last 24 h's transactions at hours unusual for the user (near less than 10 % of their
    events before the last 24 h, once there are at least 5 of those), and of the last 3
    transactions the mean ratio of their amounts to the 30-day median and the mean hour-habit share
    of their hours against the events before the last 24 h (so a day of payments at odd hours does
    not make its own hours look usual). They need no stored field the blob (v3 and v4) does not have.

The cardholder abroad and their regular merchants
    Also from the stored events: the run of international transactions this one continues
    (``international_streak``: this one and the international ones right before it, back to the
    last domestic one within 30 days; 0 when this one is domestic; and the hours since the run's
    first), the last 7 days' international transactions with this one (count, share of the 7 days'
    transactions with this one, hours since the first of them or -1), and the last 24 h's
    transactions with this one at merchants the user used fewer than ``REGULAR_USES`` (2) times --
    ``FREQUENT_USES`` (3) for ``infrequent_merchant_count_24h`` -- in the 30 days before the last
    24 h (count, share, and the count of the last 6 h). A trip is a run of international
    payments; a stolen card's quiet spree is a day of payments away from the cardholder's regulars.

The merchant category code
    ``merchant_category_code`` is the transaction's ``merchant_category`` as its place in a fixed
    catalogue (:data:`MERCHANT_CATEGORIES`, like a card network's fixed MCC codes; appending to it
    keeps the codes of the others), ``UNKNOWN_CATEGORY_CODE`` (-1) for any other category
    (``"unknown"`` included). It depends on the transaction alone, so it is exact in degraded mode
    and the fallbacks read it too. Codes are ordinal numbers, not amounts: a tree model splits them
    into groups of categories.

Merchant windows (:class:`MerchantState`)
    Transaction counts live in hour buckets (24h window = hours ``[H-23, H]``) and day buckets
    (7d / 30d = days ``[D-6, D]`` / ``[D-29, D]``) keyed by the transaction's event hour/day,
    because many partitions update them concurrently (Redis ``HINCRBY``). Fraud labels are
    bucketed by their ``labeled_at`` hour/day and count only from the start of the hour after
    they were reported: 7d = days ``[D-7, D-1]`` plus today's hours before ``H`` (30d likewise),
    so every counted label has ``labeled_at <= event_time`` (never a leak from the future; a
    label reported within the same hour waits for the next hour). Smoothed fraud rate =
    ``frauds / (merchant transactions in the window + MERCHANT_RATE_PRIOR)``.

The merchant's new customers
    The same hour/day buckets for the merchant's transactions whose card had not used it (the
    transaction's ``is_new_merchant``: not in the user's seen-set of ``MAX_SEEN_MERCHANTS``
    merchants), counted with them: a compromised terminal is paid by many
    cards that never shopped there, before its frauds are reported. The 24 h count against the
    30-day daily average, with a prior of one, ``(n24 + 1) / (n30 / 30 + 1)``, and the reported
    frauds of 30 days per new customer, ``frauds / (new customers in 30 days + MERCHANT_RATE_PRIOR)``
    (a popular merchant's regulars do not dilute it). A merchant without counts gets 1 and 0.

Degraded mode (:func:`transaction_only_features`)
    The same vector (the transaction-only features, ``merchant_category_code`` included, exact) with
    every state-dependent feature at the value a brand-new user at a brand-new merchant gets: counts and sums 0, mean and std 0, ``amount_to_avg_30d`` 1,
    z-score 0, ``seconds_since_last_tx`` = ``NO_PREVIOUS_TX`` (-1), ``is_new_merchant`` and
    ``is_new_category`` 1, ``is_new_country`` = ``is_international``, ``intl_changed`` 0, the
    habit and 24-hour features 0 except ``amount_rank_30d`` 0.5 and ``amount_to_median_30d`` 1,
    the sequence features 0 except ``seconds_since_2nd_last_tx`` -1 and ``amount_to_median_last3``
    1, the abroad features those of a first transaction (``international_streak``, the 7-day count
    and share = ``is_international``, the hours 0 and -1), the regular-merchant counts and share 1
    (this transaction, at a merchant never used), merchant counts, fraud counts and rates 0,
    ``merchant_new_customer_24h_to_daily_30d`` 1.
"""

from __future__ import annotations

import math
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat

from fraudactors.features._kernel import find_u32, user_window, window_sums
from fraudactors.features.schema import Transaction

HOUR_S = 3600
DAY_S = 86400
# user windows: 10m, 1h, 24h, 7d, 30d (the longest is also how much history a user keeps)
W_10M = 600.0
W_1H = 3600.0
W_6H = 6 * 3600.0
W_24H = 86400.0
W_7D = 7 * 86400.0
W_30D = 30 * 86400.0
HISTORY_S = W_30D
MAX_EVENTS = 256
MAX_SEEN_MERCHANTS = 64
MAX_SEEN_CATEGORIES = 32
NO_PREVIOUS_TX = -1.0
NIGHT_HOURS_END = 6  # 00:00-05:59 UTC is night
MERCHANT_RATE_PRIOR = 10.0
ZSCORE_MIN_STD = 1.0
MIN_AVERAGE = 0.01
HABIT_HOURS = 2  # "near this time of day": the same hour of the day or up to 2 either side
UNUSUAL_HOUR_SHARE = 0.1  # an hour "near" less than this share of the user's events before the last 24 h ...
UNUSUAL_HOUR_MIN_EVENTS = 5  # ... is unusual once there are at least this many of them
LAST_N = 3  # "the last transactions" of the sequence features
REGULAR_USES = 2  # a merchant the user used at least this often in the 30 days before the last 24 h is regular ...
FREQUENT_USES = 3  # ... and at least this often, frequent
# The fixed catalogue of merchant categories: a category's code is its place here (append only, so
# the codes of the others never change); any other category gets UNKNOWN_CATEGORY_CODE.
MERCHANT_CATEGORIES: tuple[str, ...] = (
    "grocery", "restaurant", "fuel", "transport", "retail", "pharmacy", "entertainment", "utilities",
    "online_retail", "digital_goods", "electronics", "travel", "hotel", "jewelry", "gift_cards",
    "money_transfer",
)
UNKNOWN_CATEGORY_CODE = -1.0
_CATEGORY_CODE: dict[str, float] = {name: float(i) for i, name in enumerate(MERCHANT_CATEGORIES)}
_ZEROS = repeat(0)

FEATURE_NAMES: tuple[str, ...] = (
    # the transaction alone
    "amount",
    "log_amount",
    "is_international",
    "hour_of_day",
    "day_of_week",
    "is_night",
    "merchant_category_code",
    # user velocity and amounts, earlier events in (t - w, t]
    "tx_count_10m",
    "tx_count_1h",
    "tx_count_24h",
    "tx_count_7d",
    "tx_count_30d",
    "amount_sum_1h",
    "amount_sum_24h",
    "amount_sum_7d",
    "amount_sum_30d",
    "amount_avg_30d",
    "amount_std_30d",
    "amount_to_avg_30d",
    "amount_zscore_30d",
    "seconds_since_last_tx",
    # novelty against the user's bounded seen-sets
    "is_new_merchant",
    "is_new_category",
    "is_new_country",
    "intl_changed",
    # habits over the user's earlier 30 days, and the last 24 h against them
    "hour_habit_share_30d",
    "amount_rank_30d",
    "amount_to_median_30d",
    "tx_count_24h_to_daily_30d",
    "amount_sum_24h_to_daily_30d",
    # the user's last 24 h: merchants new to the user, distinct merchants, abroad
    "new_merchant_count_24h",
    "new_merchant_amount_24h",
    "distinct_merchants_24h",
    "international_count_24h",
    # the sequence of the user's last transactions: merchants new to the user in the last 6 h and
    # among the last 3 within 30 days, the time since the second-to-last, the last 24 h's
    # transactions at hours unusual for the user before them, and how the last 3 sat against the
    # user's habits (the 30-day median amount; the hour habit before the last 24 h)
    "new_merchant_count_6h",
    "new_merchant_last3",
    "seconds_since_2nd_last_tx",
    "unusual_hour_count_24h",
    "amount_to_median_last3",
    "hour_habit_share_last3",
    # the cardholder abroad: the run of international transactions this one continues, and the
    # last 7 days' international ones (this one included)
    "international_streak",
    "international_streak_hours",
    "international_count_7d",
    "international_share_7d",
    "hours_since_first_international_7d",
    # the cardholder's regular merchants: the last 24 h's transactions (this one included) at
    # merchants they used fewer than 2 (3) times in the 30 days before the last 24 h
    "irregular_merchant_count_24h",
    "infrequent_merchant_count_24h",
    "irregular_merchant_share_24h",
    "irregular_merchant_count_6h",
    # merchant activity (bucketed) and risk from delayed labels
    "merchant_tx_count_24h",
    "merchant_tx_count_7d",
    "merchant_tx_count_30d",
    "merchant_fraud_count_7d",
    "merchant_fraud_count_30d",
    "merchant_fraud_rate_7d",
    "merchant_fraud_rate_30d",
    # the merchant's new customers (transactions whose card had not used it: ``is_new_merchant``)
    "merchant_new_customer_24h_to_daily_30d",
    "merchant_fraud_per_new_customer_30d",
)
N_FEATURES = len(FEATURE_NAMES)
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
# Where a vector says whether its card was new to the merchant: what the merchant's new-customer
# buckets count (``count_merchant_tx(..., new_customer=...)``).
NEW_CUSTOMER_INDEX = FEATURE_INDEX["is_new_merchant"]


def is_new_customer(features: Sequence[float]) -> bool:
    """Does the vector say its card was new to the merchant (what its new-customer buckets count)?"""
    return bool(features[NEW_CUSTOMER_INDEX] == 1.0)


# Features that depend on no stored state (exact in degraded mode too).
TRANSACTION_ONLY = FEATURE_NAMES[:7]
# Features computed from merchant counters that several partitions increment concurrently:
# exact when one writer processes events in time order, eventually consistent otherwise.
MERCHANT_COUNT_FEATURES = (
    "merchant_tx_count_24h",
    "merchant_tx_count_7d",
    "merchant_tx_count_30d",
    "merchant_fraud_rate_7d",
    "merchant_fraud_rate_30d",
    "merchant_new_customer_24h_to_daily_30d",
    "merchant_fraud_per_new_customer_30d",
)


def entity_hash(value: str) -> int:
    """The 32-bit hash a user's events and seen-sets keep of a merchant or category."""
    return zlib.crc32(value.encode("utf-8"))


# A category is hashed for every transaction and there are few of them: cached, bounded (any
# string is a valid category, so the cache is cleared when it grows past its size).
_CATEGORY_HASHES: dict[str, int] = {}


def category_hash(category: str) -> int:
    h = _CATEGORY_HASHES.get(category)
    if h is None:
        if len(_CATEGORY_HASHES) >= 4096:
            _CATEGORY_HASHES.clear()
        h = _CATEGORY_HASHES[category] = entity_hash(category)
    return h


@dataclass(slots=True)
class UserState:
    """Per-user state. Owned by whoever holds it; :func:`transition` updates it in place."""

    # The per-event columns are machine arrays, as the state blob stores them (state_codec copies
    # them in and out without a Python object per event); their values are the same doubles.
    times: array[float] = field(default_factory=lambda: array("d"))  # sorted ascending
    amounts: array[float] = field(default_factory=lambda: array("d"))  # aligned with times, like the four below
    merchant_hashes: array[int] = field(default_factory=lambda: array("I"))  # entity_hash(merchant_id)
    hours: bytearray = field(default_factory=bytearray)  # hour of the day (UTC) of each event
    international: bytearray = field(default_factory=bytearray)  # 1 when the event was international
    new_merchant: bytearray = field(default_factory=bytearray)  # 1 when its merchant was new in 30 days
    # the seen-sets: entity_hash of the merchant ids / categories, LRU order, most recent last
    merchants: array[int] = field(default_factory=lambda: array("I"))
    categories: array[int] = field(default_factory=lambda: array("I"))
    seen_international: bool = False
    last_international: bool | None = None  # of the last applied transaction (arrival order)
    partition: int = -1  # last applied (partition, epoch, offset); -1 = none
    offset: int = -1
    epoch: int = 0  # the partition owner's fencing epoch that wrote this state


@dataclass(slots=True)
class MerchantState:
    """Merchant buckets: transaction counts by event hour/day (all, and those of new customers),
    fraud labels by labeled_at hour/day."""

    tx_hours: dict[int, int] = field(default_factory=dict)
    tx_days: dict[int, int] = field(default_factory=dict)
    fraud_hours: dict[int, int] = field(default_factory=dict)
    fraud_days: dict[int, int] = field(default_factory=dict)
    new_hours: dict[int, int] = field(default_factory=dict)  # transactions of new customers
    new_days: dict[int, int] = field(default_factory=dict)
    # The window sums at one event hour, kept current by count_merchant_tx (a merchant sees many
    # transactions per hour); change the dicts only through the count_* functions.
    cache_hour: int = -1
    # c24, c7, c30, frauds today, 7 / 30 past days, new customers' n24, n30
    cache: list[int] = field(default_factory=list)


def hour_of(t: float) -> int:
    return int(t // HOUR_S)


def day_of(t: float) -> int:
    return int(t // DAY_S)


def merchant_features(m: MerchantState | None, t: float) -> tuple[float, ...]:
    """The 9 merchant features at event time ``t`` (before this transaction is counted)."""
    if m is None:
        return _NO_MERCHANT
    hour = int(t // HOUR_S)
    cached = m.cache_hour
    if cached != hour:
        if cached < hour < cached + 24 and hour // 24 == cached // 24:
            _advance(m, cached, hour)
        else:
            _recompute(m, hour)
    c24, c7, c30, f_today, f7_past, f30_past, n24, n30 = m.cache
    f7 = f_today + f7_past
    f30 = f_today + f30_past
    return (float(c24), float(c7), float(c30), float(f7), float(f30),
            f7 / (c7 + MERCHANT_RATE_PRIOR), f30 / (c30 + MERCHANT_RATE_PRIOR),
            (n24 + 1.0) / (n30 / 30.0 + 1.0), f30 / (n30 + MERCHANT_RATE_PRIOR))


# a merchant without any counted transaction or label (what an empty MerchantState gives)
_NO_MERCHANT = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# The window sums of a merchant are cached for one event hour and kept exact: count_merchant_tx
# adds to them, count_merchant_fraud drops them, and moving forward within the same day only
# adds the hours that entered the 24h window and subtracts the ones that left it (there
# ``sum(map(dict.get, range, repeat(0)))`` loops in C). A new day or an earlier hour recomputes
# them, in C (``_kernel.window_sums``).

def _recompute(m: MerchantState, hour: int) -> None:
    m.cache = window_sums(m.tx_hours, m.tx_days, m.new_hours, m.new_days, m.fraud_hours, m.fraud_days, hour)
    m.cache_hour = hour


def _advance(m: MerchantState, old: int, new: int) -> None:
    cache = m.cache
    get_h = m.tx_hours.get
    # 24h window [old-23, old] -> [new-23, new]
    cache[0] += sum(map(get_h, range(old + 1, new + 1), _ZEROS)) - sum(map(get_h, range(old - 23, new - 23), _ZEROS))
    if m.fraud_hours:  # today's reported hours [day*24, old) -> [day*24, new)
        cache[3] += sum(map(m.fraud_hours.get, range(old, new), _ZEROS))
    if m.new_hours:
        get_n = m.new_hours.get
        cache[6] += sum(map(get_n, range(old + 1, new + 1), _ZEROS)) - sum(map(get_n, range(old - 23, new - 23), _ZEROS))
    m.cache_hour = new


def count_merchant_tx(m: MerchantState, t: float, new_customer: bool = False) -> None:
    """Count one transaction at event time ``t`` (offline and the in-batch view online);
    ``new_customer``: its card had not used the merchant (the transaction's ``is_new_merchant``)."""
    hour = hour_of(t)
    day = day_of(t)
    m.tx_hours[hour] = m.tx_hours.get(hour, 0) + 1
    m.tx_days[day] = m.tx_days.get(day, 0) + 1
    if new_customer:
        m.new_hours[hour] = m.new_hours.get(hour, 0) + 1
        m.new_days[day] = m.new_days.get(day, 0) + 1
    cached = m.cache_hour
    if cached >= 0:
        cache = m.cache
        if cached - 23 <= hour <= cached:
            cache[0] += 1
            if new_customer:
                cache[6] += 1
        cached_day = cached // 24
        if cached_day - 29 <= day <= cached_day:
            cache[2] += 1
            if new_customer:
                cache[7] += 1
            if day >= cached_day - 6:
                cache[1] += 1


def count_merchant_fraud(m: MerchantState, labeled_at: float) -> None:
    """Count one fraud label reported at ``labeled_at``."""
    hour = hour_of(labeled_at)
    day = day_of(labeled_at)
    m.fraud_hours[hour] = m.fraud_hours.get(hour, 0) + 1
    m.fraud_days[day] = m.fraud_days.get(day, 0) + 1
    m.cache_hour = -1


def _time_features(txn: Transaction) -> list[float]:
    t = txn.event_time
    hour = int(t // HOUR_S) % 24
    return [
        txn.amount,
        math.log1p(txn.amount),
        1.0 if txn.is_international else 0.0,
        float(hour),
        float((int(t // DAY_S) + 3) % 7),  # Monday = 0 (1970-01-01 was a Thursday)
        1.0 if hour < NIGHT_HOURS_END else 0.0,
        _CATEGORY_CODE.get(txn.merchant_category, UNKNOWN_CATEGORY_CODE),
    ]


def is_late(state: UserState | None, t: float) -> bool:
    """Is an event at ``t`` older than everything the user's history still covers?"""
    return state is not None and bool(state.times) and t < state.times[-1] - HISTORY_S


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
        new_merchant = 1.0 if state is None or find_u32(state.merchants, merchant) < 0 else 0.0
        new_category = 1.0 if state is None or find_u32(state.categories, category_hash(txn.merchant_category)) < 0 else 0.0
        seen_intl = state is not None and state.seen_international
        out += (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, NO_PREVIOUS_TX,
                new_merchant, new_category, 1.0 if txn.is_international and not seen_intl else 0.0, 0.0)
        out += _NO_HISTORY
        out += _NO_SEQUENCE
        out += _newcomer_abroad_regulars(txn.is_international)
        return out
    last_intl = state.last_international
    out += user_window(
        state.times, state.amounts, state.merchant_hashes, state.hours, state.international,
        state.new_merchant, t, amount, merchant, txn.is_international, int(out[3]),
        0.0 if find_u32(state.merchants, merchant) >= 0 else 1.0,
        0.0 if find_u32(state.categories, category_hash(txn.merchant_category)) >= 0 else 1.0,
        1.0 if txn.is_international and not state.seen_international else 0.0,
        1.0 if last_intl is not None and last_intl != txn.is_international else 0.0,
    )
    return out


def _newcomer_abroad_regulars(international: bool) -> tuple[float, ...]:
    """``international_streak`` .. ``irregular_merchant_count_6h`` for a user without earlier events."""
    x = 1.0 if international else 0.0
    return (x, 0.0, x, x, NO_PREVIOUS_TX, 1.0, 1.0, 1.0, 1.0)


# hour_habit_share_30d .. international_count_24h for a user without earlier events in 30 days
_NO_HISTORY = (0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
# new_merchant_count_6h .. hour_habit_share_last3 for a user without earlier events
_NO_SEQUENCE = (0.0, 0.0, NO_PREVIOUS_TX, 0.0, 1.0, 0.0)


def _ratio(amount: float, base: float) -> float:
    """``amount / base``; against one cent when the base is below one cent (0: all card
    verifications; a sub-cent base, 1e-310 say, would make the ratio infinite)."""
    if base >= MIN_AVERAGE:
        return amount / base
    return 1.0 if amount == 0.0 else amount / MIN_AVERAGE


def _touch(seen: array[int], key: int, cap: int) -> None:
    i = find_u32(seen, key)  # ``key in seen`` without a Python int per item
    if i >= 0:
        del seen[i]
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
    new_merchant = 0 if find_u32(state.merchant_hashes, merchant, start, pos) >= 0 else 1
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


def transition(
    state: UserState | None, merchant: MerchantState | None, txn: Transaction
) -> tuple[list[float], UserState]:
    """``(feature vector, updated state)`` for one transaction.

    The vector is computed from the state *before* the transaction; the returned state includes
    it (a late record leaves it as it was: see the module doc). ``state`` is updated in place and returned (a fresh one when ``None``): the caller gives
    up the old value. ``merchant`` is only read; count the transaction into it with
    :func:`count_merchant_tx` if the caller keeps merchant state.
    """
    if is_late(state, txn.event_time):
        assert state is not None
        features = user_features(state, txn, state.times[-1])
        features += merchant_features(merchant, txn.event_time)
        return features, state
    features = user_features(state, txn)
    features += merchant_features(merchant, txn.event_time)
    if state is None:
        state = UserState()
    apply_transaction(state, txn)
    return features, state


def features_of(state: UserState | None, merchant: MerchantState | None, txn: Transaction) -> list[float]:
    """The feature vector only, state untouched."""
    at = state.times[-1] if state is not None and is_late(state, txn.event_time) else None
    features = user_features(state, txn, at)
    features += merchant_features(merchant, txn.event_time)
    return features


def transaction_only_features(txn: Transaction) -> list[float]:
    """Degraded mode: the vector a brand-new user at a brand-new merchant gets (module doc)."""
    return features_of(None, None, txn)
