"""The statistics of a champion/challenger comparison: intervals, tests and sample sizes.

Proportions get Wilson score intervals (honest at small counts and near 0 or 1, where the normal
approximation is not). Two models that decided different transactions (a split) are compared with
the two-proportion z-test; a shadow scored the same transactions as the model that decided them, so
the two are compared pair by pair with McNemar's test (exact binomial on the discordant pairs),
which is far more sensitive for the same number of labels. The sample-size estimates answer the
operator's question "how many more labelled frauds until this is settled?" for the difference seen
so far (or a minimum effect worth detecting, when none is seen yet).

Both tests count each fraud as an independent trial. Frauds are not: a stolen card's spree is
several frauds that a model tends to catch or miss together, so those tests overstate their
confidence. Given the counts per group of cards (the ledger's card groups: a card's frauds all
lie in one group), each test is also made with a variance clustered by group (Durkalski et al.
2003 for the pairs, the same score-test form for the split; read against Student's t with one
degree of freedom fewer than the groups), and a difference is called only when both agree: the
p-value is the larger of the two. ``design_effect`` is the clustered variance
over the independent one; the sample-size estimate is scaled by it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


def z_value(alpha: float) -> float:
    """The two-sided critical value for ``alpha`` (1.96 for 0.05)."""
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def wilson(successes: int, trials: int, alpha: float = 0.05,
           design_effect: float = 1.0) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / trials``; None without trials. With a
    ``design_effect`` above 1 (clustered trials: ``clustered_design_effect``) the interval is the
    one of the effective sample, ``trials / design_effect`` with the same rate (Korn and
    Graubard 1998)."""
    if trials <= 0:
        return None
    successes = min(max(successes, 0), trials)  # the ledger is evidence, not books (see ledger.py)
    z = z_value(alpha)
    p = successes / trials
    trials_effective = trials / max(design_effect, 1.0)
    denominator = 1.0 + z * z / trials_effective
    centre = (p + z * z / (2 * trials_effective)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials_effective
                         + z * z / (4 * trials_effective * trials_effective)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_design_effect(groups: Sequence[tuple[int, int]]) -> float:
    """The design effect of a rate over clustered trials: ``(successes, trials)`` per group, the
    variance of the rate clustered by group (``G / (G - 1)`` times the sum of the squared
    residuals ``successes_g - p trials_g``, over ``trials^2``) over the binomial one; at least 1
    (a smaller one is the estimate's noise, not a gain), and 1 when the rate is 0 or 1."""
    groups = [g for g in groups if g[1] > 0]  # a group without trials is not a cluster
    successes = sum(k for k, _ in groups)
    trials = sum(n for _, n in groups)
    if trials <= 0 or successes <= 0 or successes >= trials or len(groups) < 2:
        return 1.0
    p = successes / trials
    clustered = len(groups) / (len(groups) - 1) * sum((k - p * n) ** 2 for k, n in groups) / trials ** 2
    return max(clustered / (p * (1 - p) / trials), 1.0)


@dataclass(frozen=True, slots=True)
class TestResult:
    """One comparison of a rate between champion (1) and challenger (2)."""

    test: str  # "two-proportion z" | "mcnemar exact", "+ card-clustered" when groups were given
    difference: float  # challenger minus champion
    p_value: float | None  # None: nothing to test yet
    # labelled frauds still needed for ``power`` at ``alpha`` (None: not estimable / already significant)
    more_needed: int | None
    # the variance clustered by card group over the independent one (None: no groups given)
    design_effect: float | None = None


CLUSTERED = " + card-clustered"


def _z_p(difference: float, variance: float, df: int | None = None) -> float:
    """Two-sided p-value of ``difference`` with ``variance`` (0: 1.0 if no difference), against the
    normal distribution, or Student's t with ``df`` degrees of freedom."""
    if variance <= 0.0:
        return 1.0 if difference == 0.0 else 0.0
    statistic = abs(difference) / math.sqrt(variance)
    return float(2.0 * (stats.norm.sf(statistic) if df is None else stats.t.sf(statistic, df)))


def _clustered(p_value: float, variance: float, clustered_variance: float, difference: float,
               groups: int) -> tuple[float, float]:
    """(the larger p-value, the design effect) of a test and its clustered form; the clustered
    statistic is read against Student's t with ``groups - 1`` degrees of freedom (its variance is
    estimated from that many groups)."""
    design_effect = clustered_variance / variance if variance > 0.0 else 1.0
    return max(p_value, _z_p(difference, clustered_variance, max(groups - 1, 1))), design_effect


def two_proportions(k1: int, n1: int, k2: int, n2: int, *, alpha: float = 0.05, power: float = 0.8,
                    min_effect: float = 0.01,
                    groups: Sequence[tuple[int, int, int, int]] | None = None) -> TestResult:
    """Pooled two-proportion z-test of k2/n2 against k1/n1 (independent samples: a split).

    ``groups``: ``(k1, n1, k2, n2)`` per card group (summing to the totals): the test is also
    made with the variance clustered by group, and the larger p-value is kept. Under the null
    hypothesis each group's residual ``(k2_g - p n2_g) / n2 - (k1_g - p n1_g) / n1`` (``p`` pooled)
    has mean 0, and the residuals of different groups are independent; their squares, summed with
    the small-sample factor ``G / (G - 1)``, estimate the variance of ``p2 - p1``.

    ``more_needed``: how many more observations (in both groups together, at the current ratio of
    n1 to n2) give the test ``power`` to detect the difference seen so far, or ``min_effect`` when
    the difference seen is smaller than that (times the design effect, with groups)."""
    name = "two-proportion z" + ("" if groups is None else CLUSTERED)
    if n1 <= 0 or n2 <= 0:
        return TestResult(name, 0.0, None, None)
    if not (0 <= k1 <= n1 and 0 <= k2 <= n2):
        raise ValueError(f"counts out of range: {k1} of {n1}, {k2} of {n2}")
    p1, p2 = k1 / n1, k2 / n2
    diff = p2 - p1
    pooled = (k1 + k2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    p_value = _z_p(diff, variance)
    design_effect = None
    if groups is not None:
        _check_sums(groups, (k1, n1, k2, n2))
        groups = [g for g in groups if g[1] + g[3] > 0]  # a group without frauds is not a cluster
        residuals = [(g2 - pooled * m2) / n2 - (g1 - pooled * m1) / n1 for g1, m1, g2, m2 in groups]
        factor = len(groups) / (len(groups) - 1) if len(groups) > 1 else 1.0
        p_value, design_effect = _clustered(p_value, variance, factor * sum(r * r for r in residuals), diff,
                                            len(groups))
    more = None
    if p_value >= alpha:
        effect = max(abs(diff), min_effect)
        # keep the observed champion rate; the challenger's at the effect size, inside (0, 1) --
        # on the side with room for it, else as far as that side allows (0 of 1 against 1 of 1)
        q1 = min(max(p1, 1e-6), 1 - 1e-6)
        if q1 + effect < 1:
            q2 = q1 + effect
        elif q1 - effect > 0:
            q2 = q1 - effect
        else:
            q2 = 1 - 1e-6 if q1 < 0.5 else 1e-6
            effect = abs(q2 - q1)
        ratio = n1 / n2  # n1 = ratio * n2
        za, zb = z_value(alpha), float(stats.norm.ppf(power))
        qbar = (ratio * q1 + q2) / (ratio + 1)
        need_n2 = (za * math.sqrt(qbar * (1 - qbar) * (1 + 1 / ratio))
                   + zb * math.sqrt(q1 * (1 - q1) / ratio + q2 * (1 - q2))) ** 2 / effect ** 2
        total = math.ceil(need_n2 * (1 + ratio) * max(design_effect or 1.0, 1.0))
        more = max(total - (n1 + n2), 1)
    return TestResult(name, diff, p_value, more, design_effect)


def mcnemar(only_champion: int, only_challenger: int, paired: int, *, alpha: float = 0.05,
            power: float = 0.8, min_effect: float = 0.01,
            groups: Sequence[tuple[int, int]] | None = None) -> TestResult:
    """McNemar's exact test on paired outcomes (the same transactions scored by both models).

    ``only_champion``: pairs the champion got right and the challenger wrong, ``only_challenger``
    the reverse, ``paired``: all pairs. The difference is (only_challenger - only_champion) / paired.
    ``groups``: ``(only_champion, only_challenger)`` per card group (summing to the totals): the
    test is also made clustered by group (Durkalski et al. 2003: the variance of ``c - b`` is the
    sum over groups of ``(c_g - b_g)^2``; McNemar's own is ``b + c``), and the larger p-value kept.
    ``more_needed``: more pairs for ``power`` at the discordance seen so far (times the design effect)."""
    name = "mcnemar exact" + ("" if groups is None else CLUSTERED)
    if paired <= 0:
        return TestResult(name, 0.0, None, None)
    b, c = only_champion, only_challenger
    if b < 0 or c < 0 or b + c > paired:
        raise ValueError(f"counts out of range: {b} and {c} discordant of {paired} pairs")
    discordant = b + c
    diff = (c - b) / paired
    p_value = 1.0 if discordant == 0 else float(stats.binomtest(c, discordant, 0.5).pvalue)
    design_effect = None
    if groups is not None:
        _check_sums(groups, (b, c))
        groups = [g for g in groups if g[0] + g[1] > 0]  # only groups with discordant pairs count
        p_value, design_effect = _clustered(p_value, float(discordant),
                                            float(sum((cg - bg) ** 2 for bg, cg in groups)), float(c - b),
                                            len(groups))
    more = None
    if p_value >= alpha:
        # Connor's approximation: pairs needed for a difference ``effect`` with discordance psi.
        effect = max(abs(diff), min_effect)
        psi = max(discordant / paired, effect, 1e-6)
        za, zb = z_value(alpha), float(stats.norm.ppf(power))
        need = (za * math.sqrt(psi) + zb * math.sqrt(max(psi - effect * effect, 1e-12))) ** 2 / effect ** 2
        more = max(math.ceil(need * max(design_effect or 1.0, 1.0)) - paired, 1)
    return TestResult(name, diff, p_value, more, design_effect)


def _check_sums(groups: Sequence[tuple[int, ...]], totals: tuple[int, ...]) -> None:
    sums = tuple(sum(column) for column in zip(*groups, strict=True)) if groups else (0,) * len(totals)
    if sums != totals:
        raise ValueError(f"the card groups sum to {sums}, not to the totals {totals}")
