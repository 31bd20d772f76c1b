"""Fraud scenarios (and the legitimate look-alikes that keep them honest).

Each function returns a list of raw events ``(time, user, merchant, amount)`` for one episode; the
simulator tags them with the scenario name. Rates are per user-day (or per day for merchants) so the
overall fraud share stays in the 0.5-2 % band whatever the population size.
"""

from __future__ import annotations

import numpy as np

from fraudactors.sim.population import (
    CAT_INDEX,
    CAT_MEDIAN,
    CAT_SIGMA,
    COUNTRY_NAMES,
    Merchants,
    Users,
)

RawEvent = tuple[float, int, int, float]

STOLEN_CARD = "stolen_card"
CARD_TESTING = "card_testing"
COMPROMISED_MERCHANT = "compromised_merchant"
ACCOUNT_TAKEOVER = "account_takeover"
LEGIT = "legit"
SCENARIOS: tuple[str, ...] = (STOLEN_CARD, CARD_TESTING, COMPROMISED_MERCHANT, ACCOUNT_TAKEOVER)

# Episode starts per user-day (compromised merchant: per merchant-day).
STOLEN_CARD_RATE = 0.0013
CARD_TESTING_RATE = 0.00055
ACCOUNT_TAKEOVER_RATE = 0.0011
COMPROMISE_RATE = 0.000015  # per user-day, so the share of this scenario does not depend on n_merchants
COMPROMISE_MIN_DAYS, COMPROMISE_MAX_DAYS = 14.0, 42.0
# Legitimate look-alikes per user-day.
LEGIT_MICRO_BURST_RATE = 0.004  # parking meters, transit taps, app-store top-ups
LEGIT_SHOPPING_DAY_RATE = 0.004  # a big day out: several larger purchases in a few hours

_SPREE_CATS = np.array([CAT_INDEX[c] for c in ("electronics", "jewelry", "gift_cards", "online_retail",
                                               "retail", "travel", "money_transfer")])
_SPREE_P = np.array([0.3, 0.1, 0.15, 0.2, 0.12, 0.08, 0.05])
_TEST_CATS = np.array([CAT_INDEX[c] for c in ("digital_goods", "online_retail")])
_CASHOUT_CATS = np.array([CAT_INDEX[c] for c in ("electronics", "gift_cards", "online_retail")])
_ATO_CATS = np.array([CAT_INDEX[c] for c in ("money_transfer", "gift_cards", "digital_goods", "electronics")])
_ATO_P = np.array([0.35, 0.25, 0.15, 0.25])
_MICRO_CATS = np.array([CAT_INDEX[c] for c in ("transport", "digital_goods")])
_SHOPPING_CATS = np.array([CAT_INDEX[c] for c in ("retail", "electronics", "online_retail", "restaurant")])
# Terminals that get skimmed: card-present, everyday merchants.
COMPROMISABLE_CATS = frozenset(CAT_INDEX[c] for c in ("grocery", "restaurant", "fuel", "retail",
                                                       "pharmacy", "entertainment"))


def _foreign(rng: np.random.Generator, home: int) -> int:
    k = int(rng.integers(len(COUNTRY_NAMES) - 1))
    return k if k < home else k + 1


def _pick(rng: np.random.Generator, merchants: Merchants, country: int, cat: int) -> int:
    pool = merchants.pools[country][cat]
    return int(pool[rng.integers(pool.size)])


def _amount(rng: np.random.Generator, cat: int, scale: float) -> float:
    return float(rng.lognormal(np.log(CAT_MEDIAN[cat] * scale), CAT_SIGMA[cat]))


def stolen_card(rng: np.random.Generator, users: Users, merchants: Merchants, user: int, t0: float) -> list[RawEvent]:
    """A stolen card's spending spree: bold (big amounts, risky categories, often abroad) or quiet
    (ordinary-looking purchases at new merchants, spread over a day)."""
    home = int(users.home[user])
    bold = rng.random() < 0.7
    n = int(rng.integers(3, 13))
    gaps = rng.exponential(1500.0 if bold else 9000.0, size=n)
    gaps[0] = 0.0
    times = t0 + np.cumsum(gaps)
    country = _foreign(rng, home) if rng.random() < (0.6 if bold else 0.2) else home
    out: list[RawEvent] = []
    for t in times:
        if bold:
            cat = int(rng.choice(_SPREE_CATS, p=_SPREE_P))
            amount = _amount(rng, cat, float(rng.uniform(1.0, 2.5)))
        else:
            cat = int((users.cat_cdf[user] < rng.random()).sum())
            amount = _amount(rng, cat, float(users.wealth[user]) * float(rng.uniform(0.8, 1.6)))
        out.append((float(t), user, _pick(rng, merchants, country, cat), amount))
    return out


