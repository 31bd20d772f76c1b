"""Per-prediction reasons: Saabas-style tree path contributions, precomputed at training time.

Every tree node gets ``mean(node)``: the training-sample-weighted mean of the tree's output under that
node (for a random forest, the class-1 fraction; for histogram gradient boosting, the raw leaf value
in log-odds, with internal means recomputed bottom-up from leaf values and sample counts, because
scikit-learn does not store shrunk internal values). Walking a row down a tree, each step from a
parent to a child adds ``mean(child) - mean(parent)`` to the parent's split feature. Summed over the
path and over the trees, this decomposes the model output exactly:

    output(x) = bias + sum_f contribution_f(x)

(probability for the forest, log-odds for boosting — a monotone map of the probability, so the
ranking of features is what the score means). The reasons of a prediction are the features with the
largest positive contributions.

All trees are flattened into one set of arrays (``attribution.npz`` next to ``model.onnx``) and walked
together for a whole batch with numpy: ``depth`` vectorized steps over ``(batch, trees)`` lanes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.errors import ModelError


@dataclass(frozen=True)
class TreeAttribution:
    feature: np.ndarray  # int32 (N,) split feature; -1 at leaves
    threshold: np.ndarray  # float64 (N,) go left when x <= threshold
    left: np.ndarray  # int32 (N,) global index of the left child (the right one is left + 1); -1 at leaves
    missing_left: np.ndarray  # bool (N,) where NaN goes
    delta: np.ndarray  # float64 (N,) mean(node) - mean(parent), divided by the tree count for a forest
    roots: np.ndarray  # int32 (T,)
    depth: int
    bias: float
    n_features: int
    space: str  # "probability" or "logodds"

    # ------------------------------------------------------------------ evaluation

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """(n, n_features) float64: per-feature contributions, summing with ``bias`` to the output."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        n, F = X.shape[0], self.n_features
        if n == 0:
            return np.zeros((0, F))
        flat = X.ravel()
        has_nan = bool(np.isnan(flat).any())
        # One lane per (row, tree); lanes leave the walk when they reach a leaf.
        base = np.repeat(np.arange(n, dtype=np.int64) * F, self.roots.size)
        cur = np.tile(self.roots, n)
        keys: list[np.ndarray] = []
        deltas: list[np.ndarray] = []
        while cur.size:
            feat = self.feature[cur]
            internal = feat >= 0
            if not internal.all():
                cur, feat, base = cur[internal], feat[internal], base[internal]
                if not cur.size:
                    break
            key = base + feat
            x = flat[key]
            go_right = x > self.threshold[cur]
            if has_nan:
                go_right |= np.isnan(x) & ~self.missing_left[cur]
            cur = self.left[cur] + go_right  # siblings are adjacent: right = left + 1
            keys.append(key)
            deltas.append(self.delta[cur])
        return np.bincount(np.concatenate(keys), weights=np.concatenate(deltas), minlength=n * F).reshape(n, F)

    def output(self, X: np.ndarray) -> np.ndarray:
        """The model output the contributions decompose (probability or log-odds)."""
        return self.bias + self.contributions(X).sum(axis=1)

    def reasons(self, X: np.ndarray, names: Sequence[str], max_reasons: int = 3) -> list[list[str]]:
        """Up to ``max_reasons`` feature names per row, largest positive contribution first."""
        return top_reasons(self.contributions(X), names, max_reasons)

    def leaf_contributions(self) -> dict[int, dict[int, float]]:
        """For every leaf (global index): the per-feature contributions of the path that ends there.

        A row's contributions are the sum over trees of the vector of the leaf it reaches, which is
        what :mod:`.attribution_onnx` hands to onnxruntime."""
        out: dict[int, dict[int, float]] = {}
        stack: list[tuple[int, dict[int, float]]] = [(int(r), {}) for r in self.roots]
        while stack:
            node, path = stack.pop()
            f = int(self.feature[node])
            if f < 0:
                out[node] = path
                continue
            for child in (int(self.left[node]), int(self.left[node]) + 1):
                contrib = dict(path)
                contrib[f] = contrib.get(f, 0.0) + float(self.delta[child])
                stack.append((child, contrib))
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as fh:  # an explicit handle: np.savez must not append ".npz"
            np.savez_compressed(
                fh, feature=self.feature, threshold=self.threshold, left=self.left,
                missing_left=self.missing_left, delta=self.delta,
                roots=self.roots, depth=np.int64(self.depth), bias=np.float64(self.bias),
                n_features=np.int64(self.n_features), space=np.str_(self.space),
            )

    @classmethod
    def load(cls, path: str | Path) -> TreeAttribution:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    feature=z["feature"], threshold=z["threshold"], left=z["left"],
                    missing_left=z["missing_left"], delta=z["delta"],
                    roots=z["roots"], depth=int(z["depth"]), bias=float(z["bias"]),
                    n_features=int(z["n_features"]), space=str(z["space"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"cannot read attribution file {path}: {exc}") from exc


def top_reasons(contrib: np.ndarray, names: Sequence[str], max_reasons: int = 3) -> list[list[str]]:
    """Per row of ``contrib`` (n, F): up to ``max_reasons`` names with positive contribution, largest first."""
    n = contrib.shape[0]
    if n == 0 or max_reasons <= 0:
        return [[] for _ in range(n)]
    k = min(max_reasons, contrib.shape[1])
    top = np.argpartition(-contrib, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(contrib, top, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    return [[names[j] for j, v in zip(t, c, strict=True) if v > 0.0]
            for t, c in zip(top.tolist(), vals.tolist(), strict=True)]


# ---------------------------------------------------------------------- building


@dataclass
class _Tree:
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray  # -1 at leaves
    right: np.ndarray
    missing_left: np.ndarray
    mean: np.ndarray
    depth: int


def _bottom_up_means(left: np.ndarray, right: np.ndarray, leaf_value: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Count-weighted mean of the leaf values under every node (children always follow parents)."""
    mean = leaf_value.astype(np.float64).copy()
    for i in range(left.size - 1, -1, -1):
        if left[i] >= 0:
            cl, cr = count[left[i]], count[right[i]]
            tot = cl + cr
            mean[i] = (mean[left[i]] * cl + mean[right[i]] * cr) / tot if tot > 0 else 0.5 * (
                mean[left[i]] + mean[right[i]])
    return mean


def _depth(left: np.ndarray, right: np.ndarray) -> int:
    depth = np.zeros(left.size, dtype=np.int64)
    for i in range(left.size):
        if left[i] >= 0:
            depth[left[i]] = depth[i] + 1
            depth[right[i]] = depth[i] + 1
    return int(depth.max()) if depth.size else 0


def _forest_trees(model: Any) -> list[_Tree]:
    trees = []
    for est in model.estimators_:
        t = est.tree_
        left = t.children_left.astype(np.int64)
        right = t.children_right.astype(np.int64)
        # tree_.value holds class fractions per node (scikit-learn >= 1.4); column 1 = fraud.
        value = t.value[:, 0, :]
        frac = value[:, 1] / np.maximum(value.sum(axis=1), 1e-300)
        missing = getattr(t, "missing_go_to_left", np.zeros(left.size, dtype=np.uint8))
        trees.append(_Tree(feature=np.where(left >= 0, t.feature, -1), threshold=t.threshold.astype(np.float64),
                           left=left, right=right, missing_left=np.asarray(missing).astype(bool),
                           mean=frac.astype(np.float64), depth=_depth(left, right)))
    return trees


def _hgb_trees(model: Any) -> list[_Tree]:
    trees = []
    for per_iter in model._predictors:
        if len(per_iter) != 1:
            raise ModelError("attribution supports binary HistGradientBoostingClassifier only")
        nodes = per_iter[0].nodes
        if nodes["is_categorical"].any():
            raise ModelError("attribution does not support categorical splits")
        is_leaf = nodes["is_leaf"].astype(bool)
        left = np.where(is_leaf, -1, nodes["left"].astype(np.int64))
        right = np.where(is_leaf, -1, nodes["right"].astype(np.int64))
        mean = _bottom_up_means(left, right, np.where(is_leaf, nodes["value"], 0.0),
                                nodes["count"].astype(np.float64))
        trees.append(_Tree(feature=np.where(is_leaf, -1, nodes["feature_idx"]),
                           threshold=nodes["num_threshold"].astype(np.float64), left=left, right=right,
                           missing_left=nodes["missing_go_to_left"].astype(bool), mean=mean,
                           depth=_depth(left, right)))
    return trees


def _sibling_order(t: _Tree) -> _Tree:
    """Renumber nodes breadth-first so that every right child directly follows its left sibling."""
    order = [0]
    i = 0
    while i < len(order):
        node = order[i]
        if t.left[node] >= 0:
            order += [int(t.left[node]), int(t.right[node])]
        i += 1
    old = np.asarray(order, dtype=np.int64)
    new_of = np.full(t.left.size, -1, dtype=np.int64)
    new_of[old] = np.arange(old.size)
    left = np.where(t.left[old] >= 0, new_of[np.maximum(t.left[old], 0)], -1)
    right = np.where(t.right[old] >= 0, new_of[np.maximum(t.right[old], 0)], -1)
    return _Tree(feature=t.feature[old], threshold=t.threshold[old], left=left, right=right,
                 missing_left=t.missing_left[old], mean=t.mean[old], depth=t.depth)


def build_attribution(model: Any, n_features: int) -> TreeAttribution:
    """Flatten a fitted RandomForestClassifier or HistGradientBoostingClassifier."""
    kind = type(model).__name__
    if kind == "RandomForestClassifier":
        trees, space = _forest_trees(model), "probability"
        scale = 1.0 / len(trees)
        bias = float(sum(t.mean[0] for t in trees) * scale)
    elif kind == "HistGradientBoostingClassifier":
        trees, space = _hgb_trees(model), "logodds"
        scale = 1.0
        bias = float(np.ravel(model._baseline_prediction)[0] + sum(t.mean[0] for t in trees))
    else:
        raise ModelError(f"no attribution for model type {kind}")
    trees = [_sibling_order(t) for t in trees]
    sizes = [t.left.size for t in trees]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    feature, threshold, left, missing, delta = [], [], [], [], []
    for t, off in zip(trees, offsets, strict=True):
        is_leaf = t.left < 0
        parent = np.full(t.left.size, -1, dtype=np.int64)
        internal = np.flatnonzero(~is_leaf)
        parent[t.left[internal]] = internal
        parent[t.right[internal]] = internal
        d = np.zeros(t.left.size)
        has_parent = parent >= 0
        d[has_parent] = (t.mean[has_parent] - t.mean[parent[has_parent]]) * scale
        left.append(np.where(is_leaf, -1, t.left + off))
        feature.append(t.feature)
        threshold.append(t.threshold)
        missing.append(t.missing_left)
        delta.append(d)
    return TreeAttribution(
        feature=np.concatenate(feature).astype(np.int32),
        threshold=np.concatenate(threshold),
        left=np.concatenate(left).astype(np.int32),
        missing_left=np.concatenate(missing),
        delta=np.concatenate(delta),
        roots=offsets.astype(np.int32),
        depth=max(t.depth for t in trees),
        bias=bias,
        n_features=n_features,
        space=space,
    )
