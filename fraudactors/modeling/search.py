"""A time-series cross-validated hyperparameter search (``fraudactors train --search``).

Only the data before the time split's cut-off is used, with the labels known at the cut-off, so
the held-out weeks stay unseen. The validation windows are the last ``n_folds`` weeks before the
cut-off's label delay (``gap_days``), whose labels are mostly in by the cut-off::

    | warm-up | fit ................. | gap | validation k |     ...     | gap | cut-off -> test
                                      ^ fold k's notional training day

Each fold's model is fit on the rows from the end of the warm-up to ``gap_days`` before its
validation window, with the labels reported by the start of that window (the last ``gap_days``
before it are left out, as the final refit leaves them out), so no label crosses the label delay
into a fit. A configuration's score is its mean detection rate at FPR <= 2 % over the folds
(average precision breaks ties); every result is recorded in the metadata.
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

FOLD_DAYS = 7.0
N_FOLDS = 2
GRIDS: dict[str, dict[str, Sequence[Any]]] = {
    "rf": {"max_depth": (10, 12, 16), "min_samples_leaf": (10, 20, 50), "max_features": ("sqrt", 0.3)},
    "hgb": {"learning_rate": (0.05, 0.1), "max_leaf_nodes": (15, 31, 63), "min_samples_leaf": (50, 100, 200)},
}


@dataclass(frozen=True)
class Fold:
    fit: np.ndarray
    validation: np.ndarray
    labels_at: float  # the fold's notional training day: its fit uses the labels reported by then


def folds(ds: Dataset, split: Split, cfg: SplitConfig, n_folds: int = N_FOLDS,
          fold_days: float = FOLD_DAYS) -> list[Fold]:
    """The validation folds before the time split's cut-off (module doc), oldest first."""
    times = ds.event_time
    fit_start = float(times[0]) + cfg.warmup_days * DAY_S
    end = split.cutoff - cfg.gap_days * DAY_S
    out: list[Fold] = []
    for k in range(n_folds, 0, -1):
        v_start = end - k * fold_days * DAY_S
        fit_end = v_start - cfg.gap_days * DAY_S
        if fit_end - fit_start < fold_days * DAY_S:
            raise DataError(f"the data before the cut-off is too short for {n_folds} validation weeks "
                            f"with {fold_days:g}-day fits; train without --search")
        out.append(Fold(fit=np.flatnonzero((times >= fit_start) & (times < fit_end)),
                        validation=np.flatnonzero((times >= v_start) & (times < v_start + fold_days * DAY_S)),
                        labels_at=v_start))
    return out


def grid(algo: str) -> list[dict[str, Any]]:
    names = list(GRIDS[algo])
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*GRIDS[algo].values())]


def search(ds: Dataset, X: np.ndarray, split: Split, cfg: SplitConfig, algo: str, seed: int,
           legit_fraction: float, feature_names: Sequence[str], show_progress: bool = True
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(best hyperparameters, the record of the search for the metadata)``."""
    from fraudactors.modeling.pipeline import fit_model, single_threaded_openmp
    from fraudactors.modeling.split import known_labels

    chosen = folds(ds, split, cfg)
    truth = known_labels(ds, split.cutoff)  # validation: what is known at the cut-off, no later
    results: list[dict[str, Any]] = []
    for params in grid(algo):
        s = step(f"search {algo} {params}", show_progress)
        detections: list[float] = []
        precisions: list[float] = []
        for fold in chosen:
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
    best = max(results, key=lambda r: (r["mean_detection"], r["mean_average_precision"]))
    record = {
        "method": "time-series cross-validation before the cut-off: per fold, fit up to gap_days before a "
                  "validation week with the labels reported by its start; score = mean detection at FPR <= 2%",
        "folds": [{"fit": [iso(float(ds.event_time[f.fit[0]])), iso(f.labels_at - cfg.gap_days * DAY_S)],
                   "validation": [iso(f.labels_at), iso(f.labels_at + FOLD_DAYS * DAY_S)]} for f in chosen],
        "grid": {k: list(v) for k, v in GRIDS[algo].items()},
        "results": results,
        "best": best["params"],
    }
    return dict(best["params"]), record


def describe(record: Mapping[str, Any]) -> str:
    best = next(r for r in record["results"] if r["params"] == record["best"])
    return f"best {record['best']}: mean detection {best['mean_detection']:.4f} over {len(record['folds'])} folds"
