"""Offline metrics of fraud scores: thresholds for a target false-positive rate, and the
detection rate, FPR and precision at them, overall and per fraud scenario.

Shared by training (:mod:`.pipeline`: calibration and the metrics in ``metadata.json``) and
``fraudactors evaluate`` (:mod:`.evaluate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

MAX_FPR = 0.02


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else None


def _ap(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s)) if 0 < y.sum() < y.size else None


def threshold_for_fpr(neg_scores: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold (``score >= t`` flags) whose FPR on ``neg_scores`` is <= ``max_fpr``.

    Thresholds are float32 values (the ONNX model outputs float32), so comparing a float32 score
    promoted to float64 against the threshold gives the same answer as in float32.
    """
    neg = np.sort(np.asarray(neg_scores, dtype=np.float32))[::-1]
    if neg.size == 0:
        return 0.5
    k = int(np.floor(max_fpr * neg.size + 1e-9))  # at most k legit may score >= t
    if k >= neg.size:
        return 0.0
    # Just above the (k+1)-th highest legit score: the k above it are the only ones flagged.
    return float(np.nextafter(neg[k], np.float32(np.inf)))


def at_threshold(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float | None]:
    flagged = s >= threshold
    pos, neg = y.sum(), (~y).sum()
    tp = int((flagged & y).sum())
    fp = int((flagged & ~y).sum())
    return {
        "threshold": threshold,
        "detection_rate": tp / pos if pos else None,
        "fpr": fp / neg if neg else None,
        "precision": tp / (tp + fp) if tp + fp else None,
    }


def evaluate_scores(y: np.ndarray, scores: np.ndarray, scenario: np.ndarray,
                    thresholds: Mapping[str, float] | None = None, max_fpr: float = MAX_FPR) -> dict[str, Any]:
    """Overall and per-scenario metrics of ``scores`` (higher = more likely fraud)."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    legit = ~y
    best = threshold_for_fpr(s[legit], max_fpr)
    out: dict[str, Any] = {
        "transactions": int(y.size),
        "frauds": int(y.sum()),
        "auc": _auc(y, s),
        "average_precision": _ap(y, s),
        "max_fpr": max_fpr,
        "at_max_fpr": at_threshold(y, s, best),
        "at_thresholds": {name: at_threshold(y, s, t) for name, t in (thresholds or {}).items()},
        "per_scenario": {},
    }
    for name in sorted({str(x) for x in np.unique(scenario[y])}):
        sel = (scenario == name) & y
        mask = sel | legit  # this scenario's frauds against all legitimate transactions
        ys, ss = y[mask], s[mask]
        out["per_scenario"][name] = {
            "frauds": int(sel.sum()),
            "auc": _auc(ys, ss),
            "average_precision": _ap(ys, ss),
            "detection_rate_at_max_fpr": float((s[sel] >= best).mean()),
            "at_thresholds": {k: float((s[sel] >= t).mean()) for k, t in (thresholds or {}).items()},
        }
    return out
