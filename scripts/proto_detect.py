"""Detection prototype (issue #12): cache the simulator's offline features once, then each experiment is a fit.

    python scripts/proto_detect.py build              # ~2 min: 105 simulated days, the definition's features
    python scripts/proto_detect.py diagnose [NAME..]  # missed frauds at FPR <= 2 % on days 77-91 and 91-105
    python scripts/proto_detect.py try NAME [NAME..]  # + candidate columns (``extras``): boosting, both windows
    python scripts/proto_detect.py try --fallback     # the transaction-only features (degraded mode)

Not part of the package. Each window's model is v2's boosting (hyperparameters, monotonic
constraint, 20 % legitimate sample re-weighted) fit on the 56 days ending 14 days before its test
weeks, with the labels known at the test weeks' start; detection is at the best threshold with
FPR <= 2 % on the test weeks (as ``train`` reports it). A prefix of the 105-day run is exactly the
91-day data, so days 77-91 are ``train``'s held-out weeks and days 91-105 ``evaluate``'s.
The candidate columns (first ``try`` with them: ~2.5 min, cached) are computed point in time from
the user's earlier events of the last 30 days (at most 256, like the state).
The simulator is only observed: ``stolen_card`` is wrapped to record each spree (bold or quiet,
position), without changing its random draws.
"""

from __future__ import annotations

import argparse
import sys
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np

CACHE = "/tmp/proto_detect_105d.npz"
DAY = 86400.0
SEED = 7
DAYS = 105.0
# (test start day, test end day): each fit on 56 days ending 14 days before the test weeks
WINDOWS = ((77, 91), (91, 105))


def build() -> None:
    from fraudactors.features.definition import FEATURE_NAMES
    from fraudactors.features.offline import offline_features
    from fraudactors.modeling.data import synthetic_dataset
    from fraudactors.sim import scenarios as sc
    from fraudactors.sim.population import CATEGORY_NAMES

    sprees: dict[tuple[int, int], tuple[int, int, int]] = {}  # (user, t ms) -> (spree id, position, bold)
    original = sc.stolen_card

    def recorded(rng, users, merchants, user, t0):  # type: ignore[no-untyped-def]
        state = rng.bit_generator.state
        bold = rng.random() < 0.7  # the first draw of stolen_card
        rng.bit_generator.state = state
        raw = original(rng, users, merchants, user, t0)
        sid = recorded.n  # type: ignore[attr-defined]
        recorded.n += 1  # type: ignore[attr-defined]
        for pos, (t, u, _m, _a) in enumerate(raw):
            sprees[(u, round(t * 1000.0))] = (sid, pos, int(bold))
        return raw

    recorded.n = 0  # type: ignore[attr-defined]
    sc.stolen_card = recorded
    t = time.time()
    ds = synthetic_dataset(SEED, DAYS, 5000, 1000)
    sc.stolen_card = original
    print(f"data {len(ds):,} rows in {time.time() - t:.0f} s", file=sys.stderr)
    t = time.time()
    X = offline_features(ds.transactions, ds.labels())
    print(f"features in {time.time() - t:.0f} s", file=sys.stderr)
    cat_index = {c: i for i, c in enumerate(CATEGORY_NAMES)}
    txns = ds.transactions
    user = np.array([int(x.user_id[2:]) for x in txns], dtype=np.int32)
    merchant = np.array([int(x.merchant_id[2:]) for x in txns], dtype=np.int32)
    cat = np.array([cat_index[x.merchant_category] for x in txns], dtype=np.int8)
    amount = np.array([x.amount for x in txns])
    spree = np.full((len(txns), 3), -1, dtype=np.int32)
    for i, x in enumerate(txns):
        if ds.scenario[i] == "stolen_card":
            spree[i] = sprees[(user[i], round(x.event_time * 1000.0))]
    np.savez_compressed(CACHE, X=X, names=np.array(FEATURE_NAMES), t=ds.event_time, y=ds.is_fraud, scenario=ds.scenario,
                        labeled_at=ds.labeled_at, user=user, merchant=merchant, cat=cat, amount=amount,
                        spree=spree, intl=np.array([x.is_international for x in txns]))
    print(f"wrote {CACHE}", file=sys.stderr)


def load() -> dict[str, np.ndarray]:
    with np.load(CACHE) as z:
        return {k: z[k] for k in z.files}


def _cached(path: str) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``path``, or None when there is no cache yet."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None


