"""A time-series cross-validated hyperparameter search (``fraudactors train --search``).

Only the data before the time split's cut-off is used, with the labels known at the cut-off, so
the held-out weeks stay unseen. The validation windows are the last ``n_folds`` windows of
``fold_days`` before the cut-off's label delay (``gap_days``), whose labels are mostly in by the
cut-off::

    | warm-up | fit ................. | gap | validation k |     ...     | gap | cut-off -> test
                                      ^ fold k's notional training day

Each fold's model is fit on the rows from the end of the warm-up to ``gap_days`` before its
validation window, with the labels reported by the start of that window (the last ``gap_days``
before it are left out, as the final refit leaves them out), so no label crosses the label delay
into a fit. A configuration's score is its mean detection rate at FPR <= 2 % over the folds
(average precision breaks ties); every result is recorded in the metadata.

The built-in hyperparameters are replaced only by a configuration that detects more than they do
in **every** fold: a gain the folds do not agree on is within a window's own noise (a window moves
the detection rate by a point or more), and a search that follows it changes the shipped model for
nothing. ``train``'s defaults, three folds of 12 days, validate on 36 days of the 91-day simulated data
(the oldest fold fits on 20).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fraudactors.modeling.data import DAY_S, DataError, Dataset
from fraudactors.modeling.metrics import evaluate_scores
from fraudactors.modeling.progress import step
from fraudactors.modeling.split import Split, SplitConfig, iso

GRIDS: dict[str, dict[str, Sequence[Any]]] = {
    "rf": {"max_depth": (10, 12, 16), "min_samples_leaf": (10, 20, 50), "max_features": ("sqrt", 0.3)},
    "hgb": {"learning_rate": (0.05, 0.1), "max_leaf_nodes": (15, 31, 63), "min_samples_leaf": (50, 100, 200)},
}


@dataclass(frozen=True)
class Fold:
    fit: np.ndarray
    validation: np.ndarray
    labels_at: float  # the fold's notional training day: its fit uses the labels reported by then


def folds(ds: Dataset, split: Split, cfg: SplitConfig, n_folds: int, fold_days: float) -> list[Fold]:
    """The validation folds before the time split's cut-off (module doc), oldest first."""
    times = ds.event_time
    fit_start = float(times[0]) + cfg.warmup_days * DAY_S
    end = split.cutoff - cfg.gap_days * DAY_S
    out: list[Fold] = []
    for k in range(n_folds, 0, -1):
        v_start = end - k * fold_days * DAY_S
        fit_end = v_start - cfg.gap_days * DAY_S
        if fit_end - fit_start < fold_days * DAY_S:
            raise DataError(f"the data before the cut-off is too short for {n_folds} validation windows "
                            f"of {fold_days:g} days, each with at least as many days of fit before it; "
                            "fewer or shorter folds (--search-folds, --search-fold-days), or train without --search")
        out.append(Fold(fit=np.flatnonzero((times >= fit_start) & (times < fit_end)),
                        validation=np.flatnonzero((times >= v_start) & (times < v_start + fold_days * DAY_S)),
                        labels_at=v_start))
    return out


def grid(algo: str) -> list[dict[str, Any]]:
    names = list(GRIDS[algo])
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*GRIDS[algo].values())]


def built_in(algo: str) -> dict[str, Any] | None:
    """The built-in hyperparameters of ``algo`` the grid varies (None: it has none of its own)."""
    from fraudactors.modeling.pipeline import HYPERPARAMETERS

    own = HYPERPARAMETERS.get(algo, {})
    if not all(name in own for name in GRIDS[algo]):
        return None
    return {name: own[name] for name in GRIDS[algo]}


def best_mean(results: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The result with the best mean detection (average precision breaks ties)."""
    return max(results, key=lambda r: (r["mean_detection"], r["mean_average_precision"]))


def choose(results: Sequence[Mapping[str, Any]], incumbent: Mapping[str, Any] | None
           ) -> tuple[Mapping[str, Any], str]:
    """``(the chosen result, why)``: the best mean detection if it beats ``incumbent``'s result in
    every fold; otherwise the incumbent (module doc)."""
    best = best_mean(results)
    if incumbent is None:
        return best, "best mean detection (no built-in hyperparameters to keep)"
    kept = next(r for r in results if r["params"] == incumbent)
    if best is kept:
        return kept, "the built-in hyperparameters have the best mean detection"
    pairs = zip(best["detection_at_max_fpr"], kept["detection_at_max_fpr"], strict=True)
    if all(b > k for b, k in pairs):
        return best, "the best mean detection beats the built-in hyperparameters in every fold"
    return kept, "built-in kept: the best mean detection does not beat them in every fold"


def search(ds: Dataset, X: np.ndarray, split: Split, cfg: SplitConfig, algo: str, seed: int,
           legit_fraction: float, feature_names: Sequence[str], n_folds: int, fold_days: float,
           show_progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(chosen hyperparameters, the record of the search for the metadata)``."""
    from fraudactors.modeling.pipeline import fit_model, single_threaded_openmp
    from fraudactors.modeling.split import known_labels

    chosen_folds = folds(ds, split, cfg, n_folds, fold_days)
    truth = known_labels(ds, split.cutoff)  # validation: what is known at the cut-off, no later
    incumbent = built_in(algo)
    configurations = grid(algo)
    if incumbent is not None and incumbent not in configurations:
        configurations.insert(0, incumbent)
    results: list[dict[str, Any]] = []
    for params in configurations:
        s = step(f"search {algo} {params}", show_progress)
        detections: list[float] = []
        precisions: list[float] = []
        for fold in chosen_folds:
            y_fit = known_labels(ds, fold.labels_at)[fold.fit]
            model = fit_model(algo, seed, X[fold.fit], y_fit, legit_fraction, feature_names, params)
            with single_threaded_openmp():
                scores = model.predict_proba(X[fold.validation])[:, 1]
            m = evaluate_scores(truth[fold.validation], scores, ds.scenario[fold.validation])
            detections.append(float(m["at_max_fpr"]["detection_rate"] or 0.0))
            precisions.append(float(m["average_precision"] or 0.0))
        results.append({"params": params, "detection_at_max_fpr": detections, "average_precision": precisions,
                        "mean_detection": float(np.mean(detections)), "mean_average_precision": float(np.mean(precisions))})
        s.done(f"detection {np.mean(detections):.4f} (folds {', '.join(f'{d:.4f}' for d in detections)})")
    best, why = choose(results, incumbent)
    record = {
        "method": "time-series cross-validation before the cut-off: per fold, fit up to gap_days before a "
                  "validation window with the labels reported by its start; score = mean detection at FPR <= 2%; "
                  "the built-in hyperparameters are replaced only by a configuration better in every fold",
        "folds": [{"fit": [iso(float(ds.event_time[f.fit[0]])), iso(f.labels_at - cfg.gap_days * DAY_S)],
                   "validation": [iso(f.labels_at), iso(f.labels_at + fold_days * DAY_S)],
                   "frauds": int(truth[f.validation].sum())} for f in chosen_folds],
        "grid": {k: list(v) for k, v in GRIDS[algo].items()},
        "results": results,
        "built_in": incumbent,
        "best_mean": best_mean(results)["params"],
        "best": best["params"],
        "choice": why,
    }
    return dict(best["params"]), record


def describe(record: Mapping[str, Any]) -> str:
    best = next(r for r in record["results"] if r["params"] == record["best"])
    return (f"chose {record['best']}: mean detection {best['mean_detection']:.4f} over {len(record['folds'])} "
            f"folds ({record['choice']})")
