"""Per-model evidence over a window of event time, and champion/challenger verdicts.

Built from the ledger (:mod:`fraudactors.ab.ledger`). For every member (role, variant, model):
decisions, flagged rate, labelled frauds caught and missed, detection rate and precision at its
own thresholds, the false-positive rate (flagged transactions not labelled fraud, over those not
labelled fraud), the score distribution, each with its **label maturity**: the share of the
window's decisions older than ``ab.label_delay_s`` (whose labels should be in). A figure over
immature decisions is a lower bound for precision and noisy for detection; the report says so.

The *champion* is the deciding model (degraded fallbacks aside) taking the most traffic now: the
one with the most decisions in the newest buckets that together hold at least
``CHAMPION_RECENT_DECISIONS`` of the deciding models' decisions (ties: the most decisions in the
window). A model retired by a promotion, or turned down by a canary ramp, stops being the champion
as soon as the traffic has moved, and a quiet hour with one decision does not hand the role to a
10 % variant.

Every other non-fallback member is a challenger. A shadow challenger is compared on the same
transactions (McNemar); a deciding one on its own share of the traffic (two-proportion z) over
the buckets in which both decided, since models that ran at different times would show any change
in the traffic or in the labels' maturity as a difference between them. Two that never decided
in the same bucket are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fraudactors.ab.ledger import CARD_GROUPS, HIST_BINS, Window, parse_member
from fraudactors.ab.stats import TestResult, clustered_design_effect, mcnemar, two_proportions, wilson
from fraudactors.modeling.registry import FALLBACK_SUFFIX


@dataclass(slots=True)
class Evidence:
    """One member's totals over the window."""

    member: str
    role: str  # "deciding" | "shadow"
    variant: str
    model_version: str
    decisions: int = 0
    flagged: int = 0
    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0
    mature_decisions: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    pairs: dict[str, int] = field(default_factory=dict)  # p:<other>
    only_this: dict[str, int] = field(default_factory=dict)  # x:<other>
    # per card group (gc<k>, gm<k>, gx<k>:<other>)
    caught_by_group: list[int] = field(default_factory=lambda: [0] * CARD_GROUPS)
    missed_by_group: list[int] = field(default_factory=lambda: [0] * CARD_GROUPS)
    only_this_by_group: dict[str, list[int]] = field(default_factory=dict)

    @property
    def fallback(self) -> bool:
        return self.model_version.endswith(FALLBACK_SUFFIX)

    @property
    def frauds(self) -> int:
        return self.tp + self.fn

    @property
    def grouped(self) -> bool:
        """Every labelled fraud is in a card group (not so for buckets written before the groups)."""
        return sum(self.caught_by_group) == self.tp and sum(self.missed_by_group) == self.fn

    @property
    def detection_design_effect(self) -> float | None:
        """A card's frauds are caught or missed together: the detection rate's design effect
        clustered by card group (None: not every labelled fraud is in a group)."""
        if not self.grouped:
            return None
        return clustered_design_effect([(c, c + m) for c, m in zip(self.caught_by_group, self.missed_by_group,
                                                                   strict=True)])

    def only_this_grouped(self, other: str) -> list[int] | None:
        """The discordant pairs against ``other`` per card group, if every one is in a group."""
        counts = self.only_this_by_group.get(other, [0] * CARD_GROUPS)
        return counts if sum(counts) == self.only_this.get(other, 0) else None


def _rate(k: int, n: int) -> float | None:
    return k / n if n > 0 else None


def _quantile(histogram: list[int], q: float) -> float | None:
    total = sum(histogram)
    if total == 0:
        return None
    target, acc = q * total, 0
    for i, count in enumerate(histogram):
        acc += count
        if acc >= target:
            return (i + 1) / HIST_BINS  # the bin's upper edge
    return 1.0  # pragma: no cover


def gather(window: Window, label_delay_s: float) -> list[Evidence]:
    """Sum each member's buckets; maturity from the ledger's clock."""
    return [_evidence(window, name, label_delay_s) for name in sorted(window.buckets)]


def _deciding_buckets(window: Window, name: str) -> set[int]:
    return {bucket for bucket, fields in window.buckets.get(name, {}).items() if fields.get("n", 0) > 0}


