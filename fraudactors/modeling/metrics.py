"""Offline metrics of fraud scores: thresholds for a target false-positive rate, and the
detection rate, FPR and precision at them, overall and per fraud scenario; card precision@k per day;
how well the scores are calibrated as probabilities.

Shared by training (:mod:`.pipeline`: calibration and the metrics in ``metadata.json``) and
``fraudactors evaluate`` (:mod:`.evaluate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

MAX_FPR = 0.02
CARD_K = 100  # cards an investigation team checks per day
# Probability bins of the calibration table: most transactions score near 0, so the low end is finer.
CALIBRATION_EDGES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


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


def calibration(y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """How far ``probs`` are from the fraud rate they claim: the Brier score, the mean probability
    against the fraud rate, and per bin of ``CALIBRATION_EDGES`` (the last bin includes 1) the rows,
    their mean probability and their fraud rate; ``ece`` (expected calibration error) is the
    row-weighted mean of |mean probability - fraud rate| over the bins."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    bins: list[dict[str, Any]] = []
    ece = 0.0
    which = np.clip(np.searchsorted(CALIBRATION_EDGES, p, side="right") - 1, 0, len(CALIBRATION_EDGES) - 2)
    for k in range(len(CALIBRATION_EDGES) - 1):
        sel = which == k
        rows = int(sel.sum())
        if not rows:
            continue
        mean_p, rate = float(p[sel].mean()), float(y[sel].mean())
        ece += rows * abs(mean_p - rate)
        bins.append({"range": [CALIBRATION_EDGES[k], CALIBRATION_EDGES[k + 1]], "rows": rows,
                     "mean_probability": mean_p, "fraud_rate": rate})
    return {"brier": float(np.mean((p - y) ** 2)) if y.size else None,
            "mean_probability": float(p.mean()) if y.size else None,
            "fraud_rate": float(y.mean()) if y.size else None,
            "ece": ece / y.size if y.size else None, "bins": bins}


def evaluate_scores(y: np.ndarray, scores: np.ndarray, scenario: np.ndarray,
                    thresholds: Mapping[str, float] | None = None, max_fpr: float = MAX_FPR,
                    cards: np.ndarray | None = None, days: np.ndarray | None = None) -> dict[str, Any]:
    """Overall and per-scenario metrics of ``scores`` (higher = more likely fraud); with ``cards``
    and ``days`` (card id and day number of each row), also the card precision@100 per day
    (:func:`card_precision_at_k`, without the per-day values)."""
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
        "calibration": calibration(y, s),
        "per_scenario": {},
    }
    if cards is not None and days is not None:
        card_precision = card_precision_at_k(cards, days, y, s, CARD_K)
        card_precision.pop("per_day")
        out["card_precision_at_100"] = card_precision
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


def card_precision_at_k(cards: np.ndarray, days: np.ndarray, y: np.ndarray, scores: np.ndarray,
                        k: int = 100) -> dict[str, Any]:
    """Card precision@k per day, as an investigation team works a daily queue of ``k`` cards.

    Each day, every card gets its highest score of the day; among the cards not already caught on
    an earlier day, the ``k`` with the highest are checked, and the precision is the share of them
    that are truly compromised (at least one fraud that day). Those become caught and leave the
    later days' queues. Returns the mean over days, the best a perfect ranking could do (the mean
    of ``min(k, compromised cards not yet caught) / k``) and the per-day values.
    """
    y = np.asarray(y, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    caught: set[str] = set()
    per_day: list[dict[str, Any]] = []
    for day in np.unique(days):
        sel = days == day
        ids, inverse = np.unique(cards[sel], return_inverse=True)
        best = np.full(ids.size, -np.inf)
        np.maximum.at(best, inverse, s[sel])
        compromised = np.zeros(ids.size, dtype=bool)
        np.logical_or.at(compromised, inverse, y[sel])
        open_ = np.array([card not in caught for card in ids.tolist()], dtype=bool)
        ids, best, compromised = ids[open_], best[open_], compromised[open_]
        top = np.argsort(-best, kind="stable")[:k]
        hits = compromised[top]
        caught.update(ids[top][hits].tolist())
        per_day.append({"day": int(day), "cards": int(ids.size), "compromised": int(compromised.sum()),
                        "precision": float(hits.sum()) / k, "best_possible": min(k, int(compromised.sum())) / k})
    return {
        "k": k,
        "days": len(per_day),
        "mean": float(np.mean([d["precision"] for d in per_day])) if per_day else None,
        "best_possible_mean": float(np.mean([d["best_possible"] for d in per_day])) if per_day else None,
        "per_day": per_day,
    }
