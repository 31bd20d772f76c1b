"""The statistics behind `fraudactors ab report`: intervals, tests, sample sizes, verdicts."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

from fraudactors.ab.ledger import CARD_GROUPS, HIST_BINS, Window
from fraudactors.ab.report import build_report
from fraudactors.ab.stats import clustered_design_effect, mcnemar, two_proportions, wilson


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


def _paired_window(only_shadow_by_group: dict[int, int], only_champion_by_group: dict[int, int]) -> Window:
    """The shadow test's ledger, with card-group fields: 500 paired frauds."""
    b, c = sum(only_champion_by_group.values()), sum(only_shadow_by_group.values())
    return _window({
        "d:A/v1": {"n": 50_000, "f": 1000, "tp": 470 - c + b, "fn": 30 + c - b, "p:s:S/v2": 500, "x:s:S/v2": b,
                   **{f"gx{g}:s:S/v2": n for g, n in only_champion_by_group.items()}},
        "s:S/v2": {"n": 50_000, "f": 1000, "tp": 470, "fn": 30, "p:d:A/v1": 500, "x:d:A/v1": c,
                   **{f"gx{g}:d:A/v1": n for g, n in only_shadow_by_group.items()}},
    })


def test_a_shadows_gain_from_a_few_cards_is_not_called_better() -> None:
    """30 frauds the shadow caught and the champion missed: from 30 cards they settle it; from
    three cards' sprees (ten each) they are three observations, not thirty."""
    spread = build_report(_paired_window({g: 1 for g in range(30)}, {g: 1 for g in range(30, 40)}),
                         window_s=28 * 86400, label_delay_s=7 * 86400)["comparisons"][0]
    assert spread["test"] == "mcnemar exact + card-clustered"
    assert spread["verdict"] == "S better" and spread["design_effect"] == pytest.approx(1.0)
    clumped = build_report(_paired_window({13: 10, 17: 10, 40: 10}, {g: 1 for g in range(10)}),
                           window_s=28 * 86400, label_delay_s=7 * 86400)["comparisons"][0]
    assert clumped["test"] == "mcnemar exact + card-clustered"
    assert clumped["p_value"] > 0.05 and clumped["verdict"].startswith("no difference detectable yet")
    assert clumped["design_effect"] == pytest.approx((3 * 100 + 10) / 40)
    assert (spread["only_challenger_caught"], clumped["only_challenger_caught"]) == (30, 30)


def test_a_split_clusters_only_when_every_labelled_fraud_is_in_a_card_group() -> None:
    """Buckets written before the card groups (a ledger window across an upgrade) have none:
    the test is the independent one, and says so."""
    fields_a = {"n": 90_000, "f": 2700, "tp": 2100, "fn": 600}
    fields_b = {"n": 10_000, "f": 300, "tp": 290, "fn": 10}
    grouped = {"d:A/v1": {**fields_a, "gc1": 2100, "gm2": 600}, "d:B/v2": {**fields_b, "gc3": 290, "gm4": 10}}
    (comparison,) = build_report(_window(grouped), window_s=28 * 86400, label_delay_s=7 * 86400)["comparisons"]
    assert comparison["test"] == "two-proportion z + card-clustered"
    assert comparison["design_effect"] is not None and comparison["design_effect"] > 100
    assert comparison["verdict"].startswith("no difference detectable yet"), "four card groups: four observations"
    partly = {"d:A/v1": {**fields_a, "gc1": 2000, "gm2": 600}, "d:B/v2": grouped["d:B/v2"]}
    (comparison,) = build_report(_window(partly), window_s=28 * 86400, label_delay_s=7 * 86400)["comparisons"]
    assert comparison["test"] == "two-proportion z" and comparison["design_effect"] is None
    assert comparison["verdict"] == "B better"


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


# -- frauds that come in sprees: clustered by card -------------------------------------------------------