def _evidence(window: Window, name: str, label_delay_s: float, only: set[int] | None = None) -> Evidence:
    """One member's totals over its buckets (``only``: over these of them)."""
    mature_before = None if window.newest is None else window.newest - label_delay_s
    role, variant, model = parse_member(name)
    ev = Evidence(name, "shadow" if role == "s" else "deciding", variant, model)
    for bucket, fields in window.buckets[name].items():
        if only is not None and bucket not in only:
            continue
        n = fields.get("n", 0)
        ev.decisions += n
        ev.flagged += fields.get("f", 0)
        ev.tp += fields.get("tp", 0)
        ev.fn += fields.get("fn", 0)
        ev.fp += fields.get("fp", 0)
        ev.tn += fields.get("tn", 0)
        if mature_before is not None and (bucket + 1) * window.bucket_s <= mature_before:
            ev.mature_decisions += n
        for i in range(HIST_BINS):
            ev.histogram[i] += fields.get(f"h{i}", 0)
        for key, value in fields.items():
            if key.startswith("p:"):
                ev.pairs[key[2:]] = ev.pairs.get(key[2:], 0) + value
            elif key.startswith("x:"):
                ev.only_this[key[2:]] = ev.only_this.get(key[2:], 0) + value
            elif key.startswith("g"):
                _add_group_field(ev, key, value)
    _not_below_zero(ev)
    return ev


def _not_below_zero(ev: Evidence) -> None:
    """Counts the ledger took below zero count as none. A label's flip takes back the first
    verdict's counts; when that verdict was never counted (its decision was not matched yet, or
    left the window) the flip leaves a total below zero, which no test may read.

    A member whose card groups summed to its totals keeps them summing: the groups are floored
    and the totals rebuilt from them, so the clustered tests still apply (a total floored on its
    own would no longer match its groups, and the report would fall back to the independent
    test -- the over-confident one -- for a single stray flip)."""
    grouped = ev.grouped
    discordant_grouped = {other for other, column in ev.only_this_by_group.items()
                          if sum(column) == ev.only_this.get(other, 0)}
    for column in (ev.caught_by_group, ev.missed_by_group, *ev.only_this_by_group.values()):
        column[:] = [max(v, 0) for v in column]
    for name in ("decisions", "flagged", "tp", "fn", "fp", "tn", "mature_decisions"):
        setattr(ev, name, max(getattr(ev, name), 0))
    if grouped:
        ev.tp, ev.fn = sum(ev.caught_by_group), sum(ev.missed_by_group)
    ev.histogram = [max(v, 0) for v in ev.histogram]
    for counts in (ev.pairs, ev.only_this):
        for other, value in counts.items():
            counts[other] = max(value, 0)
    for other in discordant_grouped:
        ev.only_this[other] = sum(ev.only_this_by_group[other])


def _add_group_field(ev: Evidence, key: str, value: int) -> None:
    """Add a ``gc<k>`` / ``gm<k>`` / ``gx<k>:<other>`` field (others, and groups out of range, are ignored)."""
    kind, rest = key[:2], key[2:]
    group_text, _, other = rest.partition(":")
    if not group_text.isdigit() or int(group_text) >= CARD_GROUPS:
        return
    group = int(group_text)
    if kind == "gc" and not other:
        ev.caught_by_group[group] += value
    elif kind == "gm" and not other:
        ev.missed_by_group[group] += value
    elif kind == "gx" and other:
        ev.only_this_by_group.setdefault(other, [0] * CARD_GROUPS)[group] += value


def evidence_row(ev: Evidence, alpha: float) -> dict[str, Any]:
    """The JSON row of one member."""
    not_fraud = ev.decisions - ev.frauds
    false_positives = max(ev.flagged - ev.tp, 0)
    detection_effect = ev.detection_design_effect
    return {
        "member": ev.member, "variant": ev.variant, "model_version": ev.model_version, "role": ev.role,
        "decisions": ev.decisions, "flagged": ev.flagged, "flagged_rate": _rate(ev.flagged, ev.decisions),
        "frauds_caught": ev.tp, "frauds_missed": ev.fn, "labelled_legitimate": ev.fp + ev.tn,
        "detection_rate": _rate(ev.tp, ev.frauds),
        "detection_ci": wilson(ev.tp, ev.frauds, alpha, design_effect=detection_effect or 1.0),
        "detection_design_effect": detection_effect,
        "precision": _rate(ev.tp, ev.flagged), "precision_ci": wilson(ev.tp, ev.flagged, alpha),
        "false_positive_rate": _rate(false_positives, not_fraud),
        "false_positive_rate_ci": wilson(false_positives, not_fraud, alpha),
        "label_maturity": _rate(ev.mature_decisions, ev.decisions),
        "score": {"p50": _quantile(ev.histogram, 0.5), "p90": _quantile(ev.histogram, 0.9),
                  "p99": _quantile(ev.histogram, 0.99), "histogram": list(ev.histogram)},
    }


