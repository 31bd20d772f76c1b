"""Reference distributions for the model monitor: what a model saw at training time.

Training writes them into ``metadata.json`` (section ``reference``); the engine's
:class:`~fraudactors.engine.monitor.ModelMonitor` bins live traffic on the same edges and exports
the population stability index (PSI) against the shares stored here.

Bins are quantile bins of the reference rows, right-closed: with sorted distinct inner edges
``e_1 < ... < e_k`` a value ``x`` falls into bin ``searchsorted(edges, x, side="left")``, i.e.
``(-inf, e_1], (e_1, e_2], ..., (e_k, inf)`` -- ``k + 1`` bins. Tied quantiles (discrete or
mostly-constant features) are deduplicated, so a 0/1 flag gets the bins ``<= 0`` and ``> 0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REFERENCE_BINS = 10
# A bin share below this counts as this much in the PSI (an empty bin would make it infinite).
PSI_EPSILON = 1e-4
# Rows sampled (deterministically) for the quantiles and the feature ranking.
_MAX_ROWS = 200_000
_RANK_ROWS = 20_000


def bin_edges(values: np.ndarray, bins: int = REFERENCE_BINS) -> np.ndarray:
    """Sorted distinct inner edges at the ``1/bins .. (bins-1)/bins`` quantiles of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(0)
    return np.unique(np.quantile(values, np.arange(1, bins) / bins))


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """How many of ``values`` fall into each of the ``len(edges) + 1`` bins."""
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=edges.size + 1)


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of the counts (or shares) ``actual`` against the shares ``expected``:
    ``sum((a - e) * ln(a / e))`` over the bins, each share floored at :data:`PSI_EPSILON`."""
    a = np.asarray(actual, dtype=np.float64)
    total = a.sum()
    if total <= 0:
        return 0.0
    a = np.maximum(a / total, PSI_EPSILON)
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def _histogram(values: np.ndarray, bins: int) -> dict[str, Any]:
    edges = bin_edges(values, bins)
    counts = bin_counts(values, edges)
    return {"edges": [float(x) for x in edges],
            "shares": [round(float(c) / max(int(counts.sum()), 1), 6) for c in counts]}


def _sample(rows: np.ndarray, limit: int) -> np.ndarray:
    if rows.size <= limit:
        return rows
    return rows[np.linspace(0, rows.size - 1, limit).astype(np.intp)]


def build_reference(X: np.ndarray, fit_rows: np.ndarray, names: Sequence[str], scores: np.ndarray,
                    contributions: np.ndarray | None, *, what: Mapping[str, str],
                    fallback_scores: np.ndarray | None = None, bins: int = REFERENCE_BINS) -> dict[str, Any]:
    """The ``reference`` section of a version's metadata.

    ``X[fit_rows]``: the feature rows the model was fit on (all of them, not the legit subsample);
    ``scores``: the shipped model's probabilities on its calibration rows (and ``fallback_scores``
    the fallback's); ``contributions``: path contributions of the model on some of those rows,
    ranking the features by mean absolute contribution (``top_features``, most important first)."""
    rows = _sample(np.asarray(fit_rows), _MAX_ROWS)
    Xr = np.asarray(X[rows], dtype=np.float64)
    features = {name: _histogram(Xr[:, j], bins) for j, name in enumerate(names)}
    if contributions is not None and contributions.size:
        importance = np.abs(contributions[:_RANK_ROWS]).mean(axis=0)
        order = [names[j] for j in np.argsort(-importance, kind="stable")]
    else:
        order = list(names)
    out: dict[str, Any] = {
        "bins": bins,
        "binning": "quantile bins, right-closed: bin = searchsorted(edges, x, side='left'); len(edges) + 1 bins",
        "features_on": what.get("features", ""),
        "score_on": what.get("score", ""),
        "feature_rows": int(rows.size),
        "score_rows": int(np.asarray(scores).size),
        "top_features": order,
        "features": features,
        "score": _histogram(np.asarray(scores), bins),
    }
    if fallback_scores is not None:
        out["fallback_score"] = _histogram(np.asarray(fallback_scores), bins)
    return out


@dataclass(frozen=True)
class Histogram:
    """Bin edges and the reference share of each bin."""

    edges: np.ndarray
    shares: np.ndarray


@dataclass(frozen=True)
class Reference:
    """A model's reference distributions as the monitor uses them."""

    features: Mapping[str, Histogram]
    score: Histogram
    top_features: tuple[str, ...]
    fallback_score: Histogram | None = None


def _parse_histogram(entry: Any) -> Histogram:
    edges = np.asarray([float(x) for x in entry["edges"]], dtype=np.float64)
    shares = np.asarray([float(x) for x in entry["shares"]], dtype=np.float64)
    if shares.size != edges.size + 1 or np.any(np.diff(edges) <= 0):
        raise ValueError("'shares' must have one entry more than the strictly increasing 'edges'")
    return Histogram(edges, shares)


def parse_reference(entry: Any, feature_names: Sequence[str]) -> Reference:
    """The metadata's ``reference`` section; raises ValueError / KeyError / TypeError when malformed."""
    features = {name: _parse_histogram(entry["features"][name]) for name in feature_names}
    top = tuple(str(n) for n in entry.get("top_features", feature_names))
    unknown = [n for n in top if n not in features]
    if unknown:
        raise ValueError(f"'top_features' names unknown features {unknown[:3]}")
    fallback = entry.get("fallback_score")
    return Reference(features=features, score=_parse_histogram(entry["score"]), top_features=top,
                     fallback_score=_parse_histogram(fallback) if fallback is not None else None)
