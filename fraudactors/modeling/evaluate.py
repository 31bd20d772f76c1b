"""Offline evaluation on held-out weeks, and ``fraudactors evaluate``.

Metrics (overall and per fraud scenario): AUC ROC, average precision, detection rate (recall) at
false-positive rate <= ``max_fpr`` (best threshold on the held-out ROC), the precision there, and
the realized FPR / detection rate / precision at the model's own review and decline thresholds
(chosen at training time on an earlier calibration week, so these are honest out-of-time numbers).

``fraudactors evaluate`` re-creates each model's held-out weeks from its metadata (the simulator's
seed and size, or ``--data FILE`` for a model trained on a file), scores them with the committed
ONNX files through the same registry and scorer the engine uses, and prints a Markdown table: one
row per version and one per version's fallback (``v1-fallback``, degraded mode), then what each
``decision.degraded_policy`` would do if every held-out transaction were decided degraded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.modeling.metrics import evaluate_scores
from fraudactors.modeling.policy import DegradedPolicy

HELP = "evaluate committed models on their held-out weeks (AUC, AP, detection rate at FPR <= 2%, per scenario)"


# ---------------------------------------------------------------------- tables


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Overall table then per-scenario table, one row per model version."""
    lines = [
        "| model | test tx | frauds | AUC ROC | avg precision | detection @ FPR<=2% | precision there "
        "| review thr: detection / FPR / precision | decline thr: detection / FPR / precision |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for version, r in results.items():
        m = r["metrics"]
        ops = []
        for name in ("review", "decline"):
            op = m["at_thresholds"].get(name)
            ops.append("-" if op is None else
                       f"{_pct(op['detection_rate'])} / {_pct(op['fpr'])} / {_pct(op['precision'])}")
        lines.append(
            f"| {version} ({r.get('algo', '?')}) | {m['transactions']:,} | {m['frauds']:,} | {_f(m['auc'], 4)} "
            f"| {_f(m['average_precision'])} | {_pct(m['at_max_fpr']['detection_rate'])} "
            f"| {_pct(m['at_max_fpr']['precision'])} | {ops[0]} | {ops[1]} |")
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
    p.add_argument("--models", default="models", metavar="DIR", help="models directory (default: models)")
    p.add_argument("--versions", default="v1,v2", help="comma-separated model versions (default: v1,v2)")
    p.add_argument("--data", metavar="FILE",
                   help="the CSV/Parquet file the models were trained on (default: the simulator, from metadata)")
    p.add_argument("--approve-below", default="20", metavar="AMOUNT[,AMOUNT...]",
                   help="amounts for the degraded policy approve-below rows (default: 20)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def main(args: argparse.Namespace) -> int:
    from fraudactors.errors import ConfigError, ModelError
    from fraudactors.features.definition import FEATURE_INDEX
    from fraudactors.modeling.pipeline import held_out_set
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
    infos = [load_model_info(args.models, v) for v in versions]
    scorer = Scorer(infos)
    cache: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    fallbacks: dict[str, dict[str, Any]] = {}
    for info in infos:
        training = info.metadata.get("training")
        if not isinstance(training, dict):
            raise ModelError(f"model {info.version}: metadata.json has no 'training' section to rebuild the test set")
        key = json.dumps({k: training.get(k) for k in ("data", "split")}, sort_keys=True)
        if key not in cache:
            cache[key] = held_out_set(training, data_path=args.data, show_progress=not args.quiet)
        X, y, scenario = cache[key]
        probs = scorer.predict_proba(info.version, X)
        thresholds = {"review": info.review_threshold, "decline": info.decline_threshold}
        results[info.version] = {"algo": info.metadata.get("algo"),
                                 "metrics": evaluate_scores(y, probs, scenario, thresholds)}
        fb = info.fallback
        if fb is None:
            continue
        probs = scorer.predict_proba(fb.version, X)
        amounts = X[:, FEATURE_INDEX["amount"]]
        fallbacks[fb.version] = {
            "algo": info.metadata.get("algo"),
            "metrics": evaluate_scores(y, probs, scenario, {"review": fb.review_threshold,
                                                            "decline": fb.decline_threshold}),
            "policies": [policy_metrics(y, probs, amounts, fb.review_threshold, fb.decline_threshold, policy)
                         for policy in policies]}
    results.update(fallbacks)
    print(markdown_table(results))
    if fallbacks:
        print()
        print(policy_table(fallbacks))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0