def _verdict(name: str, result: TestResult, flagged: TestResult | None, alpha: float) -> str:
    if result.p_value is None:
        return "no labelled frauds yet"
    if result.p_value >= alpha:
        more = f"~{result.more_needed:,}" if result.more_needed is not None else "more"
        return f"no difference detectable yet (need {more} more labelled frauds)"
    if result.difference > 0:
        if flagged is not None and flagged.p_value is not None and flagged.p_value < alpha \
                and flagged.difference > 0:
            return (f"no clear winner: {name} catches more frauds but also flags more transactions "
                    f"(+{flagged.difference * 100:.2f} points)")
        return f"{name} better"
    return f"{name} worse"


def compare(champion: Evidence, challenger: Evidence, *, alpha: float, power: float,
            min_effect: float) -> dict[str, Any]:
    """The champion/challenger row: the test, its p-value and the plain verdict."""
    flagged = two_proportions(champion.flagged, champion.decisions, challenger.flagged, challenger.decisions,
                              alpha=alpha, power=power, min_effect=min_effect)
    if challenger.role == "shadow":
        traffic = "identical"
        only_champion = champion.only_this.get(challenger.member, 0)
        only_challenger = challenger.only_this.get(champion.member, 0)
        paired = max(champion.pairs.get(challenger.member, 0), only_champion + only_challenger)
        b_groups = champion.only_this_grouped(challenger.member)
        c_groups = challenger.only_this_grouped(champion.member)
        result = mcnemar(only_champion, only_challenger, paired,
                         alpha=alpha, power=power, min_effect=min_effect,
                         groups=None if b_groups is None or c_groups is None else list(zip(b_groups, c_groups,
                                                                                             strict=True)))
        counts = {"paired_frauds": paired, "only_champion_caught": only_champion,
                  "only_challenger_caught": only_challenger}
    else:
        traffic = "split"
        groups = None
        if champion.grouped and challenger.grouped:
            groups = [(c1, c1 + m1, c2, c2 + m2) for c1, m1, c2, m2 in zip(
                champion.caught_by_group, champion.missed_by_group,
                challenger.caught_by_group, challenger.missed_by_group, strict=True)]
        result = two_proportions(champion.tp, champion.frauds, challenger.tp, challenger.frauds,
                                 alpha=alpha, power=power, min_effect=min_effect, groups=groups)
        counts = {"champion_frauds": champion.frauds, "challenger_frauds": challenger.frauds}
    return {
        "champion": champion.member, "challenger": challenger.member, "traffic": traffic,
        "test": result.test, "detection_difference": result.difference, "p_value": result.p_value,
        "design_effect": result.design_effect,
        "more_labelled_frauds_needed": result.more_needed,
        "flagged_rate_difference": flagged.difference, "flagged_rate_p_value": flagged.p_value,
        **counts, "verdict": _verdict(challenger.variant, result, flagged, alpha),
    }


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


# The champion is judged on the newest buckets that together hold at least this many decisions
# of the deciding models: the traffic now, and not one quiet hour's handful.
CHAMPION_RECENT_DECISIONS = 200


def _champion(window: Window, deciding: list[Evidence]) -> Evidence | None:
    """The deciding model taking the most traffic now (module docstring)."""
    if not deciding:
        return None
    counts = {ev.member: {b: n for b, f in window.buckets[ev.member].items() if (n := f.get("n", 0)) > 0}
              for ev in deciding}
    recent = dict.fromkeys(counts, 0)
    total = 0
    for bucket in sorted({b for per_bucket in counts.values() for b in per_bucket}, reverse=True):
        for member, per_bucket in counts.items():
            n = per_bucket.get(bucket, 0)
            recent[member] += n
            total += n
        if total >= CHAMPION_RECENT_DECISIONS:
            break
    return max(deciding, key=lambda ev: (recent[ev.member], ev.decisions, ev.member))


