"""The statistics of a champion/challenger comparison: intervals, tests and sample sizes.

Proportions get Wilson score intervals (honest at small counts and near 0 or 1, where the normal
approximation is not). Two models that decided different transactions (a split) are compared with
the two-proportion z-test; a shadow scored the same transactions as the model that decided them, so
the two are compared pair by pair with McNemar's test (exact binomial on the discordant pairs),
which is far more sensitive for the same number of labels. The sample-size estimates answer the
operator's question "how many more labelled frauds until this is settled?" for the difference seen
so far (or a minimum effect worth detecting, when none is seen yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


def z_value(alpha: float) -> float:
    """The two-sided critical value for ``alpha`` (1.96 for 0.05)."""
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def wilson(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / trials``; None without trials."""
    if trials <= 0:
        return None
    successes = min(max(successes, 0), trials)  # the ledger is evidence, not books (see ledger.py)
    z = z_value(alpha)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class TestResult:
    """One comparison of a rate between champion (1) and challenger (2)."""

    test: str  # "two-proportion z" | "mcnemar exact"
    difference: float  # challenger minus champion
    p_value: float | None  # None: nothing to test yet
    # labelled frauds still needed for ``power`` at ``alpha`` (None: not estimable / already significant)
    more_needed: int | None


def two_proportions(k1: int, n1: int, k2: int, n2: int, *, alpha: float = 0.05, power: float = 0.8,
                    min_effect: float = 0.01) -> TestResult:
    """Pooled two-proportion z-test of k2/n2 against k1/n1 (independent samples: a split).

    ``more_needed``: how many more observations (in both groups together, at the current ratio of
    n1 to n2) give the test ``power`` to detect the difference seen so far, or ``min_effect`` when
    the difference seen is smaller than that."""
    if n1 <= 0 or n2 <= 0:
        return TestResult("two-proportion z", 0.0, None, None)
    p1, p2 = k1 / n1, k2 / n2
    diff = p2 - p1
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    p_value = (1.0 if diff == 0.0 else 0.0) if se == 0.0 else float(2.0 * stats.norm.sf(abs(diff) / se))
    more = None
    if p_value >= alpha:
        effect = max(abs(diff), min_effect)
        # keep the observed champion rate; the challenger's at the effect size, inside [0, 1]
        q1 = min(max(p1, 1e-6), 1 - 1e-6)
        q2 = q1 + effect if q1 + effect < 1 else q1 - effect
        ratio = n1 / n2  # n1 = ratio * n2
        za, zb = z_value(alpha), float(stats.norm.ppf(power))
        qbar = (ratio * q1 + q2) / (ratio + 1)
        need_n2 = (za * math.sqrt(qbar * (1 - qbar) * (1 + 1 / ratio))
                   + zb * math.sqrt(q1 * (1 - q1) / ratio + q2 * (1 - q2))) ** 2 / effect ** 2
        total = math.ceil(need_n2 * (1 + ratio))
        more = max(total - (n1 + n2), 1)
    return TestResult("two-proportion z", diff, p_value, more)


def mcnemar(only_champion: int, only_challenger: int, paired: int, *, alpha: float = 0.05,
            power: float = 0.8, min_effect: float = 0.01) -> TestResult:
    """McNemar's exact test on paired outcomes (the same transactions scored by both models).

    ``only_champion``: pairs the champion got right and the challenger wrong, ``only_challenger``
    the reverse, ``paired``: all pairs. The difference is (only_challenger - only_champion) / paired.
    ``more_needed``: more pairs for ``power`` at the discordance seen so far."""
    if paired <= 0:
        return TestResult("mcnemar exact", 0.0, None, None)
    b, c = only_champion, only_challenger
    discordant = b + c
    diff = (c - b) / paired
    p_value = 1.0 if discordant == 0 else float(stats.binomtest(c, discordant, 0.5).pvalue)
    more = None
    if p_value >= alpha:
        # Connor's approximation: pairs needed for a difference ``effect`` with discordance psi.
        effect = max(abs(diff), min_effect)
        psi = max(discordant / paired, effect, 1e-6)
        za, zb = z_value(alpha), float(stats.norm.ppf(power))
        need = (za * math.sqrt(psi) + zb * math.sqrt(max(psi - effect * effect, 1e-12))) ** 2 / effect ** 2
        more = max(math.ceil(need) - paired, 1)
    return TestResult("mcnemar exact", diff, p_value, more)