def card_testing(rng: np.random.Generator, users: Users, merchants: Merchants, user: int, t0: float) -> list[RawEvent]:
    """Bursts of tiny amounts at one to three online merchants, sometimes followed by a cash-out."""
    home = int(users.home[user])
    country = _foreign(rng, home) if rng.random() < 0.5 else home
    shops = [_pick(rng, merchants, country, int(rng.choice(_TEST_CATS))) for _ in range(int(rng.integers(1, 4)))]
    n = int(rng.integers(4, 21))
    times = t0 + np.cumsum(rng.exponential(45.0, size=n))
    out: list[RawEvent] = []
    for t in times:
        amount = 1.0 if rng.random() < 0.2 else float(rng.uniform(0.5, 4.99))
        out.append((float(t), user, shops[int(rng.integers(len(shops)))], amount))
    if rng.random() < 0.5:
        t = float(times[-1])
        for _ in range(int(rng.integers(1, 4))):
            t += float(rng.exponential(7200.0))
            cat = int(rng.choice(_CASHOUT_CATS))
            out.append((t, user, _pick(rng, merchants, country, cat), _amount(rng, cat, float(rng.uniform(1.0, 3.0)))))
    return out


def account_takeover(rng: np.random.Generator, users: Users, merchants: Merchants, user: int,
                     day_start: float) -> list[RawEvent]:
    """An account taken over at night (00:30-05:00 UTC): transfers, gift cards, electronics, mostly domestic."""
    home = int(users.home[user])
    country = home if rng.random() < 0.85 else _foreign(rng, home)
    n = int(rng.integers(2, 7))
    t0 = day_start + float(rng.uniform(0.5, 5.0)) * 3600.0
    times = t0 + np.cumsum(rng.exponential(900.0, size=n))
    out: list[RawEvent] = []
    for t in times:
        cat = int(rng.choice(_ATO_CATS, p=_ATO_P))
        out.append((float(t), user, _pick(rng, merchants, country, cat), _amount(rng, cat, float(rng.uniform(1.0, 4.0)))))
    return out


def compromised_merchant(rng: np.random.Generator, users: Users, merchants: Merchants, merchant: int,
                         rate_per_day: float, start: float, end: float) -> list[RawEvent]:
    """Cloned cards cashed out through one compromised terminal between ``start`` and ``end``:
    ordinary-looking purchases from many different cards, during business hours."""
    n = int(rng.poisson(rate_per_day * (end - start) / 86400.0))
    if n == 0:
        return []
    cat = int(merchants.category[merchant])
    country = int(merchants.country[merchant])
    locals_ = np.flatnonzero(users.home == country)
    out: list[RawEvent] = []
    for _ in range(n):
        t = start + float(rng.uniform(0.0, end - start))
        if locals_.size and rng.random() < 0.75:
            user = int(locals_[rng.integers(locals_.size)])
        else:
            user = int(rng.integers(len(users)))
        out.append((t, user, merchant, _amount(rng, cat, float(rng.uniform(1.0, 2.2)))))
    return out


def micro_burst(rng: np.random.Generator, users: Users, merchants: Merchants, user: int, t0: float) -> list[RawEvent]:
    """Legitimate: several tiny payments in a short time (transit, parking, app top-ups)."""
    home = int(users.home[user])
    cat = int(rng.choice(_MICRO_CATS))
    shop = _pick(rng, merchants, home, cat)
    n = int(rng.integers(3, 9))
    times = t0 + np.cumsum(rng.exponential(240.0, size=n))
    return [(float(t), user, shop, float(rng.uniform(0.8, 6.0))) for t in times]


def shopping_day(rng: np.random.Generator, users: Users, merchants: Merchants, user: int, t0: float) -> list[RawEvent]:
    """Legitimate: a big shopping day, several larger purchases, new shops."""
    home = int(users.home[user])
    n = int(rng.integers(3, 8))
    times = t0 + np.cumsum(rng.exponential(1800.0, size=n))
    out: list[RawEvent] = []
    for t in times:
        cat = int(rng.choice(_SHOPPING_CATS))
        scale = float(users.wealth[user]) * float(rng.uniform(1.5, 4.0))
        out.append((float(t), user, _pick(rng, merchants, home, cat), _amount(rng, cat, scale)))
    return out
