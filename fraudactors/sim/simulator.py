"""Seeded, reproducible transaction simulator with tagged fraud scenarios and delayed labels.

    sim = Simulator(seed=7, n_users=5000, n_merchants=1000, start_time=..., days=28)
    for ev in sim.stream():            # transactions in event-time order
        ev.txn                         # SPEC §2 transaction dict (ready for orjson.dumps)
        ev.is_fraud, ev.scenario       # ground truth: "legit" or one of SCENARIOS
        ev.label_at                    # epoch seconds the fraud is reported (None: legit or never reported)
    for ev in sim.events():            # the same transactions merged with LabelEvent (SPEC §4) in time order
        ...

The same arguments always give the same stream (``stream()`` restarts from the seed on each call).
``transaction_id`` is ``id_prefix`` followed by a 9-digit counter starting at 1, in stream order
(the load generator relies on this to map labels back to its own ids).
``days=None`` streams forever, one simulated day at a time, at well over 10k transactions/s.

Time and the load generator: the world runs on its own clock (``event_time``), which starts at
``start_time``. Features are computed on event time, so a stream sent faster than real time keeps its
meaning. :meth:`Simulator.live` instead restamps each transaction with the wall clock at the moment it
is pulled; that compresses the world's time, so per-hour velocity features inflate and the models see
traffic unlike their training data. Use it for plumbing and latency, not for accuracy.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np

from fraudactors.sim import scenarios as sc
from fraudactors.sim.population import (
    CAT_INDEX,
    CAT_MEDIAN,
    CAT_SIGMA,
    CATEGORY_NAMES,
    COUNTRY_NAMES,
    N_FAVOURITES,
    ONLINE_CATEGORIES,
    TRIP_CATEGORIES,
    TRIP_CATEGORY_P,
    Merchants,
    Users,
    make_merchants,
    make_users,
)

DAY = 86400.0
# 2026-10-01T00:00:00Z: a fixed default so that the default stream is the same everywhere.
DEFAULT_START = 1790812800.0
_BIG_CATS = np.array([CAT_INDEX[c] for c in ("electronics", "travel", "jewelry", "retail", "hotel")])

# Label delay for reported fraud: most within days, some weeks, a few never.
LABEL_NEVER_P = 0.03
LABEL_SLOW_P = 0.17
LABEL_FAST_MEDIAN_S = 2.0 * DAY
LABEL_SLOW_RANGE_S = (7.0 * DAY, 35.0 * DAY)


def iso(t: float) -> str:
    """Epoch seconds -> ISO-8601 UTC with milliseconds, e.g. ``2026-11-28T21:00:00.123+00:00``."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One simulated transaction with its ground truth."""

    txn: dict[str, object]  # SPEC §2 fields only
    event_time: float  # epoch seconds (millisecond precision); equals the parsed txn["timestamp"]
    is_fraud: bool
    scenario: str  # "legit" or one of scenarios.SCENARIOS
    label_at: float | None  # when the fraud is reported; None for legit or never-reported fraud

    def label(self) -> dict[str, object]:
        """The SPEC §4 label this fraud produces (only meaningful when ``label_at`` is set)."""
        if self.label_at is None:
            raise ValueError(f"transaction {self.txn['transaction_id']} is never labelled")
        return {
            "transaction_id": self.txn["transaction_id"],
            "user_id": self.txn["user_id"],
            "merchant_id": self.txn["merchant_id"],
            "is_fraud": True,
            "labeled_at": iso(self.label_at),
        }

    def with_time(self, t: float, label_delay_scale: float = 1.0) -> SimEvent:
        """A copy stamped at ``t`` (ms precision); the label keeps its delay times ``label_delay_scale``."""
        t = round(t * 1000.0) / 1000.0
        txn = dict(self.txn)
        txn["timestamp"] = iso(t)
        label_at = None
        if self.label_at is not None:
            label_at = round((t + (self.label_at - self.event_time) * label_delay_scale) * 1000.0) / 1000.0
        return replace(self, txn=txn, event_time=t, label_at=label_at)