def _not_compared(champion: Evidence, challenger: Evidence) -> dict[str, Any]:
    return {
        "champion": champion.member, "challenger": challenger.member, "traffic": "split", "test": None,
        "detection_difference": None, "p_value": None, "design_effect": None, "more_labelled_frauds_needed": None,
        "flagged_rate_difference": None, "flagged_rate_p_value": None, "champion_frauds": 0, "challenger_frauds": 0,
        "overlap_buckets": 0,
        "verdict": "not compared: the two never decided in the same bucket of the window (one replaced the other)",
    }


def build_report(window: Window, *, window_s: float, label_delay_s: float, alpha: float = 0.05,
                 power: float = 0.8, min_effect: float = 0.01) -> dict[str, Any]:
    evidence = gather(window, label_delay_s)
    deciding = [ev for ev in evidence if ev.role == "deciding" and not ev.fallback]
    champion = _champion(window, deciding)
    comparisons = []
    if champion is not None:
        for ev in evidence:
            if ev is champion or ev.fallback:
                continue
            if ev.role == "shadow":  # the same transactions: paired, whenever each ran
                comparisons.append({**compare(champion, ev, alpha=alpha, power=power, min_effect=min_effect),
                                    "overlap_buckets": None})
                continue
            # Split traffic: only the buckets in which both decided, so that two models that ran at
            # different times (a promotion) are not told apart by what changed in between.
            common = _deciding_buckets(window, champion.member) & _deciding_buckets(window, ev.member)
            if not common:
                comparisons.append(_not_compared(champion, ev))
                continue
            both = (_evidence(window, champion.member, label_delay_s, common),
                    _evidence(window, ev.member, label_delay_s, common))
            comparisons.append({**compare(*both, alpha=alpha, power=power, min_effect=min_effect),
                                "overlap_buckets": len(common)})
    return {
        "window": {"from": _iso(None if window.newest is None else window.newest - window_s),
                   "to": _iso(window.newest), "window_s": window_s, "label_delay_s": label_delay_s,
                   "bucket_s": window.bucket_s, "alpha": alpha},
        "champion": None if champion is None else champion.member,
        "variants": [evidence_row(ev, alpha) for ev in evidence],
        "comparisons": comparisons,
    }


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f}%"


def _ci(ci: Any) -> str:
    return "" if not ci else f" [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table and one line per comparison."""
    w = report["window"]
    lines = [f"A/B evidence, event time {w['from'] or '-'} .. {w['to'] or '-'} "
             f"(label delay {w['label_delay_s'] / 86400:g} d; 95% intervals)"]
    if not report["variants"]:
        lines.append("  no decisions recorded yet")
        return "\n".join(lines)
    header = (f"  {'model':<22} {'role':<8} {'decisions':>10} {'flagged':>8} {'caught':>7} {'missed':>7} "
              f"{'detection':>22} {'precision':>22} {'FPR':>7} {'p50':>5} {'p99':>5} {'mature':>7}")
    lines.append(header)
    for row in report["variants"]:
        lines.append(
            f"  {row['variant'] + '/' + row['model_version']:<22} {row['role']:<8} {row['decisions']:>10,} "
            f"{_pct(row['flagged_rate']):>8} {row['frauds_caught']:>7,} {row['frauds_missed']:>7,} "
            f"{_pct(row['detection_rate']) + _ci(row['detection_ci']):>22} "
            f"{_pct(row['precision']) + _ci(row['precision_ci']):>22} "
            f"{_pct(row['false_positive_rate'], 2):>7} "
            f"{'-' if row['score']['p50'] is None else format(row['score']['p50'], '.2f'):>5} "
            f"{'-' if row['score']['p99'] is None else format(row['score']['p99'], '.2f'):>5} "
            f"{_pct(row['label_maturity'], 0):>7}")
    for c in report["comparisons"]:
        p = "-" if c["p_value"] is None else f"{c['p_value']:.3g}"
        challenger, champion = (name.partition(":")[2] for name in (c["challenger"], c["champion"]))
        if c["test"] is None:
            lines.append(f"  {challenger} vs {champion}: {c['verdict']}")
            continue
        effect = "" if c.get("design_effect") is None else f", design effect {c['design_effect']:.2f}"
        lines.append(f"  {challenger} vs {champion} ({c['traffic']} traffic, {c['test']}: "
                     f"detection {c['detection_difference'] * 100:+.2f} points, p={p}{effect}): {c['verdict']}")
    return "\n".join(lines)
