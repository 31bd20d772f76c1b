"""Offline evaluation on held-out weeks, and ``fraudactors evaluate``.

Metrics (overall and per fraud scenario): AUC ROC, average precision, detection rate (recall) at
false-positive rate <= ``max_fpr`` (best threshold on the held-out ROC), the precision there, the
realized FPR / detection rate / precision at the model's own review and decline thresholds
(chosen at training time on earlier weeks, so these are honest out-of-time numbers), and the card
precision@100 per day (``metrics.card_precision_at_k``).

``fraudactors evaluate`` rebuilds, for each model, transactions it was never fit or calibrated on
(:mod:`.evalset`: the weeks after its training data for a refit model, the time split's held-out
weeks otherwise; the simulator from its metadata, or ``--data FILE``), scores them with the
committed ONNX files through the same registry and scorer the engine uses, and prints Markdown
tables: one row per version and one per version's fallback (``v1-fallback``, degraded mode), per
scenario, the card precision@100 per day, what each ``decision.degraded_policy`` would do if every
held-out transaction were decided degraded, and the time-split evaluation recorded at training.
``--models`` may be given several times to compare model directories.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.modeling.metrics import CALIBRATION_EDGES, evaluate_scores
from fraudactors.modeling.policy import DegradedPolicy

HELP = "evaluate committed models on their held-out weeks (AUC, AP, detection rate at FPR <= 2%, per scenario)"


# ---------------------------------------------------------------------- tables


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def calibration_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Per model, each probability bin's fraud rate against its mean probability (rows in the bin)."""
    edges = CALIBRATION_EDGES
    names = [f"[{edges[k]:g}, {edges[k + 1]:g}{']' if k == len(edges) - 2 else ')'}" for k in range(len(edges) - 1)]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for version, r in results.items():
        cal = r["metrics"].get("calibration")
        if cal is None:
            continue
        by_range = {tuple(b["range"]): b for b in cal["bins"]}
        cells = []
        for k in range(len(edges) - 1):
            b = by_range.get((edges[k], edges[k + 1]))
            cells.append("-" if b is None else
                         f"{_pct(b['fraud_rate'], 2)} vs {_pct(b['mean_probability'], 2)} ({b['rows']:,})")
        lines.append(f"| {version} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Overall table then per-scenario table, one row per model version."""
    lines = [
        "| model | test tx | frauds | AUC ROC | avg precision | detection @ FPR<=2% | precision there "
        "| review thr: detection / FPR / precision | decline thr: detection / FPR / precision "
        "| card precision@100 per day (best possible) | mean probability / fraud rate, ECE |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for version, r in results.items():
        m = r["metrics"]
        ops = []
        for name in ("review", "decline"):
            op = m["at_thresholds"].get(name)
            ops.append("-" if op is None else
                       f"{_pct(op['detection_rate'])} / {_pct(op['fpr'])} / {_pct(op['precision'])}")
        card = m.get("card_precision_at_100")
        cards = "-" if card is None else f"{_pct(card['mean'])} ({_pct(card['best_possible_mean'])})"
        cal = m.get("calibration")  # absent from the metrics of models trained before it was measured
        calibrated = "-" if cal is None else (f"{_pct(cal['mean_probability'], 2)} / {_pct(cal['fraud_rate'], 2)}, "
                                              f"{_f(cal['ece'], 4)}")
        lines.append(
            f"| {version} ({r.get('algo', '?')}) | {m['transactions']:,} | {m['frauds']:,} | {_f(m['auc'], 4)} "
            f"| {_f(m['average_precision'])} | {_pct(m['at_max_fpr']['detection_rate'])} "
            f"| {_pct(m['at_max_fpr']['precision'])} | {ops[0]} | {ops[1]} | {cards} | {calibrated} |")
    scenarios = sorted({s for r in results.values() for s in r["metrics"]["per_scenario"]})
    lines += ["", "Per scenario (that scenario's frauds against all legitimate transactions; detection at the "
              "overall FPR<=2% threshold):", "",
              "| model | scenario | frauds | AUC ROC | avg precision | detection @ FPR<=2% | detection @ review thr |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for version, r in results.items():
        for name in scenarios:
            p = r["metrics"]["per_scenario"].get(name)
            if p is None:
                continue
            lines.append(f"| {version} | {name} | {p['frauds']:,} | {_f(p['auc'], 4)} | {_f(p['average_precision'])} "
                         f"| {_pct(p['detection_rate_at_max_fpr'])} | {_pct(p['at_thresholds'].get('review'))} |")
    return "\n".join(lines)


def policy_metrics(y: np.ndarray, probs: np.ndarray, amounts: np.ndarray, review: float, decline: float,
                   policy: DegradedPolicy, is_fraud_decisions: tuple[str, ...] = ("review", "decline")
                   ) -> dict[str, Any]:
    """Detection, FPR, precision, the share of fraud amount caught and the share of all transactions
    flagged, if a fallback scoring ``probs`` decided every row in degraded mode under ``policy``."""
    y = np.asarray(y, dtype=bool)
    base = np.where(probs >= decline, "decline", np.where(probs >= review, "review", "approve"))
    decisions = [policy.apply(d, a) for d, a in zip(base.tolist(), amounts.tolist(), strict=True)]
    flagged = np.isin(np.asarray(decisions), is_fraud_decisions)
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    pos, neg = int(y.sum()), int((~y).sum())
    fraud_amount = float(amounts[y].sum())
    return {
        "policy": policy.label,
        "detection_rate": tp / pos if pos else None,
        "fpr": fp / neg if neg else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "fraud_amount_caught": float(amounts[flagged & y].sum()) / fraud_amount if fraud_amount else None,
        "flagged_share": float(flagged.mean()) if flagged.size else None,
    }


def policy_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["Degraded mode: each `decision.degraded_policy` if every held-out transaction were decided by the "
             "fallback (is_fraud = review or decline):", "",
             "| fallback | policy | detection | FPR | precision | fraud amount caught | flagged |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for version, r in results.items():
        for m in r.get("policies", ()):
            lines.append(f"| {version} | {m['policy']} | {_pct(m['detection_rate'])} | {_pct(m['fpr'])} "
                         f"| {_pct(m['precision'])} | {_pct(m['fraud_amount_caught'])} | {_pct(m['flagged_share'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", action="append", metavar="DIR",
                   help="models directory (default: models); give it again to compare directories")
    p.add_argument("--versions", default="v1,v2", help="comma-separated model versions (default: v1,v2)")
    p.add_argument("--data", metavar="FILE",
                   help="the CSV/Parquet file to evaluate on: the one the models were trained on (models shipped "
                        "with --no-refit), or one with later transactions (default: the simulator, from metadata)")
    p.add_argument("--approve-below", default="20", metavar="AMOUNT[,AMOUNT...]",
                   help="amounts for the degraded policy approve-below rows (default: 20)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def main(args: argparse.Namespace) -> int:
    from fraudactors.errors import ConfigError
    from fraudactors.features.definition import FEATURE_INDEX
    from fraudactors.modeling.evalset import EvalSet, evaluation_key, evaluation_set
    from fraudactors.modeling.metrics import card_precision_at_k
    from fraudactors.modeling.registry import load_model_info
    from fraudactors.modeling.scorer import Scorer

    try:
        below = [float(a) for a in args.approve_below.split(",") if a.strip()]
    except ValueError:
        raise ConfigError("--approve-below", f"must be amounts separated by commas, got {args.approve_below!r}") from None
    if any(not 0 < a <= 1e9 for a in below):
        raise ConfigError("--approve-below", "amounts must be in (0, 1e9]")
    policies = [DegradedPolicy("score"), DegradedPolicy("review"), *(DegradedPolicy("approve-below", a) for a in below)]
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    directories = args.models or ["models"]
    cache: dict[str, EvalSet] = {}
    results: dict[str, dict[str, Any]] = {}
    fallbacks: dict[str, dict[str, Any]] = {}
    recorded: dict[str, dict[str, Any]] = {}
    for directory in directories:
        infos = [load_model_info(directory, v) for v in versions]
        scorer = Scorer(infos)
        for info in infos:
            label = info.version if len(directories) == 1 else f"{directory}:{info.version}"
            key = evaluation_key(info.metadata)
            if key not in cache:
                cache[key] = evaluation_set(info.metadata, data_path=args.data, show_progress=not args.quiet)
            rows = cache[key]
            probs = scorer.predict_proba(info.version, rows.X)
            thresholds = {"review": info.review_threshold, "decline": info.decline_threshold}
            results[label] = {"algo": info.metadata.get("algo"), "window": rows.window,
                              "metrics": evaluate_scores(rows.is_fraud, probs, rows.scenario, thresholds,
                                                         cards=rows.cards, days=rows.days),
                              "card_precision_per_day": card_precision_at_k(rows.cards, rows.days, rows.is_fraud,
                                                                            probs)["per_day"]}
            if (info.metadata.get("final_fit") or {}).get("refit"):
                recorded[label] = {"algo": info.metadata.get("algo"), "metrics": info.metadata["metrics"]["test"]}
            fb = info.fallback
            if fb is None:
                continue
            probs = scorer.predict_proba(fb.version, rows.X)
            amounts = rows.X[:, FEATURE_INDEX["amount"]]
            fallbacks[label[: -len(info.version)] + fb.version] = {
                "algo": info.metadata.get("algo"), "window": rows.window,
                "metrics": evaluate_scores(rows.is_fraud, probs, rows.scenario, {"review": fb.review_threshold,
                                                                                  "decline": fb.decline_threshold},
                                           cards=rows.cards, days=rows.days),
                "policies": [policy_metrics(rows.is_fraud, probs, amounts, fb.review_threshold, fb.decline_threshold,
                                            policy) for policy in policies]}
    results.update(fallbacks)
    windows: dict[str, list[str]] = {}
    for label, r in results.items():
        windows.setdefault(r["window"], []).append(label)
    for window, labels in windows.items():
        print(f"{', '.join(labels)}: scored by the committed ONNX files on {window}")
    print()
    print(markdown_table(results))
    print()
    print("Calibration: per probability bin, the fraud rate against the mean probability (rows); a calibrated "
          "model's two are equal:")
    print()
    print(calibration_table(results))
    if fallbacks:
        print()
        print(policy_table(fallbacks))
    if recorded:
        print()
        print("Recorded at training (metadata.json 'metrics'): the time split's held-out weeks, scored by a model "
              "with the same algorithm, hyperparameters and seed fit before them:")
        print()
        print(markdown_table(recorded))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0