@dataclass(frozen=True, slots=True)
class LabelEvent:
    """A fraud report arriving at ``at`` (SPEC §4 dict in ``label``)."""

    label: dict[str, object]
    at: float


class Simulator:
    """A population of users and merchants; see the module docstring for the API."""

    def __init__(
        self,
        seed: int = 0,
        n_users: int = 5000,
        n_merchants: int = 1000,
        start_time: float = DEFAULT_START,
        days: float | None = 28.0,
        fraud_scale: float = 1.0,
        id_prefix: str = "t-",
    ) -> None:
        if n_users < 1:
            raise ValueError("n_users must be >= 1")
        if days is not None and days <= 0:
            raise ValueError("days must be > 0")
        self.seed = seed
        self.start_time = round(float(start_time) * 1000.0) / 1000.0
        self.days = days
        self.fraud_scale = fraud_scale
        self.id_prefix = id_prefix
        world = np.random.default_rng([seed, 0])
        self.merchants: Merchants = make_merchants(world, n_merchants)
        self.users: Users = make_users(world, n_users, self.merchants)
        self._compromisable = np.flatnonzero(np.isin(self.merchants.category, list(sc.COMPROMISABLE_CATS)))

    @property
    def end_time(self) -> float | None:
        return None if self.days is None else self.start_time + self.days * DAY

    def expected_tps(self) -> float:
        """Average legitimate transactions per second of simulated time."""
        return float(self.users.rate.sum()) / DAY

    # ------------------------------------------------------------------ public streams

    def stream(self) -> Iterator[SimEvent]:
        """Transactions in event-time order (ties broken deterministically)."""
        rng = np.random.default_rng([self.seed, 1])
        state = _State(len(self.users))
        counter = 0
        day = 0
        end = self.end_time
        while end is None or self.start_time + day * DAY < end:
            day_start = self.start_time + day * DAY
            day_end = day_start + DAY if end is None else min(day_start + DAY, end)
            rows = self._day_rows(rng, state, day_start, day_end)
            for t, user, merchant, amount, scenario in rows:
                counter += 1
                yield self._event(rng, counter, t, user, merchant, amount, scenario)
            day += 1

    def events(self) -> Iterator[SimEvent | LabelEvent]:
        """Transactions and their labels, merged in time order. When the stream is finite, labels
        reported after its end are emitted at the end (still in time order)."""
        pending: list[tuple[float, int, dict[str, object]]] = []
        seq = 0
        for ev in self.stream():
            while pending and pending[0][0] <= ev.event_time:
                at, _, label = heapq.heappop(pending)
                yield LabelEvent(label, at)
            yield ev
            if ev.label_at is not None:
                seq += 1
                heapq.heappush(pending, (ev.label_at, seq, ev.label()))
        while pending:
            at, _, label = heapq.heappop(pending)
            yield LabelEvent(label, at)

    def live(self, clock: Callable[[], float] = time.time, label_delay_scale: float = 1.0 / 3600.0
             ) -> Iterator[SimEvent]:
        """The same sequence restamped at ``clock()`` when pulled (event time = now). Label delays are
        scaled by ``label_delay_scale`` (default: a simulated hour becomes a second)."""
        for ev in self.stream():
            yield ev.with_time(clock(), label_delay_scale)

    # ------------------------------------------------------------------ generation

    def _event(self, rng: np.random.Generator, counter: int, t: float, user: int, merchant: int,
               amount: float, scenario: str) -> SimEvent:
        is_fraud = scenario != sc.LEGIT
        label_at = None
        if is_fraud:
            r = rng.random()
            if r >= LABEL_NEVER_P:
                if r < LABEL_NEVER_P + LABEL_SLOW_P:
                    delay = float(rng.uniform(*LABEL_SLOW_RANGE_S))
                else:
                    delay = float(min(rng.lognormal(np.log(LABEL_FAST_MEDIAN_S), 0.7), 7.0 * DAY))
                label_at = round((t + max(delay, 600.0)) * 1000.0) / 1000.0
        users, merchants = self.users, self.merchants
        m_country = int(merchants.country[merchant])
        txn: dict[str, object] = {
            "transaction_id": f"{self.id_prefix}{counter:09d}",
            "user_id": users.ids[user],
            "merchant_id": merchants.ids[merchant],
            "amount": amount,
            "currency": "USD",
            "merchant_category": CATEGORY_NAMES[int(merchants.category[merchant])],
            "is_international": m_country != int(users.home[user]),
            "timestamp": iso(t),
        }
        return SimEvent(txn=txn, event_time=t, is_fraud=is_fraud, scenario=scenario, label_at=label_at)

    def _day_rows(self, rng: np.random.Generator, state: _State, day_start: float, day_end: float
                  ) -> list[tuple[float, int, int, float, str]]:
        users = self.users
        n_users = len(users)
        legit = self._legit(rng, state, day_start)
        # Episodes: fraud and legitimate look-alikes. Their events may spill into later days.
        fs = self.fraud_scale
        episodes: list[tuple[str, Callable[..., list[sc.RawEvent]], float]] = [
            (sc.STOLEN_CARD, sc.stolen_card, sc.STOLEN_CARD_RATE * fs),
            (sc.CARD_TESTING, sc.card_testing, sc.CARD_TESTING_RATE * fs),
            (sc.ACCOUNT_TAKEOVER, sc.account_takeover, sc.ACCOUNT_TAKEOVER_RATE * fs),
            (sc.LEGIT, sc.micro_burst, sc.LEGIT_MICRO_BURST_RATE),
            (sc.LEGIT, sc.shopping_day, sc.LEGIT_SHOPPING_DAY_RATE),
        ]
        for scenario, fn, rate in episodes:
            for user in rng.choice(n_users, size=int(rng.poisson(rate * n_users)), replace=True):
                if fn is sc.account_takeover:
                    raw = fn(rng, users, self.merchants, int(user), day_start)
                else:
                    raw = fn(rng, users, self.merchants, int(user), day_start + float(rng.uniform(0.0, DAY)))
                for t, u, m, a in raw:
                    state.push(t, u, m, a, scenario)
        # New terminal compromises; day 0 also draws the ones already running (a steady state from the start).
        span = DAY * (1.0 + (sc.COMPROMISE_MAX_DAYS if day_start == self.start_time else 0.0))
        for _ in range(int(rng.poisson(sc.COMPROMISE_RATE * fs * n_users * span / DAY))):
            merchant = int(self._compromisable[rng.integers(self._compromisable.size)])
            start = day_start + DAY - float(rng.uniform(0.0, span))
            days = float(rng.uniform(sc.COMPROMISE_MIN_DAYS, sc.COMPROMISE_MAX_DAYS))
            state.compromises.append((merchant, float(rng.uniform(8.0, 25.0)), start, start + days * DAY))
        active = []
        for merchant, rate, start, end in state.compromises:
            lo, hi = max(start, day_start), min(end, day_start + DAY)
            if hi > lo:
                for t, u, m, a in sc.compromised_merchant(rng, users, self.merchants, merchant, rate, lo, hi):
                    state.push(t, u, m, a, sc.COMPROMISED_MERCHANT)
            if end > day_start + DAY:
                active.append((merchant, rate, start, end))
        state.compromises = active
        # Merge today's legit rows with the episode events due before day_end.
        rows = legit
        while state.pending and state.pending[0][0] < day_end:
            t, _, u, m, a, scenario = heapq.heappop(state.pending)
            rows.append((t, u, m, a, scenario))
        rows = [r for r in rows if day_start <= r[0] < day_end]
        rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
        return rows

    def _legit(self, rng: np.random.Generator, state: _State, day_start: float
               ) -> list[tuple[float, int, int, float, str]]:
        users, merchants = self.users, self.merchants
        n_users = len(users)
        n_countries, n_cats = len(COUNTRY_NAMES), len(CATEGORY_NAMES)
        # Trips: a user at home may leave today, for 2-14 days, to one foreign country.
        leaving = (state.trip_end <= day_start) & (rng.random(n_users) < users.trip_p)
        idx = np.flatnonzero(leaving)
        if idx.size:
            state.trip_start[idx] = day_start + rng.uniform(0.0, DAY, size=idx.size)
            state.trip_end[idx] = state.trip_start[idx] + rng.integers(2, 15, size=idx.size) * DAY
            k = rng.integers(n_countries - 1, size=idx.size)
            state.trip_country[idx] = np.where(k < users.home[idx], k, k + 1)
        counts = rng.poisson(users.rate)
        user = np.repeat(np.arange(n_users), counts)
        n = user.size
        if n == 0:
            return []
        off = rng.random(n) < users.off_hours_p[user]
        hour = np.where(off, rng.uniform(0.0, 24.0, size=n),
                        rng.normal(users.hour_center[user], users.hour_spread[user])) % 24.0
        t = np.round((day_start + hour * 3600.0) * 1000.0) / 1000.0
        on_trip = (t >= state.trip_start[user]) & (t < state.trip_end[user]) & (rng.random(n) < 0.85)
        country = np.where(on_trip, state.trip_country[user], users.home[user])
        favourite = ~on_trip & (rng.random(n) < 0.7)
        cat = (users.cat_cdf[user] < rng.random((n, 1))).sum(axis=1)
        cat = np.where(on_trip, rng.choice(TRIP_CATEGORIES, size=n, p=TRIP_CATEGORY_P), cat)
        big = ~favourite & (rng.random(n) < 0.01)
        cat = np.where(big, rng.choice(_BIG_CATS, size=n), cat)
        # Online purchases from abroad while at home.
        online = np.isin(cat, list(ONLINE_CATEGORIES)) & ~on_trip & (rng.random(n) < 0.2)
        k = rng.integers(n_countries - 1, size=n)
        country = np.where(online, np.where(k < users.home[user], k, k + 1), country)
        merchant = np.empty(n, dtype=np.int64)
        fav_idx = np.flatnonzero(favourite)
        merchant[fav_idx] = users.favourites[user[fav_idx], rng.integers(N_FAVOURITES, size=fav_idx.size)]
        rest = np.flatnonzero(~favourite)
        key = country[rest] * n_cats + cat[rest]
        draws = rng.random(rest.size)
        for code in np.unique(key):
            sel = rest[key == code]
            pool = merchants.pools[code // n_cats][code % n_cats]
            merchant[sel] = pool[(draws[key == code] * pool.size).astype(np.int64)]
        mcat = merchants.category[merchant]
        scale = users.wealth[user] * np.where(big, rng.uniform(2.0, 6.0, size=n), 1.0)
        amount = rng.lognormal(np.log(CAT_MEDIAN[mcat] * scale), CAT_SIGMA[mcat])
        amount = np.maximum(np.round(amount, 2), 0.5)
        return list(zip(t.tolist(), user.tolist(), merchant.tolist(), amount.tolist(),
                        [sc.LEGIT] * n, strict=True))


class _State:
    """What one stream carries from day to day."""

    def __init__(self, n_users: int) -> None:
        self.trip_start = np.zeros(n_users)
        self.trip_end = np.zeros(n_users)
        self.trip_country = np.zeros(n_users, dtype=np.int64)
        self.pending: list[tuple[float, int, int, int, float, str]] = []
        self.compromises: list[tuple[int, float, float, float]] = []
        self._seq = 0

    def push(self, t: float, user: int, merchant: int, amount: float, scenario: str) -> None:
        self._seq += 1
        t = round(t * 1000.0) / 1000.0
        amount = max(round(amount, 2), 0.01)
        heapq.heappush(self.pending, (t, self._seq, user, merchant, amount, scenario))
