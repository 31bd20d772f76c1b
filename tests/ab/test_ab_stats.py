"""The statistics behind `fraudactors ab report`: intervals, tests, sample sizes, verdicts."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from fraudactors.ab.ledger import HIST_BINS, Window
from fraudactors.ab.report import build_report
from fraudactors.ab.stats import mcnemar, two_proportions, wilson


def test_wilson_interval_matches_the_textbook_values() -> None:
    low, high = wilson(8, 10)  # type: ignore[misc]
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson(0, 50)  # type: ignore[misc]
    assert low == pytest.approx(0.0, abs=1e-12) and 0.05 < high < 0.08, "no successes still bounds the rate from above"
    assert wilson(0, 0) is None


def test_two_proportions_agrees_with_the_chi_square_test() -> None:
    result = two_proportions(180, 200, 95, 100)
    chi2 = stats.chi2_contingency([[180, 20], [95, 5]], correction=False)
    assert result.p_value == pytest.approx(chi2.pvalue, rel=1e-9)
    assert result.difference == pytest.approx(0.05)


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs() -> None:
    result = mcnemar(only_champion=3, only_challenger=15, paired=400)
    assert result.p_value == pytest.approx(stats.binomtest(15, 18, 0.5).pvalue)
    assert result.difference == pytest.approx(12 / 400)
    assert result.more_needed is None, "significant: nothing more is needed"
    assert mcnemar(5, 5, 100).p_value == 1.0


def test_more_labelled_frauds_needed_shrinks_as_the_difference_grows() -> None:
    small = two_proportions(90, 100, 92, 100)
    large = two_proportions(80, 100, 88, 100)
    assert small.p_value is not None and small.p_value > 0.05
    assert small.more_needed is not None and large.more_needed is not None
    assert small.more_needed > large.more_needed > 0
    # with the split's 9:1 ratio, far more frauds are needed than with 1:1
    unbalanced = two_proportions(720, 800, 83, 90)
    assert unbalanced.more_needed is not None and unbalanced.more_needed > large.more_needed


def test_the_sample_size_estimate_delivers_the_power_it_promises() -> None:
    """Simulate the estimate: with the estimated number of frauds, a real difference of the same
    size is found in about ``power`` of the runs (80 %), at the 9:1 split."""
    p1, p2, ratio = 0.90, 0.94, 9
    n2 = 50  # 47 of 50 and 405 of 450: the rates seen are exactly p2 and p1
    estimate = two_proportions(round(p1 * n2 * ratio), n2 * ratio, round(p2 * n2), n2)
    assert estimate.more_needed is not None
    total = n2 * (ratio + 1) + estimate.more_needed
    m2 = total // (ratio + 1)
    m1 = total - m2
    rng = random.Random(3)
    hits = 0
    runs = 400
    for _ in range(runs):
        k1 = sum(rng.random() < p1 for _ in range(m1))
        k2 = sum(rng.random() < p2 for _ in range(m2))
        result = two_proportions(k1, m1, k2, m2)
        hits += result.p_value is not None and result.p_value < 0.05
    assert 0.70 <= hits / runs <= 0.90, hits / runs


def _window(buckets: dict[str, dict[str, int]], newest: float = 100 * 3600.0) -> Window:
    return Window(newest, 3600, 0, {name: {10: fields} for name, fields in buckets.items()})


def _hist(n: int) -> dict[str, int]:
    return {f"h{i}": n // HIST_BINS for i in range(HIST_BINS)}


@pytest.mark.parametrize(("caught_b", "verdict"), [(290, "B better"), (180, "B worse"),
                                                    (232, "no difference detectable yet (need ~")])
def test_split_verdicts(caught_b: int, verdict: str) -> None:
    report = build_report(_window({
        "d:A/v1": {"n": 90_000, "f": 2700, "tp": 2100, "fn": 600, **_hist(90_000)},
        "d:B/v2": {"n": 10_000, "f": 300, "tp": caught_b, "fn": 300 - caught_b, **_hist(10_000)},
    }), window_s=28 * 86400, label_delay_s=7 * 86400)
    assert report["champion"] == "d:A/v1"
    (comparison,) = report["comparisons"]
    assert comparison["traffic"] == "split"
    assert comparison["verdict"].startswith(verdict), comparison


def test_shadow_verdict_uses_the_paired_test() -> None:
    """Same detection in total, but on identical traffic the shadow catches 30 the champion missed
    and misses 10 it caught: McNemar sees it where an unpaired test could not."""
    report = build_report(_window({
        "d:A/v1": {"n": 50_000, "f": 1000, "tp": 470, "fn": 30, "p:s:S/v2": 500, "x:s:S/v2": 10},
        "s:S/v2": {"n": 50_000, "f": 1000, "tp": 490, "fn": 10, "p:d:A/v1": 500, "x:d:A/v1": 30},
    }), window_s=28 * 86400, label_delay_s=7 * 86400)
    (comparison,) = report["comparisons"]
    assert comparison["traffic"] == "identical" and comparison["test"] == "mcnemar exact"
    assert comparison["p_value"] == pytest.approx(stats.binomtest(30, 40, 0.5).pvalue)
    assert comparison["verdict"] == "S better"


def test_more_flagging_is_not_called_better() -> None:
    report = build_report(_window({
        "d:A/v1": {"n": 90_000, "f": 2700, "tp": 2100, "fn": 600},
        "d:B/v2": {"n": 10_000, "f": 900, "tp": 290, "fn": 10},
    }), window_s=28 * 86400, label_delay_s=7 * 86400)
    assert report["comparisons"][0]["verdict"].startswith("no clear winner: B catches more")


def test_rows_carry_intervals_maturity_and_score_quantiles() -> None:
    bucket_s = 3600
    newest = 1000 * bucket_s
    window = Window(newest, bucket_s, 0, {"d:A/v1": {
        990: {"n": 30, "f": 3, "tp": 2, "fn": 1, "h1": 30},  # 10 h old: not mature at 1 day
        900: {"n": 70, "f": 7, "tp": 5, "fn": 0, "h19": 70},  # 100 h old: mature
    }})
    (row,) = build_report(window, window_s=28 * 86400, label_delay_s=86400)["variants"]
    assert row["decisions"] == 100 and row["flagged_rate"] == pytest.approx(0.1)
    assert row["label_maturity"] == pytest.approx(0.7)
    assert row["detection_rate"] == pytest.approx(7 / 8)
    low, high = row["detection_ci"]
    assert low < 7 / 8 < high
    assert row["precision"] == pytest.approx(0.7)
    assert row["false_positive_rate"] == pytest.approx(3 / 92)
    assert row["score"]["p50"] == pytest.approx(1.0) and row["score"]["histogram"][1] == 30
    assert not math.isnan(high)
