"""The simulated world: a category catalog, countries, merchants (terminals) and users.

Everything here is drawn once from the simulator's seeded generator, as numpy arrays indexed by
user / merchant number, so the per-day generation in :mod:`fraudactors.sim.simulator` stays
vectorized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (name, median amount in USD, lognormal sigma, everyday weight). Everyday weight 0 = rarely
# bought in a normal week (travel, jewelry, ...) but still reachable through big purchases and trips.
CATEGORIES: tuple[tuple[str, float, float, float], ...] = (
    ("grocery", 42.0, 0.6, 10.0),
    ("restaurant", 31.0, 0.6, 7.0),
    ("fuel", 46.0, 0.4, 4.0),
    ("transport", 12.0, 0.7, 4.0),
    ("retail", 58.0, 0.8, 4.0),
    ("pharmacy", 24.0, 0.6, 2.0),
    ("entertainment", 34.0, 0.7, 2.0),
    ("utilities", 88.0, 0.4, 1.0),
    ("online_retail", 52.0, 0.9, 4.0),
    ("digital_goods", 14.0, 0.9, 2.0),
    ("electronics", 240.0, 0.9, 0.4),
    ("travel", 380.0, 0.8, 0.2),
    ("hotel", 210.0, 0.6, 0.2),
    ("jewelry", 520.0, 0.9, 0.05),
    ("gift_cards", 95.0, 0.6, 0.3),
    ("money_transfer", 280.0, 0.9, 0.3),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c[0] for c in CATEGORIES)
CAT_INDEX: dict[str, int] = {name: i for i, name in enumerate(CATEGORY_NAMES)}
CAT_MEDIAN = np.array([c[1] for c in CATEGORIES])
CAT_SIGMA = np.array([c[2] for c in CATEGORIES])
CAT_EVERYDAY = np.array([c[3] for c in CATEGORIES])
# Categories a traveller buys from.
TRIP_CATEGORIES = np.array([CAT_INDEX[c] for c in ("restaurant", "hotel", "transport", "retail",
                                                    "entertainment", "grocery", "travel")])
TRIP_CATEGORY_P = np.array([0.3, 0.12, 0.18, 0.14, 0.1, 0.12, 0.04])
# Categories that can be bought across borders from home (online).
ONLINE_CATEGORIES = frozenset(CAT_INDEX[c] for c in ("online_retail", "digital_goods", "travel", "gift_cards"))

# (country, share of users, share of merchants). Every country has merchants of every category.
COUNTRIES: tuple[tuple[str, float, float], ...] = (
    ("US", 0.46, 0.34),
    ("GB", 0.10, 0.08),
    ("DE", 0.09, 0.08),
    ("FR", 0.08, 0.08),
    ("ES", 0.05, 0.07),
    ("IT", 0.05, 0.07),
    ("CA", 0.06, 0.06),
    ("MX", 0.04, 0.06),
    ("BR", 0.03, 0.05),
    ("JP", 0.02, 0.05),
    ("TH", 0.01, 0.04),
    ("NG", 0.01, 0.02),
)
COUNTRY_NAMES: tuple[str, ...] = tuple(c[0] for c in COUNTRIES)
CURRENCY = {"US": "USD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "ES": "EUR", "IT": "EUR", "CA": "CAD",
            "MX": "MXN", "BR": "BRL", "JP": "JPY", "TH": "THB", "NG": "NGN"}

N_FAVOURITES = 10


@dataclass(frozen=True)
class Merchants:
    category: np.ndarray  # int (M,)
    country: np.ndarray  # int (M,)
    ids: tuple[str, ...]
    # pools[country][category] -> merchant indices; never empty
    pools: tuple[tuple[np.ndarray, ...], ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Users:
    home: np.ndarray  # int (U,) country
    rate: np.ndarray  # transactions per day (U,)
    wealth: np.ndarray  # amount multiplier (U,)
    cat_cdf: np.ndarray  # (U, C) cumulative category preference
    hour_center: np.ndarray  # UTC hour of peak activity (U,)
    hour_spread: np.ndarray  # hours (U,)
    off_hours_p: np.ndarray  # share of transactions at any hour, night included (U,)
    trip_p: np.ndarray  # probability of starting a trip on a given day (U,)
    favourites: np.ndarray  # (U, N_FAVOURITES) merchant indices in the home country
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


MIN_MERCHANTS = len(COUNTRIES) * len(CATEGORIES)  # one per country and category


def make_merchants(rng: np.random.Generator, n: int) -> Merchants:
    n_countries, n_cats = len(COUNTRIES), len(CATEGORIES)
    if n < MIN_MERCHANTS:
        raise ValueError(f"n_merchants must be at least {MIN_MERCHANTS} (one per country and category)")
    country_p = np.array([c[2] for c in COUNTRIES])
    cat_p = CAT_EVERYDAY / CAT_EVERYDAY.sum() * 0.8 + 0.2 / n_cats
    # The first block guarantees one merchant per (country, category); the rest is drawn.
    base_country = np.repeat(np.arange(n_countries), n_cats)
    base_cat = np.tile(np.arange(n_cats), n_countries)
    extra = n - base_country.size
    country = np.concatenate([base_country, rng.choice(n_countries, size=extra, p=country_p / country_p.sum())])
    category = np.concatenate([base_cat, rng.choice(n_cats, size=extra, p=cat_p)])
    order = rng.permutation(n)
    country, category = country[order], category[order]
    pools = tuple(
        tuple(np.flatnonzero((country == k) & (category == c)) for c in range(n_cats)) for k in range(n_countries)
    )
    ids = tuple(f"m-{i}" for i in range(n))
    return Merchants(category=category, country=country, ids=ids, pools=pools)


def make_users(rng: np.random.Generator, n: int, merchants: Merchants) -> Users:
    n_cats = len(CATEGORIES)
    user_p = np.array([c[1] for c in COUNTRIES])
    home = rng.choice(len(COUNTRIES), size=n, p=user_p / user_p.sum())
    rate = np.clip(rng.lognormal(np.log(2.2), 0.7, size=n), 0.15, 25.0)
    wealth = rng.lognormal(0.0, 0.5, size=n)
    prefs = rng.dirichlet(np.ones(n_cats) * 0.6, size=n) * CAT_EVERYDAY
    prefs /= prefs.sum(axis=1, keepdims=True)
    cat_cdf = np.cumsum(prefs, axis=1)
    cat_cdf[:, -1] = 1.0
    night_owl = rng.random(n) < 0.08
    hour_center = np.where(night_owl, rng.normal(23.5, 1.5, size=n), rng.normal(15.0, 2.5, size=n)) % 24.0
    hour_spread = rng.uniform(2.0, 4.5, size=n)
    off_hours_p = rng.uniform(0.02, 0.12, size=n)
    trip_p = rng.gamma(1.0, 3.0 / 365.0, size=n)
    favourites = np.empty((n, N_FAVOURITES), dtype=np.int64)
    fav_cats = (cat_cdf[:, None, :] < rng.random((n, N_FAVOURITES, 1))).sum(axis=2)
    for u in range(n):
        pools = merchants.pools[home[u]]
        for j in range(N_FAVOURITES):
            pool = pools[fav_cats[u, j]]
            favourites[u, j] = pool[rng.integers(pool.size)]
    ids = tuple(f"c-{i}" for i in range(n))
    return Users(home=home, rate=rate, wealth=wealth, cat_cdf=cat_cdf, hour_center=hour_center,
                 hour_spread=hour_spread, off_hours_p=off_hours_p, trip_p=trip_p, favourites=favourites, ids=ids)