def _cached_columns(name: str) -> Callable[[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]],
                                          Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
    """Cache a candidate-column function's result in /tmp (``<cache>_<name>.npz``)."""
    def wrap(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        def cached(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            path = CACHE.replace(".npz", f"_{name}.npz")
            hit = _cached(path)
            if hit is not None:
                return hit
            out = fn(d)
            np.savez_compressed(path, **out)
            return out
        return cached
    return wrap


def _push(t: float, ts: list[float], value: object, values: list) -> None:  # type: ignore[type-arg]
    """Append an event to a user's point-in-time history, capped at 256 events like the state."""
    ts.append(t)
    values.append(value)
    if len(ts) > 256:
        del ts[0], values[0]


def _histories(d: dict[str, np.ndarray], values: list) -> Iterator[tuple[int, float, list[float], list]]:  # type: ignore[type-arg]
    """Each row in processing order with its user's earlier events of the last 30 days (at most 256,
    like the state): ``(row, t, their times, their values)``; the row's value is added after."""
    hist: dict[int, tuple[list[float], list]] = defaultdict(lambda: ([], []))  # type: ignore[type-arg]
    users, times = d["user"], d["t"]
    for i in range(times.size):
        ts, vs = hist[int(users[i])]
        t = float(times[i])
        s30 = bisect_right(ts, t - 30 * DAY)
        if s30:
            del ts[:s30], vs[:s30]
        yield i, t, ts, vs
        _push(t, ts, values[i], vs)


def extras(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Candidate columns, point in time: each row sees the user's earlier events of the last 30 days
    (at most 256, like the state). Cached in /tmp."""
    path = CACHE.replace(".npz", "_extras.npz")
    cached = _cached(path)
    if cached is not None:
        return cached
    from fraudactors.sim.population import CAT_MEDIAN

    t_all, users, cats, amounts = d["t"], d["user"], d["cat"].astype(int), d["amount"]
    n = t_all.size
    hours = ((t_all // 3600) % 24).astype(int)
    typical = CAT_MEDIAN[cats]
    rel = amounts / typical  # amount against the category's typical amount
    names = ("cat_code", "amount_to_cat_typical", "wealth_30d", "amount_to_wealth_typical",
             "cat_count_30d", "amount_to_cat_median_user", "cat_hour_habit", "first_hour_24h_habit",
             "spree_hour_span_24h", "cat_share_30d", "rel_median_last3")
    out = {k: np.zeros(n, dtype=np.float32) for k in names}
    hist: dict[int, tuple[list[float], list[int], list[float], list[int], list[float]]] = defaultdict(
        lambda: ([], [], [], [], []))
    for i in range(n):
        u = int(users[i])
        t = float(t_all[i])
        ts, cs, rs, hs, am = hist[u]
        s30 = bisect_right(ts, t - 30 * DAY)
        if s30:
            del ts[:s30], cs[:s30], rs[:s30], hs[:s30], am[:s30]
        c = int(cats[i])
        out["cat_code"][i] = c
        out["amount_to_cat_typical"][i] = rel[i]
        k = len(ts)
        if k:
            w = float(np.median(rs))
            out["wealth_30d"][i] = w
            out["amount_to_wealth_typical"][i] = rel[i] / w
            mine = [a for a, cc in zip(am, cs, strict=True) if cc == c]
            out["cat_count_30d"][i] = len(mine)
            out["cat_share_30d"][i] = len(mine) / k
            out["amount_to_cat_median_user"][i] = amounts[i] / sorted(mine)[len(mine) // 2] if mine else rel[i] / w
            h = int(hours[i])
            ch = [hh for hh, cc in zip(hs, cs, strict=True) if cc == c]
            near = sum(1 for hh in ch if min((hh - h) % 24, (h - hh) % 24) <= 2)
            out["cat_hour_habit"][i] = near / len(ch) if ch else -1.0
            s24 = bisect_right(ts, t - DAY)
            ref = hs[:s24]
            if s24 < k and ref:
                h0 = hs[s24]
                out["first_hour_24h_habit"][i] = sum(1 for hh in ref if min((hh - h0) % 24, (h0 - hh) % 24) <= 2) / len(ref)
            else:
                out["first_hour_24h_habit"][i] = -1.0
            out["spree_hour_span_24h"][i] = (t - ts[s24]) / 3600.0 if s24 < k else 0.0
            last = rs[-3:]
            out["rel_median_last3"][i] = float(np.mean(last)) / w
        else:
            out["wealth_30d"][i] = -1.0
            out["amount_to_wealth_typical"][i] = -1.0
            out["amount_to_cat_median_user"][i] = -1.0
            out["cat_hour_habit"][i] = -1.0
            out["first_hour_24h_habit"][i] = -1.0
            out["rel_median_last3"][i] = -1.0
        ts.append(t)
        cs.append(c)
        rs.append(float(rel[i]))
        hs.append(int(hours[i]))
        am.append(float(amounts[i]))
        if len(ts) > 256:
            del ts[0], cs[0], rs[0], hs[0], am[0]
    np.savez_compressed(path, **out)
    return out


MERCHANT_EXTRAS = ("m_tx24", "m_tx24_ratio", "m_new24", "m_new30", "m_new24_ratio", "m_new_share24",
                   "m_new_share24_vs30", "m_hour_share", "m_unusual24", "m_unusual_new24", "m_amt_to_median",
                   "m_amt_to_mean", "m_new6", "m_new_old", "m_new24_ratio_old", "m_new24_z_old", "m_new24_z",
                   "m_new6_ratio_old", "m_tx24_ratio_old", "m_new24_ratio7", "m_fraud_per_new7",
                   "m_fraud_per_new30")


def merchant_extras(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merchant-side candidate columns (issue 12, compromised terminals), point in time: each row sees
    the merchant's EARLIER transactions only (in the offline processing order: event time, ties in
    input order), bucketed like the engine's merchant counters: 24 h = event hours [H-23, H], 30 d =
    event days [D-29, D]. "New customer": the row's ``is_new_merchant`` (the card's seen-set had not
    got this merchant). Cached in /tmp."""
    path = CACHE.replace(".npz", "_mextras.npz")
    cached = _cached(path)
    if cached is not None:
        return cached
    names = [str(x) for x in d["names"]]
    n = d["t"].size
    t = d["t"]
    r = np.empty(n, dtype=np.int64)
    r[np.argsort(t, kind="stable")] = np.arange(n)  # processing order
    m = d["merchant"].astype(np.int64)
    hour = (t // 3600).astype(np.int64)
    day = (t // 86400).astype(np.int64)
    hod = hour % 24
    new = d["X"][:, names.index("is_new_merchant")].astype(np.int64)
    amount = d["amount"]
    big = np.int64(1 << 32)
    o = np.lexsort((r, m))  # by merchant, then processing order
    pos = np.empty(n, dtype=np.int64)
    pos[o] = np.arange(n)
    kh = m[o] * big + hour[o]
    kd = m[o] * big + day[o]
    s24 = np.searchsorted(kh, m * big + hour - 23, "left")
    s30 = np.searchsorted(kd, m * big + day - 29, "left")
    s6 = np.searchsorted(kh, m * big + hour - 5, "left")
    s7 = np.searchsorted(kd, m * big + day - 6, "left")
    e2 = np.searchsorted(kd, m * big + day - 1, "left")  # end of days [D-29, D-2]: before yesterday
    c24 = pos - s24
    c30 = pos - s30
    cn = np.concatenate([[0], np.cumsum(new[o])])
    n24 = cn[pos] - cn[s24]
    n30 = cn[pos] - cn[s30]
    n6 = cn[pos] - cn[s6]
    n7 = cn[pos] - cn[s7]
    old = (cn[np.maximum(e2, s30)] - cn[s30]) / 28.0  # new customers per day, days [D-29, D-2]
    c_old = (np.maximum(e2, s30) - s30) / 28.0
    ca = np.concatenate([[0.0], np.cumsum(amount[o])])
    a30 = ca[pos] - ca[s30]
    # hour of day habit of the merchant: its earlier 30-day transactions within 2 h of this hour
    mh = m * 24 + hod
    o2 = np.lexsort((r, mh))
    kr = mh[o2] * big + r[o2]
    kd2 = mh[o2] * big + day[o2]
    near = np.zeros(n, dtype=np.int64)
    for dh in range(-2, 3):
        g = m * 24 + (hod + dh) % 24
        near += np.searchsorted(kr, g * big + r, "left") - np.searchsorted(kd2, g * big + day - 29, "left")
    share = np.where(c30 > 0, near / np.maximum(c30, 1), -1.0)
    unusual = ((c30 >= 30) & (near < 0.05 * c30)).astype(np.int64)
    cu = np.concatenate([[0], np.cumsum(unusual[o])])
    cun = np.concatenate([[0], np.cumsum((unusual * new)[o])])
    # the merchant's 30-day median amount (earlier transactions)
    med = np.full(n, -1.0)
    from bisect import insort
    om = o.tolist()
    ds = day[o].tolist()
    am = amount[o].tolist()
    bounds = np.flatnonzero(np.diff(m[o])) + 1
    for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), n], strict=True):
        window: list[float] = []
        lo = a
        for k in range(a, b):
            while ds[lo] < ds[k] - 29:
                window.pop(bisect_right(window, am[lo]) - 1)
                lo += 1
            if window:
                med[om[k]] = window[len(window) // 2]
            insort(window, am[k])
    out = {
        "m_tx24": c24.astype(np.float32),
        "m_tx24_ratio": ((c24 + 1) / (c30 / 30 + 1)).astype(np.float32),
        "m_new24": n24.astype(np.float32),
        "m_new30": n30.astype(np.float32),
        "m_new24_ratio": ((n24 + 1) / (n30 / 30 + 1)).astype(np.float32),
        "m_new_share24": ((n24 + 1) / (c24 + 2)).astype(np.float32),
        "m_new_share24_vs30": ((n24 + 1) / (c24 + 2) - (n30 + 1) / (c30 + 2)).astype(np.float32),
        "m_hour_share": share.astype(np.float32),
        "m_unusual24": (cu[pos] - cu[s24]).astype(np.float32),
        "m_unusual_new24": (cun[pos] - cun[s24]).astype(np.float32),
        "m_amt_to_median": np.where(med > 0, amount / np.maximum(med, 1e-9), -1.0).astype(np.float32),
        "m_amt_to_mean": np.where(c30 > 0, amount / np.maximum(a30 / np.maximum(c30, 1), 1e-9), -1.0).astype(np.float32),
    }
    out.update({
        "m_new6": n6.astype(np.float32),
        "m_new_old": old.astype(np.float32),
        "m_new24_ratio_old": ((n24 + 1) / (old + 1)).astype(np.float32),
        "m_new24_z_old": ((n24 - old) / np.sqrt(old + 1)).astype(np.float32),
        "m_new24_z": ((n24 - n30 / 30) / np.sqrt(n30 / 30 + 1)).astype(np.float32),
        "m_new6_ratio_old": ((n6 + 1) / (old / 4 + 1)).astype(np.float32),
        "m_tx24_ratio_old": ((c24 + 1) / (c_old + 1)).astype(np.float32),
        "m_new24_ratio7": ((n24 + 1) / (n7 / 7 + 1)).astype(np.float32),
        # reported frauds per new customer (the definition's fraud counts; prior as its fraud rates)
        "m_fraud_per_new7": (d["X"][:, names.index("merchant_fraud_count_7d")] / (n7 + 10.0)).astype(np.float32),
        "m_fraud_per_new30": (d["X"][:, names.index("merchant_fraud_count_30d")] / (n30 + 10.0)).astype(np.float32),
    })
    np.savez_compressed(path, **out)
    return out


ORACLE_EXTRAS = ("o_fav", "o_hour_ll", "o_amt_z", "o_rate", "o_on_trip", "o_trip_match", "o_cat_p",
                 "o_nonfav24", "o_hour_ll_sum24", "o_excess24", "o_nonfav_excess24")


@_cached_columns("oracle")
def oracle_extras(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An upper bound, not a feature: columns from the simulator's hidden truth about each cardholder
    (their 10 favourite merchants, hour habit, wealth, daily rate, category mix, trips), i.e. what a
    perfect profile learnt from unlimited history would know. The fraud state is not in them. If the
    model cannot reach a detection rate with these, no feature of the cardholder's history will.
    Point in time for the 24 h sums (earlier events of the same card). Cached in /tmp."""
    from fraudactors.sim import Simulator
    from fraudactors.sim import simulator as simmod
    from fraudactors.sim.population import CAT_MEDIAN, CAT_SIGMA

    sim = Simulator(seed=SEED, n_users=5000, n_merchants=1000, days=DAYS)
    users, merchants = sim.users, sim.merchants
    trips: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    original = simmod.Simulator._legit

    def recorded(self, rng, state, day_start):  # type: ignore[no-untyped-def]
        before = state.trip_start.copy()
        out = original(self, rng, state, day_start)
        for u in np.flatnonzero(state.trip_start != before):
            trips[int(u)].append((float(state.trip_start[u]), float(state.trip_end[u]), int(state.trip_country[u])))
        return out

    simmod.Simulator._legit = recorded  # type: ignore[method-assign]
    n_rows = sum(1 for _ in sim.stream())
    simmod.Simulator._legit = original  # type: ignore[method-assign]
    t_all, u_all, m_all, amt = d["t"], d["user"].astype(int), d["merchant"].astype(int), d["amount"]
    assert n_rows == t_all.size, (n_rows, t_all.size)
    n = t_all.size
    cat = d["cat"].astype(int)
    fav = np.zeros(n, dtype=bool)
    favs = users.favourites
    for j in range(favs.shape[1]):
        fav |= favs[u_all, j] == m_all
    hour = (t_all % DAY) / 3600.0
    c, s, off = users.hour_center[u_all], users.hour_spread[u_all], users.off_hours_p[u_all]
    dens = np.zeros(n)
    for k in (-1, 0, 1):  # wrapped normal
        dens += np.exp(-0.5 * ((hour - c + 24 * k) / s) ** 2) / (s * np.sqrt(2 * np.pi))
    hour_ll = np.log(off / 24.0 + (1 - off) * dens)
    amt_z = (np.log(np.maximum(amt, 0.01)) - np.log(CAT_MEDIAN[cat] * users.wealth[u_all])) / CAT_SIGMA[cat]
    pdf = np.diff(np.concatenate([np.zeros((len(users), 1)), users.cat_cdf], axis=1), axis=1)
    cat_p = pdf[u_all, np.minimum(cat, pdf.shape[1] - 1)]
    on_trip = np.zeros(n, dtype=bool)
    trip_match = np.zeros(n, dtype=bool)
    mc = merchants.country[m_all]
    for i in range(n):
        for lo, hi, country in trips.get(int(u_all[i]), ()):
            if lo <= t_all[i] < hi:
                on_trip[i] = True
                trip_match[i] = mc[i] == country
                break
    rate = users.rate[u_all]
    nonfav24 = np.zeros(n)
    ll24 = np.zeros(n)
    c24 = np.zeros(n)
    hist: dict[int, list[tuple[float, bool, float]]] = defaultdict(list)
    for i in range(n):
        h = hist[int(u_all[i])]
        t = float(t_all[i])
        while h and h[0][0] <= t - DAY:
            h.pop(0)
        h.append((t, bool(fav[i]) or bool(on_trip[i]), float(hour_ll[i])))
        nonfav24[i] = sum(1 for e in h if not e[1])
        ll24[i] = sum(e[2] for e in h)
        c24[i] = len(h)
    out = {
        "o_fav": fav.astype(np.float32),
        "o_hour_ll": hour_ll.astype(np.float32),
        "o_amt_z": amt_z.astype(np.float32),
        "o_rate": rate.astype(np.float32),
        "o_on_trip": on_trip.astype(np.float32),
        "o_trip_match": trip_match.astype(np.float32),
        "o_cat_p": cat_p.astype(np.float32),
        "o_nonfav24": nonfav24.astype(np.float32),
        "o_hour_ll_sum24": ll24.astype(np.float32),
        "o_excess24": ((c24 - rate) / np.sqrt(rate + 1)).astype(np.float32),
        "o_nonfav_excess24": ((nonfav24 - 0.3 * rate) / np.sqrt(0.3 * rate + 1)).astype(np.float32),
    }
    return out


REGULAR_EXTRAS = ("r_visits30", "r_nonreg24_k2", "r_nonreg24_k3", "r_nonreg_share24", "r_top_share30",
                  "r_is_top10", "r_nonreg24_excess", "r_nonreg6_k2")


@_cached_columns("regular")
def regular_extras(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The cardholder's regular merchants (the simulator's favourites, learnt from history), point in
    time from the user's earlier events of the last 30 days (at most 256, like the state). "Regular":
    used at least k times in the part of the 30 days before the last 24 h. Cached in /tmp."""
    from collections import Counter

    merch = d["merchant"].tolist()
    out = {k: np.zeros(len(merch), dtype=np.float32) for k in REGULAR_EXTRAS}
    for i, t, ts, ms in _histories(d, merch):
        m = merch[i]
        s24 = bisect_right(ts, t - DAY)
        s6 = bisect_right(ts, t - 6 * 3600)
        old = Counter(ms[:s24])
        allc = Counter(ms)
        out["r_visits30"][i] = allc.get(m, 0)
        recent = [*ms[s24:], m]
        nr2 = sum(1 for x in recent if old.get(x, 0) < 2)
        out["r_nonreg24_k2"][i] = nr2
        out["r_nonreg24_k3"][i] = sum(1 for x in recent if old.get(x, 0) < 3)
        out["r_nonreg_share24"][i] = nr2 / len(recent)
        out["r_nonreg6_k2"][i] = sum(1 for x in [*ms[s6:], m] if old.get(x, 0) < 2)
        k = len(ms)
        if k:
            top = allc.most_common(10)
            topset = {x for x, c in top if c >= 2}
            out["r_top_share30"][i] = sum(c for x, c in top if c >= 2) / k
            out["r_is_top10"][i] = 1.0 if m in topset else 0.0
            days = max((t - ts[0]) / DAY, 1.0)
            nonreg_rate = sum(1 for x in ms if allc[x] < 2) / days
            out["r_nonreg24_excess"][i] = (nr2 - nonreg_rate) / np.sqrt(nonreg_rate + 1.0)
        else:
            out["r_top_share30"][i] = -1.0
            out["r_nonreg24_excess"][i] = nr2
    return out


TRIP_EXTRAS = ("t_intl_streak", "t_intl_streak_hours", "t_intl_7d", "t_intl_share_7d", "t_intl_first_hours")


@_cached_columns("trip")
def trip_extras(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A cardholder abroad (the simulator's trips), point in time from the user's earlier events of
    the last 30 days (at most 256): the run of international transactions this one continues. Cached."""
    intl = d["intl"].astype(bool).tolist()
    out = {k: np.zeros(len(intl), dtype=np.float32) for k in TRIP_EXTRAS}
    for i, t, ts, xs in _histories(d, intl):
        x = intl[i]
        k = len(xs)
        j = k
        while j > 0 and xs[j - 1]:
            j -= 1
        streak = (k - j + 1) if x else 0
        out["t_intl_streak"][i] = streak
        out["t_intl_streak_hours"][i] = (t - ts[j]) / 3600.0 if x and j < k else 0.0
        s7 = bisect_right(ts, t - 7 * DAY)
        c7 = sum(xs[s7:]) + x
        out["t_intl_7d"][i] = c7
        out["t_intl_share_7d"][i] = c7 / (k - s7 + 1)
        # hours since the first international event of the last 7 days (-1: none before)
        first = next((ts[q] for q in range(s7, k) if xs[q]), None)
        out["t_intl_first_hours"][i] = (t - first) / 3600.0 if first is not None else -1.0
    return out


REGULAR90_EXTRAS = ("r90_visits", "r90_nonreg24_k2", "r90_nonreg24_k3", "r90_nonreg_share24", "r90_is_top10")


@_cached_columns("regular90")
def regular90_extras(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """As ``regular_extras`` but over the user's 90 days (no event cap): would a longer memory of the
    cardholder's merchants find their favourites? Cached in /tmp."""
    from collections import Counter, deque

    t_all, users, merch = d["t"], d["user"], d["merchant"]
    n = t_all.size
    out = {k: np.zeros(n, dtype=np.float32) for k in REGULAR90_EXTRAS}
    # per user: events of the last 90 days, the part older than 24 h counted, the last 24 h listed
    old_q: dict[int, deque] = defaultdict(deque)
    new_q: dict[int, deque] = defaultdict(deque)
    counts: dict[int, Counter] = defaultdict(Counter)
    for i in range(n):
        u = int(users[i])
        t = float(t_all[i])
        oq, nq, c = old_q[u], new_q[u], counts[u]
        while nq and nq[0][0] <= t - DAY:
            e = nq.popleft()
            oq.append(e)
            c[e[1]] += 1
        while oq and oq[0][0] <= t - 90 * DAY:
            e = oq.popleft()
            c[e[1]] -= 1
        m = int(merch[i])
        out["r90_visits"][i] = c.get(m, 0) + sum(1 for e in nq if e[1] == m)
        recent = [e[1] for e in nq] + [m]
        nr2 = sum(1 for x in recent if c.get(x, 0) < 2)
        out["r90_nonreg24_k2"][i] = nr2
        out["r90_nonreg24_k3"][i] = sum(1 for x in recent if c.get(x, 0) < 3)
        out["r90_nonreg_share24"][i] = nr2 / len(recent)
        top = {x for x, k in c.most_common(10) if k >= 2}
        out["r90_is_top10"][i] = 1.0 if m in top else 0.0
        nq.append((t, m))
    return out


def window_rows(d: dict[str, np.ndarray], test_start: int, test_end: int) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = float(d["t"][0])
    day = (d["t"] - t0) / DAY
    fit = np.flatnonzero((day >= test_start - 14 - 56) & (day < test_start - 14))
    test = np.flatnonzero((day >= test_start) & (day < test_end))
    return fit, test, t0 + test_start * DAY


def fit_score(X: np.ndarray, d: dict[str, np.ndarray], names: tuple[str, ...], window: tuple[int, int],
              params: dict | None = None, seed: int = SEED, legit_fraction: float = 0.2,
              fraud_weight: float = 1.0, algo: str = "hgb") -> tuple[np.ndarray, np.ndarray]:
    from fraudactors.modeling.pipeline import make_model, single_threaded_openmp
    from fraudactors.modeling.split import sample_legit

    fit, test, cutoff = window_rows(d, *window)
    y_known = d["y"] & (d["labeled_at"] <= cutoff)
    y = y_known[fit]
    rows = fit[sample_legit(y, legit_fraction, seed)]
    yy = y_known[rows]
    w = np.where(yy, fraud_weight, 1.0 / legit_fraction)
    model = make_model(algo, seed, names, params)
    with single_threaded_openmp():
        model.fit(X[rows], yy, sample_weight=w)
        s = model.predict_proba(X[test])[:, 1]
    return test, s


def detection(d: dict[str, np.ndarray], test: np.ndarray, s: np.ndarray) -> tuple[float, dict[str, float], float]:
    from fraudactors.modeling.metrics import threshold_for_fpr

    y = d["y"][test]
    thr = threshold_for_fpr(s[~y], 0.02)
    caught = s >= thr
    per = {}
    for name in ("stolen_card", "compromised_merchant", "card_testing", "account_takeover"):
        sel = y & (d["scenario"][test] == name)
        per[name] = float(caught[sel].mean())
    sc_sel = y & (d["scenario"][test] == "stolen_card")
    bold = d["spree"][test][:, 2] == 1
    per["sc_bold"] = float(caught[sc_sel & bold].mean())
    per["sc_quiet"] = float(caught[sc_sel & ~bold].mean())
    return float(caught[y].mean()), per, thr


def matrix(d: dict[str, np.ndarray], extra: list[str], fallback: bool = False) -> tuple[np.ndarray, tuple[str, ...]]:
    """The cached features (``fallback``: the transaction-only ones) and the ``extra`` candidate columns."""
    from fraudactors.features.definition import TRANSACTION_ONLY

    X, names = d["X"], tuple(str(n) for n in d["names"])  # the definition the cache was built with
    if fallback:
        keep = [i for i, n in enumerate(names) if n in TRANSACTION_ONLY]
        X, names = X[:, keep], tuple(names[i] for i in keep)
    if not extra:
        return X, names
    e: dict[str, np.ndarray] = {}
    if any(k in ORACLE_EXTRAS for k in extra):
        e.update(oracle_extras(d))
    if any(k in MERCHANT_EXTRAS for k in extra):
        e.update(merchant_extras(d))
    if any(k in REGULAR_EXTRAS for k in extra):
        e.update(regular_extras(d))
    if any(k in REGULAR90_EXTRAS for k in extra):
        e.update(regular90_extras(d))
    if any(k in TRIP_EXTRAS for k in extra):
        e.update(trip_extras(d))
    if any(k not in (*ORACLE_EXTRAS, *MERCHANT_EXTRAS, *REGULAR_EXTRAS, *REGULAR90_EXTRAS, *TRIP_EXTRAS) for k in extra):
        e.update(extras(d))
    cols = [e[k] for k in extra]
    return np.column_stack([X, *cols]).astype(np.float32), names + tuple(extra)


def diagnose(extra: list[str], seed: int = SEED) -> None:
    d = load()
    X, names = matrix(d, extra)
    t0 = float(d["t"][0])
    for window in WINDOWS:
        test, s = fit_score(X, d, names, window, seed=seed)
        det, per, thr = detection(d, test, s)
        y = d["y"][test]
        scen = d["scenario"][test]
        missed = y & (s < thr)
        print(f"\n== test days {window[0]}-{window[1]}: detection {det:.2%} ({int(y.sum())} frauds, "
              f"{int(missed.sum())} missed)  " + "  ".join(f"{k} {v:.1%}" for k, v in per.items()))
        for name in ("account_takeover", "card_testing", "compromised_merchant"):
            sel = y & (scen == name)
            print(f"  {name}: {int(missed[sel].sum())} missed of {int(sel.sum())}")
        # stolen card: bold / quiet x position
        sp = d["spree"][test]
        sel = y & (scen == "stolen_card")
        print("  stolen_card by position in the spree (missed / all), bold | quiet:")
        for kind, label in ((1, "bold"), (0, "quiet")):
            row = []
            for pos in range(7):  # 0-based place in the spree; the 7th and later together
                k = sel & (sp[:, 2] == kind) & (np.minimum(sp[:, 1], 6) == pos)
                row.append(f"#{pos + 1}{'+' if pos == 6 else ''} {int(missed[k].sum())}/{int(k.sum())}")
            print(f"    {label}: " + ", ".join(row))
        # compromised terminal: the terminal's frauds already reported at the transaction's time
        cm = np.flatnonzero(y & (scen == "compromised_merchant"))
        allfraud = np.flatnonzero(d["y"])
        by_merchant: dict[int, np.ndarray] = defaultdict(list)  # type: ignore[assignment]
        for i in allfraud:
            by_merchant[int(d["merchant"][i])].append(float(d["labeled_at"][i]))
        buckets: dict[str, list[int]] = {"0": [0, 0], "1-2": [0, 0], "3-5": [0, 0], "6-10": [0, 0], ">10": [0, 0]}
        for j in cm:
            i = test[j]
            k = sum(1 for la in by_merchant[int(d["merchant"][i])] if la <= d["t"][i])
            key = "0" if k == 0 else "1-2" if k <= 2 else "3-5" if k <= 5 else "6-10" if k <= 10 else ">10"
            buckets[key][0] += int(missed[j])
            buckets[key][1] += 1
        print("  compromised_merchant by the terminal's frauds already labelled (missed / all): "
              + ", ".join(f"{k}: {v[0]}/{v[1]}" for k, v in buckets.items()))
        days = ((d["t"][test] - t0) // DAY).astype(int)
        print("  missed per test day:", np.bincount(days[missed] - window[0], minlength=14).tolist())


def try_(extra: list[str], params: dict | None, fraud_weight: float, legit_fraction: float, seed: int = SEED,
         fallback: bool = False, algo: str = "hgb", cache: str = CACHE) -> None:
    d = load()
    if cache != CACHE:  # the same rows, the features of another definition
        with np.load(cache) as z:
            d = {**d, "X": z["X"], "names": z["names"]}
    X, names = matrix(d, extra, fallback)
    dets = []
    for window in WINDOWS:
        t = time.time()
        test, s = fit_score(X, d, names, window, params, seed=seed, fraud_weight=fraud_weight,
                            legit_fraction=legit_fraction, algo=algo)
        det, per, _ = detection(d, test, s)
        dets.append(det)
        print(f"  days {window[0]}-{window[1]}: {det:.2%}  " + "  ".join(f"{k} {v:.1%}" for k, v in per.items())
              + f"  ({time.time() - t:.0f} s)")
    print(f"{'fallback: ' if fallback else ''}{algo} {'+'.join(extra) or 'base'} params={params} fw={fraud_weight} lf={legit_fraction} seed={seed}: "
          f"mean {np.mean(dets):.2%}  [{', '.join(f'{x:.2%}' for x in dets)}]")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    g = sub.add_parser("diagnose")
    g.add_argument("extra", nargs="*")
    g.add_argument("--seed", type=int, default=SEED)
    t = sub.add_parser("try")
    t.add_argument("extra", nargs="*")
    t.add_argument("--params", default="")
    t.add_argument("--fraud-weight", type=float, default=1.0)
    t.add_argument("--legit-fraction", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=SEED)
    t.add_argument("--fallback", action="store_true", help="the transaction-only features instead of the 46")
    t.add_argument("--algo", default="hgb", choices=("hgb", "rf"), help="v2's boosting or v1's forest")
    t.add_argument("--features", default="", help="a cache of the definition's features to use instead "
                   "(an .npz with X and names, as written by a newer definition over the same run)")
    a = p.parse_args()
    if a.cmd == "build":
        build()
    elif a.cmd == "diagnose":
        diagnose(a.extra, a.seed)
    else:
        import json
        try_(a.extra, json.loads(a.params) if a.params else None, a.fraud_weight, a.legit_fraction, a.seed, a.fallback,
             a.algo, a.features or CACHE)


if __name__ == "__main__":
    main()