def _sprees(rng: np.random.Generator, cards: int, spree: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each card has ``spree`` frauds, routed one by one to A (90 %) or B; each model catches or
    misses a card's whole spree (90 % caught, independently per model): the two models are
    equally good. Returns per fraud: its card, whether A decided it, and whether the deciding
    model caught it."""
    card = np.repeat(np.arange(cards), spree)
    to_a = rng.random(card.size) < 0.9
    caught_by = {m: rng.random(cards) < 0.9 for m in ("A", "B")}
    caught = np.where(to_a, caught_by["A"][card], caught_by["B"][card])
    return card, to_a, caught


def _split_counts(card: np.ndarray, to_a: np.ndarray, caught: np.ndarray
                  ) -> tuple[tuple[int, int, int, int], list[tuple[int, int, int, int]]]:
    group = card % CARD_GROUPS
    per_group = []
    for g in range(CARD_GROUPS):
        in_g = group == g
        a, b = in_g & to_a, in_g & ~to_a
        per_group.append((int(caught[a].sum()), int(a.sum()), int(caught[b].sum()), int(b.sum())))
    totals = tuple(int(sum(column)) for column in zip(*per_group, strict=True))
    return totals, per_group  # type: ignore[return-value]


def test_with_frauds_in_sprees_the_independent_split_test_sees_differences_that_are_not_there() -> None:
    """Two equally good models, frauds in sprees of 10 per card caught or missed together: the
    independent test calls a difference in far more than 5 % of the runs; clustered by card
    group, it stays near 5 %."""
    rng = np.random.default_rng(11)
    runs, independent, clustered, effects = 300, 0, 0, []
    for _ in range(runs):
        (k1, n1, k2, n2), groups = _split_counts(*_sprees(rng, cards=200, spree=10))
        independent += (two_proportions(k1, n1, k2, n2).p_value or 1.0) < 0.05
        result = two_proportions(k1, n1, k2, n2, groups=groups)
        clustered += (result.p_value or 1.0) < 0.05
        effects.append(result.design_effect)
    assert independent / runs > 0.15, independent / runs
    assert clustered / runs <= 0.08, clustered / runs
    assert 1.8 < float(np.median(effects)) < 4.0  # spree 10: var of p2 - p1 is ~2.6x the independent one


def test_with_frauds_in_sprees_the_independent_mcnemar_test_sees_differences_that_are_not_there() -> None:
    """The same on identical traffic (a shadow): each card's discordant pairs come ten at a time."""
    rng = np.random.default_rng(12)
    runs, independent, clustered = 300, 0, 0
    for _ in range(runs):
        cards, spree = 200, 10
        caught_a, caught_s = rng.random(cards) < 0.9, rng.random(cards) < 0.9
        b_card = np.where(caught_a & ~caught_s, spree, 0)
        c_card = np.where(caught_s & ~caught_a, spree, 0)
        groups = [(int(b_card[g::CARD_GROUPS].sum()), int(c_card[g::CARD_GROUPS].sum()))
                  for g in range(CARD_GROUPS)]
        b, c = int(b_card.sum()), int(c_card.sum())
        independent += (mcnemar(b, c, cards * spree).p_value or 1.0) < 0.05
        clustered += (mcnemar(b, c, cards * spree, groups=groups).p_value or 1.0) < 0.05
    assert independent / runs > 0.3, independent / runs
    assert clustered / runs <= 0.08, clustered / runs


def test_frauds_of_different_cards_lose_no_power_to_the_clustering() -> None:
    """One fraud per card: the clustered test finds the real difference as the independent one does."""
    rng = np.random.default_rng(13)
    runs, independent, clustered = 200, 0, 0
    for _ in range(runs):
        card = np.arange(3000)
        to_a = rng.random(card.size) < 0.9
        caught = rng.random(card.size) < np.where(to_a, 0.88, 0.95)
        (k1, n1, k2, n2), groups = _split_counts(card, to_a, caught)
        independent += (two_proportions(k1, n1, k2, n2).p_value or 1.0) < 0.05
        result = two_proportions(k1, n1, k2, n2, groups=groups)
        clustered += (result.p_value or 1.0) < 0.05
    assert independent / runs > 0.6
    assert clustered >= 0.9 * independent, (clustered, independent)


def test_card_groups_that_do_not_add_up_are_refused() -> None:
    with pytest.raises(ValueError, match="sum to"):
        two_proportions(10, 20, 5, 10, groups=[(9, 20, 5, 10)])
    with pytest.raises(ValueError, match="sum to"):
        mcnemar(3, 4, 50, groups=[(3, 3)])


def test_the_detection_interval_covers_the_true_rate_when_frauds_come_in_sprees() -> None:
    """A model that catches 90 % of cards' sprees (10 frauds each, caught or missed together):
    the binomial 95 % interval misses the true rate far more often than 5 %; the one of the
    effective sample (the card-clustered design effect), about 5 %."""
    rng = np.random.default_rng(14)
    runs, naive, clustered = 300, 0, 0
    for _ in range(runs):
        cards, spree = 150, 10
        caught_cards = rng.random(cards) < 0.9
        groups = [(int(caught_cards[g::CARD_GROUPS].sum()) * spree, caught_cards[g::CARD_GROUPS].size * spree)
                  for g in range(CARD_GROUPS)]
        k, n = sum(c for c, _ in groups), cards * spree
        low, high = wilson(k, n)  # type: ignore[misc]
        naive += not low <= 0.9 <= high
        low, high = wilson(k, n, design_effect=clustered_design_effect(groups))  # type: ignore[misc]
        clustered += not low <= 0.9 <= high
    assert naive / runs > 0.3, naive / runs
    assert clustered / runs <= 0.09, clustered / runs


def test_the_design_effect_of_independent_trials_is_one() -> None:
    assert clustered_design_effect([(1, 1), (0, 1)] * 500) == pytest.approx(1.0, abs=0.01)
    assert clustered_design_effect([(5, 5), (0, 5)]) > 4  # all or nothing per group
    assert clustered_design_effect([(0, 10), (0, 3)]) == 1.0 and clustered_design_effect([]) == 1.0
    assert wilson(45, 50, design_effect=1.0) == wilson(45, 50)
    low, high = wilson(450, 500, design_effect=10.0)  # type: ignore[misc]
    assert (low, high) == pytest.approx(wilson(45, 50))  # type: ignore[arg-type]


@pytest.mark.parametrize(("k1", "n1", "k2", "n2"), [(0, 1, 1, 1), (1, 3, 2, 2), (1, 1, 0, 1), (0, 5, 5, 5)])
def test_the_frauds_still_needed_are_estimated_for_every_early_split(k1: int, n1: int, k2: int, n2: int) -> None:
    """A test's first labelled frauds (the champion missed its one, the challenger caught its own)
    put the effect seen beyond either side of the champion's rate: the estimate takes the side
    with the most room instead of a rate below 0 (a math domain error that stopped the reporter)."""
    for groups in (None, [(k1, n1, k2, n2)] + [(0, 0, 0, 0)] * (CARD_GROUPS - 1)):
        result = two_proportions(k1, n1, k2, n2, groups=groups)
        assert result.p_value is not None and 0.0 <= result.p_value <= 1.0
        assert (result.more_needed is None) == (result.p_value < 0.05)
        assert result.more_needed is None or result.more_needed >= 1


def test_counts_out_of_range_are_refused_by_the_tests() -> None:
    with pytest.raises(ValueError, match="out of range"):
        two_proportions(-1, 1, 1, 2)
    with pytest.raises(ValueError, match="out of range"):
        two_proportions(2, 1, 1, 2)
    with pytest.raises(ValueError, match="out of range"):
        mcnemar(-1, 3, 10)


def test_a_ledger_total_taken_below_zero_by_a_flip_counts_as_none_in_the_report() -> None:
    """A flip takes back a first verdict that was never counted (its decision not matched yet):
    the window's totals can go below zero, and the report reads them as zero instead of failing
    or calling a difference significant."""
    window = _window({
        "d:A/v1": {"n": 1000, "f": 40, "tp": -1, "fn": 1, "p:s:C/v3": 1, "x:s:C/v3": -2, **_hist(1000)},
        "s:C/v3": {"n": 1000, "f": 45, "tp": 1, "fn": 0, "p:d:A/v1": 1, "x:d:A/v1": 1, **_hist(1000)},
    })
    report = build_report(window, window_s=86400.0 * 28, label_delay_s=0.0)
    champion = next(r for r in report["variants"] if r["member"] == "d:A/v1")
    assert champion["frauds_caught"] == 0 and champion["frauds_missed"] == 1
    (comparison,) = report["comparisons"]
    assert comparison["only_champion_caught"] == 0 and 0.0 <= comparison["p_value"] <= 1.0


def test_card_groups_without_frauds_are_not_clusters() -> None:
    """The report passes all 64 groups; those without a fraud (or without a discordant pair) must
    not count as clusters, or a few sprees read as 63 degrees of freedom and a difference is
    called on four cards' worth of evidence."""
    few = [(0, 8)] * 4
    assert mcnemar(0, 32, 1000, groups=few + [(0, 0)] * 60) == mcnemar(0, 32, 1000, groups=few)
    assert mcnemar(0, 32, 1000, groups=few).p_value > 0.05  # type: ignore[operator]
    split = [(3, 10, 9, 10)] * 4
    assert two_proportions(12, 40, 36, 40, groups=split + [(0, 0, 0, 0)] * 60) == \
        two_proportions(12, 40, 36, 40, groups=split)
    assert clustered_design_effect([(5, 10), (1, 10)] + [(0, 0)] * 62) == clustered_design_effect([(5, 10), (1, 10)])


def test_a_stray_flip_in_one_card_group_keeps_the_clustered_test() -> None:
    """A flip taken back in a group with no other fraud leaves that group at -1: floored, with
    the totals rebuilt from the groups, the member still has its card groups and the split is
    still tested clustered (not by the independent test alone, which calls sprees significant)."""
    champion = {"n": 5000, "f": 200, "tp": 20, "fn": 19, **_hist(5000),
                **{f"gc{g}": 5 for g in range(4)}, **{f"gm{g}": 5 for g in range(4)}, "gm5": -1}
    challenger = {"n": 5000, "f": 200, "tp": 36, "fn": 4, **_hist(5000),
                  **{f"gc{g}": 9 for g in range(10, 14)}, **{f"gm{g}": 1 for g in range(10, 14)}}
    report = build_report(_window({"d:A/v1": champion, "d:B/v2": challenger}), window_s=86400.0 * 28,
                          label_delay_s=0.0)
    (comparison,) = report["comparisons"]
    assert comparison["test"].endswith("card-clustered"), comparison["test"]
    assert comparison["champion_frauds"] == 40
    assert comparison["p_value"] > 10 * two_proportions(20, 40, 36, 40).p_value  # type: ignore[operator]


def _hourly(catch: dict[str, list[float]], hours: range, per_hour: dict[str, int]) -> dict[str, dict[int, dict[str, int]]]:
    """Buckets per member: ``per_hour[m]`` decisions an hour, a tenth of them frauds, of which the
    share ``catch[m][h]`` caught (the rate may change by the hour: the traffic does)."""
    out: dict[str, dict[int, dict[str, int]]] = {}
    for member, n in per_hour.items():
        for hour in hours:
            rate = catch[member][hour]
            if rate < 0:
                continue  # not deciding this hour
            frauds = n // 10
            tp = round(frauds * rate)
            out.setdefault(member, {})[hour] = {"n": n, "f": tp, "tp": tp, "fn": frauds - tp}
    return out


def test_after_a_promotion_the_new_model_is_champion_and_split_models_meet_only_where_both_ran() -> None:
    """A promotes v2 at hour 300 of 600, and from then on every model catches 70 % instead of 90 %
    (a harder month). v1 and v2 are equally good: the report must neither keep the retired v1 as
    champion nor call v2 worse for the month it happened to run in."""
    hours = range(600)
    b_ran = [0.9] * 300 + [0.7] * 300
    v1_ran = [0.9] * 300 + [-1.0] * 300
    v2_ran = [-1.0] * 300 + [0.7] * 300
    buckets = _hourly({"d:A/v1": v1_ran, "d:A/v2": v2_ran, "d:B/v2": b_ran}, hours,
                      {"d:A/v1": 900, "d:A/v2": 900, "d:B/v2": 100})
    report = build_report(Window(600 * 3600.0, 3600, 0, buckets), window_s=600 * 3600.0, label_delay_s=0.0)
    assert report["champion"] == "d:A/v2"
    by_challenger = {c["challenger"]: c for c in report["comparisons"]}
    retired = by_challenger["d:A/v1"]
    assert retired["p_value"] is None and retired["overlap_buckets"] == 0
    assert retired["verdict"].startswith("not compared")
    b = by_challenger["d:B/v2"]
    assert b["overlap_buckets"] == 300 and b["detection_difference"] == pytest.approx(0.0)
    assert b["challenger_frauds"] == 300 * 10 and b["champion_frauds"] == 300 * 90
    assert not b["verdict"].endswith(("better", "worse")), b["verdict"]


def test_a_quiet_hour_does_not_hand_the_champion_to_the_small_variant() -> None:
    hours = range(48)
    buckets = _hourly({"d:A/v1": [0.9] * 48, "d:B/v2": [0.9] * 48}, hours, {"d:A/v1": 90, "d:B/v2": 10})
    buckets["d:B/v2"][48] = {"n": 1, "f": 0}  # the newest hour so far: one decision, B's
    report = build_report(Window(48 * 3600.0 + 60, 3600, 0, buckets), window_s=28 * 86400, label_delay_s=0.0)
    assert report["champion"] == "d:A/v1"


def test_a_canary_ramp_makes_the_model_taking_the_traffic_the_champion() -> None:
    """Weights moved from 90/10 to 10/90 with both variants still deciding: the champion follows
    the traffic at once, not after half the window."""
    hours = range(600)
    buckets = _hourly({"d:A/v1": [0.9] * 600, "d:B/v2": [0.9] * 600}, hours, {"d:A/v1": 900, "d:B/v2": 100})
    for hour in range(590, 600):  # the last ten hours: swapped
        buckets["d:A/v1"][hour]["n"], buckets["d:B/v2"][hour]["n"] = 100, 900
    report = build_report(Window(600 * 3600.0, 3600, 0, buckets), window_s=600 * 3600.0, label_delay_s=0.0)
    assert report["champion"] == "d:B/v2"
