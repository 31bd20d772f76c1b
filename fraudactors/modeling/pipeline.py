"""The training pipeline: data -> point-in-time features -> time split -> fit -> ONNX -> metadata.

The algorithm, its hyperparameters and the reported metrics are decided on the time split
(:mod:`.split`): fit, calibrate, evaluate on held-out weeks. Then, by default, the shipped model is
refit with the same algorithm, hyperparameters and seed on all labelled data up to the label
cut-off, with its thresholds calibrated on the most recent labelled window (``split.final_split``);
the metadata records the time-split evaluation and what the final model was fit on.

Each version also gets a fallback for degraded mode: the same algorithm, fitted, calibrated and
evaluated the same way but only on the transaction-only features
(``features.definition.TRANSACTION_ONLY``), the ones the engine has while the feature store is
unreachable.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.errors import ModelError
from fraudactors.modeling.data import DataError, Dataset, synthetic_dataset
from fraudactors.modeling.metrics import evaluate_scores, threshold_for_fpr
from fraudactors.modeling.progress import Progress, step
from fraudactors.modeling.split import (
    Split,
    SplitConfig,
    iso,
    known_labels,
    sample_legit,
    time_split,
)
from fraudactors.modeling.table import describe_invalid, load_table

DAY_S = 86400.0
DEFAULT_ALGO = {"v1": "rf", "v2": "hgb"}
ALGOS = ("rf", "hgb")
ONNX_INPUT = "features"
ONNX_OUTPUT = "probabilities"


# ---------------------------------------------------------------------- data and features


def load_dataset(spec: Mapping[str, Any], data_path: str | None = None, show_progress: bool = True,
                 strict: bool = False) -> Dataset:
    """The dataset a ``training.data`` spec describes (``data_path`` overrides a file's path).

    A file's invalid rows are skipped and reported on stderr (``strict``: the first one fails).
    """
    if spec["kind"] == "synthetic":
        p = Progress("generating transactions", enabled=show_progress)
        ds = synthetic_dataset(int(spec["seed"]), float(spec["days"]), int(spec["users"]), int(spec["merchants"]),
                               progress=p)
        p.update(len(ds))
        p.done()
    elif spec["kind"] == "file":
        path = data_path or spec.get("path")
        if not path:
            raise DataError("this model was trained on a file: pass it with --data FILE")
        p = Progress("reading data", enabled=show_progress)
        ds = load_table(path, spec.get("mapping") or {}, float(spec.get("label_delay_days", 7.0)), progress=p,
                        strict=strict)
        p.done(f"{len(ds):,} rows")
        report = describe_invalid(ds.source)
        if report:
            print(report, file=sys.stderr)
    else:
        raise ModelError(f"unknown training data kind {spec['kind']!r}")
    return ds


def compute_features(ds: Dataset, show_progress: bool = True) -> np.ndarray:
    from fraudactors.features.offline import offline_features

    p = Progress("point-in-time features", total=len(ds), enabled=show_progress)
    X = offline_features(ds.transactions, ds.labels(), progress=p)
    p.done()
    return X


def cards_and_days(ds: Dataset, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The card (``user_id``) and UTC day number of each of ``rows``, for card precision@k."""
    cards = np.array([ds.transactions[i].user_id for i in rows.tolist()], dtype=object)
    return cards, (ds.event_time[rows] // DAY_S).astype(np.int64)


def held_out_set(training: Mapping[str, Any], data_path: str | None = None,
                 show_progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rebuild ``(X, is_fraud, scenario)`` of a model's test weeks from its ``training`` metadata."""
    ds = load_dataset(training["data"], data_path, show_progress)
    X = compute_features(ds, show_progress)
    split = time_split(ds.event_time, SplitConfig(**training["split"]))
    return X[split.test], ds.is_fraud[split.test], ds.scenario[split.test]


# ---------------------------------------------------------------------- models


# The hyperparameters of each algorithm: the best of `train --search` on the simulator (docs/models.md).
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    # 60 trees: the engine runs it at thousands of rows/s on a shared 2-core box.
    "rf": {"n_estimators": 60, "max_depth": 16, "min_samples_leaf": 10, "max_features": 0.3},
    # A fixed number of rounds (no early stopping): same trees whatever the validation draw.
    "hgb": {"max_iter": 200, "learning_rate": 0.05, "max_leaf_nodes": 31, "min_samples_leaf": 100,
            "l2_regularization": 1.0},
}
# The fallbacks' own (the search tunes the main models): on six transaction-only features the
# deeper forest was worse (46.6 % vs 49.3 % detected on the held-out weeks) and 5 times larger.
FALLBACK_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "rf": {"n_estimators": 60, "max_depth": 12, "min_samples_leaf": 20, "max_features": "sqrt"},
    "hgb": HYPERPARAMETERS["hgb"],
}
# Boosting's score may only rise with the merchant's reported fraud (a monotonic constraint):
# unconstrained, it learnt to trust a card that shops at a merchant regularly even where most of
# that merchant's recent transactions were reported fraud (a compromised terminal).
RISING_WITH = frozenset({"merchant_fraud_count_7d", "merchant_fraud_count_30d", "merchant_fraud_rate_7d",
                         "merchant_fraud_rate_30d"})


# The forest's class weights ("balanced_subsample" on a sample that holds every fraud) weigh the
# frauds as much as all the legitimate rows, so its raw output is far above the fraud rate (a raw
# 0.39 was 5 % fraud; docs/models.md, "Calibration of the probabilities"). Its ONNX graph ends in a
# Platt map fitted on the time split's calibration period. Boosting keeps the base rate by
# re-weighting its legitimate rows and is left as it is.
CALIBRATED_ALGOS = frozenset({"rf"})
_PLATT_EPS = 1e-6  # raw probabilities are clipped to [eps, 1 - eps] before their log-odds
MIN_CALIBRATION_FRAUDS = 20  # fewer reported frauds in the calibration period: the raw output is shipped


@dataclass(frozen=True)
class Platt:
    """``p -> sigmoid(a * logit(p) + b)``: strictly increasing for ``a > 0``, so it keeps every
    ranking (and the detection at any FPR) and only makes the numbers fraud rates."""

    a: float
    b: float
    rows: int
    frauds: int

    def apply(self, p: np.ndarray) -> np.ndarray:
        q = np.clip(np.asarray(p, dtype=np.float64), _PLATT_EPS, 1 - _PLATT_EPS)
        return 1.0 / (1.0 + np.exp(-(self.a * np.log(q / (1 - q)) + self.b)))

    def meta(self, fitted_on: str) -> dict[str, Any]:
        return {"method": "Platt: sigmoid(a * logit(p) + b) of the raw probability p, clipped to "
                          f"[{_PLATT_EPS:g}, 1 - {_PLATT_EPS:g}]; in the ONNX graph",
                "a": self.a, "b": self.b, "fitted_on": fitted_on, "rows": self.rows, "frauds": self.frauds}


def fit_platt(raw: np.ndarray, y: np.ndarray) -> Platt:
    """The Platt map of ``raw`` probabilities to the labels ``y`` (an unregularised logistic
    regression on their log-odds)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        raise DataError(f"the probability calibration needs both classes; {int(y.sum())} frauds in {y.size} rows")
    q = np.clip(np.asarray(raw, dtype=np.float64), _PLATT_EPS, 1 - _PLATT_EPS)
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(np.log(q / (1 - q)).reshape(-1, 1), y)
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if not a > 0:
        raise DataError(f"the probability calibration came out decreasing (a = {a:.4g}): the model ranks the "
                        "calibration period's frauds below its legitimate rows")
    return Platt(a, b, int(y.size), int(y.sum()))


def calibrated_onnx_bytes(onnx_bytes: bytes, platt: Platt) -> bytes:
    """``onnx_bytes`` with its ``probabilities`` output passed through ``platt`` (same name, shape
    and type: the fraud column and its complement)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    raw = ONNX_OUTPUT + "_uncalibrated"
    for node in graph.node:
        node.output[:] = [raw if name == ONNX_OUTPUT else name for name in node.output]

    def const(name: str, value: float | list[int]) -> None:
        if isinstance(value, list):
            graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(value)], value))
        else:
            graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))

    for name, value in (("platt_one_col", [1]), ("platt_two_col", [2]), ("platt_axis", [1]),
                        ("platt_lo", _PLATT_EPS), ("platt_hi", 1 - _PLATT_EPS), ("platt_1", 1.0),
                        ("platt_a", platt.a), ("platt_b", platt.b)):
        const(name, value)
    graph.node.extend([
        helper.make_node("Slice", [raw, "platt_one_col", "platt_two_col", "platt_axis"], ["platt_p"]),
        helper.make_node("Clip", ["platt_p", "platt_lo", "platt_hi"], ["platt_q"]),
        helper.make_node("Sub", ["platt_1", "platt_q"], ["platt_not_q"]),
        helper.make_node("Div", ["platt_q", "platt_not_q"], ["platt_odds"]),
        helper.make_node("Log", ["platt_odds"], ["platt_logit"]),
        helper.make_node("Mul", ["platt_logit", "platt_a"], ["platt_scaled"]),
        helper.make_node("Add", ["platt_scaled", "platt_b"], ["platt_z"]),
        helper.make_node("Sigmoid", ["platt_z"], ["platt_fraud"]),
        helper.make_node("Sub", ["platt_1", "platt_fraud"], ["platt_legit"]),
        helper.make_node("Concat", ["platt_legit", "platt_fraud"], [ONNX_OUTPUT], axis=1),
    ])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def make_model(algo: str, seed: int, feature_names: Sequence[str] = (), params: Mapping[str, Any] | None = None
               ) -> Any:
    """An unfitted model: ``HYPERPARAMETERS[algo]`` updated with ``params``; for boosting, the
    monotonic constraints of ``RISING_WITH`` on the columns ``feature_names`` name."""
    if algo not in HYPERPARAMETERS:
        raise ModelError(f"unknown algorithm {algo!r} (choose from {', '.join(ALGOS)})")
    chosen = {**HYPERPARAMETERS[algo], **(params or {})}
    if algo == "rf":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(**chosen, class_weight="balanced_subsample", n_jobs=2, random_state=seed)
    from sklearn.ensemble import HistGradientBoostingClassifier

    rising = [1 if name in RISING_WITH else 0 for name in feature_names]
    return HistGradientBoostingClassifier(**chosen, early_stopping=False, random_state=seed,
                                          monotonic_cst=rising if any(rising) else None)


@contextmanager
def _skl2onnx_leaf_missing_fix() -> Iterator[None]:
    """skl2onnx 1.20 passes ``False`` (a bool) as ``nodes_missing_value_tracks_true`` of
    HistGradientBoosting leaves, which onnx rejects ("Expected an int, got a boolean"). Coerce it to
    an int for the duration of one conversion (no-op for versions that already do)."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args: Any, **kwargs: Any) -> Any:
        if "nodes_missing_value_tracks_true" in kwargs:
            kwargs["nodes_missing_value_tracks_true"] = int(kwargs["nodes_missing_value_tracks_true"])
        return original(*args, **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def single_threaded_openmp() -> Any:
    """HistGradientBoosting parallelizes with OpenMP, which busy-waits: on a shared 2-core box with
    other busy processes a fit ran 40x slower with 2 threads than with 1. Fit and predict single-threaded."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


def fit_model(algo: str, seed: int, X: np.ndarray, y: np.ndarray, legit_fraction: float = 1.0,
              feature_names: Sequence[str] = (), params: Mapping[str, Any] | None = None) -> Any:
    """Fit on every fraud and ``legit_fraction`` of the legitimate rows. Boosting gets the legit rows
    re-weighted by ``1 / legit_fraction`` so its probabilities keep the real base rate; the forest
    balances classes itself (``class_weight``). ``feature_names`` name the columns of ``X``."""
    model = make_model(algo, seed, feature_names, params)
    rows = sample_legit(y, legit_fraction, seed)
    weight = None
    if algo == "hgb" and legit_fraction < 1.0:
        weight = np.where(y[rows], 1.0, 1.0 / legit_fraction)
    with single_threaded_openmp():
        model.fit(X[rows], y[rows], sample_weight=weight)
    return model


def to_onnx_bytes(model: Any, n_features: int, name: str) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    with _skl2onnx_leaf_missing_fix():
        onx = convert_sklearn(model, name=name, initial_types=[(ONNX_INPUT, FloatTensorType([None, n_features]))],
                              options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    return bytes(onx.SerializeToString())


def onnx_proba(session: Any, X: np.ndarray, batch: int = 65536) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    parts = [session.run([ONNX_OUTPUT], {ONNX_INPUT: X[i:i + batch]})[0][:, 1] for i in range(0, X.shape[0], batch)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds per call (robust to the other work on a shared machine)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_inference(session: Any, reasons_session: Any, X: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Single-thread latency on this machine, median of repeated calls (shared box: indicative)."""
    from fraudactors.modeling.attribution import top_reasons
    from fraudactors.modeling.attribution_onnx import INPUT, OUTPUT

    batch = np.ascontiguousarray(X[:256], dtype=np.float32)
    row = np.ascontiguousarray(X[:1], dtype=np.float32)
    per_batch = _timed(lambda: session.run([ONNX_OUTPUT], {ONNX_INPUT: batch}), 50)
    per_row = _timed(lambda: session.run([ONNX_OUTPUT], {ONNX_INPUT: row}), 300)
    reasons = _timed(lambda: top_reasons(reasons_session.run([OUTPUT], {INPUT: batch})[0], names, 3), 50)
    return {
        "batch_rows": int(batch.shape[0]),
        "onnx_ms_per_batch": round(per_batch * 1e3, 3),
        "onnx_us_per_row_in_batch": round(per_batch / max(batch.shape[0], 1) * 1e6, 2),
        "onnx_us_single_row_call": round(per_row * 1e6, 2),
        "reasons_ms_per_batch": round(reasons * 1e3, 3),
    }


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import skl2onnx
    import sklearn

    return {"python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _json_params(model: Any) -> dict[str, Any]:
    return {k: v for k, v in model.get_params().items()
            if v is None or isinstance(v, bool | int | float | str)
            or (isinstance(v, list) and all(isinstance(x, int) for x in v))}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrainContext:
    """Everything the versions trained in one run share."""

    ds: Dataset
    X: np.ndarray
    split: Split  # the time split: model choice, hyperparameters and the reported metrics
    final: Split | None  # the final refit's rows (split.final_split), or None to ship the time-split model
    data_spec: dict[str, Any]
    split_cfg: SplitConfig
    seed: int
    review_fpr: float
    decline_fpr: float
    command: str
    legit_fraction: float = 0.2
    show_progress: bool = True
    # per algorithm: hyperparameters chosen by ``train --search`` (over HYPERPARAMETERS), and its record
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    searches: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Built:
    """One fitted, converted and calibrated model (a version's main model or its fallback)."""

    model: Any
    onnx: bytes
    attribution: Any  # TreeAttribution
    attribution_onnx: bytes
    thresholds: dict[str, float]
    onnx_diff: float
    metrics: dict[str, Any]  # time split: {"test": ..., "calibration": ...}; final: {"calibration": ...}
    inference: dict[str, float]
    platt: Platt | None  # the probability calibration in its ONNX graph (CALIBRATED_ALGOS)
    uncalibrated: str | None  # why a model of CALIBRATED_ALGOS has none


def _build(ctx: TrainContext, split: Split, name: str, algo: str, names: tuple[str, ...],
           columns: np.ndarray | None, what: str, params: Mapping[str, Any] | None,
           platt: Platt | None = None) -> _Built:
    """Fit ``algo`` on ``columns`` of the features (all when None) and the fit rows of ``split``,
    convert it and its path contributions to ONNX, calibrate the thresholds on the split's
    calibration rows and, when the split has test rows, evaluate it there. For CALIBRATED_ALGOS the
    ONNX probabilities go through a Platt map: ``platt`` (the final refit takes the time split's,
    as its calibration rows are legitimate only), else one fitted on the split's calibration rows."""
    from fraudactors.modeling.attribution import build_attribution
    from fraudactors.modeling.attribution_onnx import attribution_onnx_bytes
    from fraudactors.modeling.scorer import make_session

    ds = ctx.ds
    X = ctx.X if columns is None else np.ascontiguousarray(ctx.X[:, columns])
    y_known = known_labels(ds, split.cutoff)
    y_fit = y_known[split.fit]
    final = split.test.size == 0
    _check_calibration_rows(int((~y_known[split.calib]).sum()), min(ctx.review_fpr, ctx.decline_fpr), final)
    s = step(f"fitting {name} ({algo}{what}{', final refit' if final else ''})", ctx.show_progress)
    model = fit_model(algo, ctx.seed, X[split.fit], y_fit, ctx.legit_fraction, names, params)
    s.done(f"on the {int(y_fit.sum()):,} frauds and {ctx.legit_fraction:.0%} of {int((~y_fit).sum()):,} legit rows")

    s = step(f"converting {name} to ONNX", ctx.show_progress)
    onnx_bytes = to_onnx_bytes(model, X.shape[1], "fraudactors_" + name.replace("-", "_"))
    uncalibrated = None
    if algo not in CALIBRATED_ALGOS:
        platt = None
    elif platt is None:
        platt, uncalibrated = _probability_map(onnx_bytes, X[split.calib], y_known[split.calib], final)
        if uncalibrated is not None and not final:
            print(f"warning: {name}: {uncalibrated}", file=sys.stderr)
    if platt is not None:
        onnx_bytes = calibrated_onnx_bytes(onnx_bytes, platt)
    session = make_session(onnx_bytes)
    parity_rows = X[(split.test if not final else split.calib)[: 20000]]
    with single_threaded_openmp():
        sk_rows = model.predict_proba(parity_rows)[:, 1]
    if platt is not None:
        sk_rows = platt.apply(sk_rows)
    onnx_diff = float(np.abs(onnx_proba(session, parity_rows) - sk_rows).max()) if parity_rows.size else 0.0
    attribution = build_attribution(model, X.shape[1])
    attr_bytes = attribution_onnx_bytes(attribution, "fraudactors_" + name.replace("-", "_") + "_reasons")
    reasons_session = make_session(attr_bytes)
    s.done()

    s = step(f"calibrating {name}" + ("" if final else " and evaluating it on the held-out weeks"), ctx.show_progress)
    p_calib = onnx_proba(session, X[split.calib])
    calib_legit = ~y_known[split.calib]
    thresholds = {"review": threshold_for_fpr(p_calib[calib_legit], ctx.review_fpr),
                  "decline": threshold_for_fpr(p_calib[calib_legit], ctx.decline_fpr)}
    calib_metrics = evaluate_scores(y_known[split.calib], p_calib, ds.scenario[split.calib], thresholds)
    calib_metrics.pop("per_scenario", None)
    metrics = {"calibration": calib_metrics}
    if not final:
        p_test = onnx_proba(session, X[split.test])
        cards, days = cards_and_days(ds, split.test)
        metrics = {"test": evaluate_scores(ds.is_fraud[split.test], p_test, ds.scenario[split.test], thresholds,
                                           cards=cards, days=days),
                   **metrics}
    timings = measure_inference(session, reasons_session, parity_rows, names)
    s.done()
    return _Built(model=model, onnx=onnx_bytes, attribution=attribution, attribution_onnx=attr_bytes,
                  thresholds=thresholds, onnx_diff=onnx_diff, metrics=metrics, inference=timings, platt=platt,
                  uncalibrated=uncalibrated)


def _check_calibration_rows(legit: int, fpr: float, final: bool) -> None:
    """A threshold at a false-positive rate needs more legitimate calibration rows than one per
    flagged: with fewer, it is just above the sample's top score (one row: a threshold that
    flags half the traffic)."""
    need = math.ceil(1.0 / fpr)
    if legit < need:
        window = "the final refit's calibration window (the last --calib-days before the label cut-off)" \
            if final else "the calibration window"
        raise DataError(f"{window} holds {legit} legitimate transaction(s): thresholds at an FPR of {fpr:g} "
                        f"need at least {need}; give a longer --calib-days, or check the data has no gap there")


def _probability_map(onnx_bytes: bytes, X_calib: np.ndarray, y_calib: np.ndarray,
                     final: bool) -> tuple[Platt | None, str | None]:
    """``(the Platt map of a model of CALIBRATED_ALGOS, or None and why)``, fitted on its split's
    calibration rows; the final refit gets the time split's, so here it has none."""
    from fraudactors.modeling.scorer import make_session

    if final:  # its time-split model had too few frauds to calibrate
        return None, "the time-split model was not calibrated: the raw probabilities are shipped"
    frauds = int(y_calib.sum())
    if frauds < MIN_CALIBRATION_FRAUDS:
        return None, (f"{frauds} reported frauds in the calibration period (fewer than "
                      f"{MIN_CALIBRATION_FRAUDS}): the raw probabilities are shipped")
    return fit_platt(onnx_proba(make_session(onnx_bytes), X_calib), y_calib), None


def _thresholds_meta(ctx: TrainContext, built: _Built, final: bool) -> dict[str, Any]:
    on = ("the most recent labelled window before the label cut-off, on the legitimate rows the final fit did "
          "not use" if final else "the calibration period")
    return {
        "review": built.thresholds["review"], "decline": built.thresholds["decline"],
        "review_target_fpr": ctx.review_fpr, "decline_target_fpr": ctx.decline_fpr,
        "chosen_on": f"{on}, ONNX probabilities, labels known at the cut-off; flag when p >= threshold",
    }


def _platt_meta(built: _Built) -> dict[str, Any] | None:
    if built.platt is None:
        return None if built.uncalibrated is None else {"method": None, "skipped": built.uncalibrated}
    return built.platt.meta("the time split's calibration period, labels known at its cut-off (the raw "
                            "probabilities of the time-split model; the final refit reuses the map)")


def _attribution_meta(file: str, built: _Built) -> dict[str, Any]:
    from fraudactors.modeling.registry import sha256_bytes

    a = built.attribution
    return {"file": file, "sha256": sha256_bytes(built.attribution_onnx),
            "method": "Saabas tree path contributions (exact decomposition of the tree output), "
                      "as an ONNX TreeEnsembleRegressor with one target per feature",
            "input": "features", "output": "contributions", "space": a.space,
            "bias": a.bias, "trees": int(a.roots.size), "nodes": int(a.feature.size), "max_depth": a.depth}


def _final_fit_meta(ctx: TrainContext, evaluated: _Built, shipped: _Built) -> dict[str, Any]:
    """What the shipped model was fit and calibrated on (the time split's model when not refit)."""
    split = ctx.final or ctx.split
    y_fit = known_labels(ctx.ds, split.cutoff)[split.fit]
    return {
        "refit": ctx.final is not None,
        "periods": split.periods,
        "data_end_epoch": float(ctx.ds.event_time[-1]),
        "labels_known_at": iso(split.cutoff),
        "fit_rows": int(split.fit.size),
        "fit_frauds": int(y_fit.sum()),
        "fit_legit_fraction": ctx.legit_fraction,
        "calibration_rows": int(split.calib.size),
        "calibration": shipped.metrics["calibration"],
        "time_split_thresholds": {"review": evaluated.thresholds["review"],
                                  "decline": evaluated.thresholds["decline"]},
    }


def _train_one(ctx: TrainContext, name: str, algo: str, names: tuple[str, ...], columns: np.ndarray | None,
               what: str, params: Mapping[str, Any] | None) -> tuple[_Built, _Built]:
    """(the time-split model, evaluated; the model to ship: the final refit, or the same one)."""
    evaluated = _build(ctx, ctx.split, name, algo, names, columns, what, params)
    if ctx.final is None:
        return evaluated, evaluated
    return evaluated, _build(ctx, ctx.final, name, algo, names, columns, what, params, evaluated.platt)


def _reference_meta(ctx: TrainContext, main: _Built, fallback: _Built, columns: np.ndarray) -> dict[str, Any]:
    """The monitor's reference (:mod:`fraudactors.modeling.reference`): the feature distributions of
    the rows the shipped model was fit on, its scores (and its fallback's) on its calibration rows."""
    from fraudactors.features.definition import FEATURE_NAMES
    from fraudactors.modeling.reference import build_reference
    from fraudactors.modeling.scorer import make_session

    split = ctx.final or ctx.split
    X_calib = ctx.X[split.calib]
    scores = onnx_proba(make_session(main.onnx), X_calib)
    fallback_scores = onnx_proba(make_session(fallback.onnx), X_calib[:, columns])
    contributions = main.attribution.contributions(np.ascontiguousarray(X_calib[:5000], dtype=np.float32))
    what = {"features": "every row of the shipped model's fit period (before the legit subsample)",
            "score": "the shipped model's ONNX probabilities on its calibration rows"}
    return build_reference(ctx.X, split.fit, FEATURE_NAMES, scores, contributions, what=what,
                           fallback_scores=fallback_scores)


def train_version(ctx: TrainContext, version: str, algo: str, out_dir: str | Path) -> dict[str, Any]:
    """Fit, convert, calibrate, evaluate and write ``out_dir/version`` -- the model and its
    fallback for degraded mode (the same algorithm on the transaction-only features, its own
    thresholds for the same target FPRs); returns the metadata.

    Each is evaluated on the time split; what is written is its final refit (``ctx.final``), or
    the evaluated model itself when there is none."""
    import json

    from fraudactors.features.definition import FEATURE_INDEX, FEATURE_NAMES, TRANSACTION_ONLY
    from fraudactors.modeling.registry import (
        ATTRIBUTION_FILE,
        FALLBACK_ATTRIBUTION_FILE,
        FALLBACK_FILE,
        METADATA_FILE,
        MODEL_FILE,
        fallback_id,
        sha256_bytes,
    )

    ds, split = ctx.ds, ctx.split
    y_fit = known_labels(ds, split.cutoff)[split.fit]
    for rows, y in ((split.fit, y_fit), *(() if ctx.final is None else
                                          ((ctx.final.fit, known_labels(ds, ctx.final.cutoff)[ctx.final.fit]),))):
        if y.sum() == 0 or y.all():
            raise DataError(f"the fit period holds {int(y.sum())} reported frauds out of {rows.size} "
                            "transactions; training needs both classes")
    evaluated, main = _train_one(ctx, version, algo, FEATURE_NAMES, None, "", ctx.params.get(algo))
    columns = np.array([FEATURE_INDEX[n] for n in TRANSACTION_ONLY], dtype=np.intp)
    fallback_evaluated, fallback = _train_one(ctx, fallback_id(version), algo, TRANSACTION_ONLY, columns,
                                              f", {len(TRANSACTION_ONLY)} transaction-only features",
                                              FALLBACK_HYPERPARAMETERS[algo])

    directory = Path(out_dir) / version
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / ATTRIBUTION_FILE, main.attribution_onnx)
    _write_atomic(directory / MODEL_FILE, main.onnx)
    _write_atomic(directory / FALLBACK_ATTRIBUTION_FILE, fallback.attribution_onnx)
    _write_atomic(directory / FALLBACK_FILE, fallback.onnx)
    unreported = ds.is_fraud[split.fit] & ~y_fit
    final = ctx.final is not None
    model = main.model
    metadata: dict[str, Any] = {
        "version": version,
        "algo": algo,
        "model_type": type(model).__name__,
        "params": _json_params(model),
        "n_iter": int(getattr(model, "n_iter_", 0)) or None,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": ctx.seed,
        "command": ctx.command,
        "feature_names": list(FEATURE_NAMES),
        "thresholds": _thresholds_meta(ctx, main, final),
        "sha256": sha256_bytes(main.onnx),
        "onnx": {"file": MODEL_FILE, "input": ONNX_INPUT, "output": ONNX_OUTPUT, "bytes": len(main.onnx),
                 "opset": {"": 17, "ai.onnx.ml": 3}, "max_abs_diff_vs_sklearn": main.onnx_diff},
        "attribution": _attribution_meta(ATTRIBUTION_FILE, main),
        "probability_calibration": _platt_meta(main),
        # the time-split evaluation: the same algorithm, hyperparameters and seed fit on the fit
        # period only, calibrated on the calibration period, scored on the held-out weeks
        "metrics": evaluated.metrics,
        "final_fit": _final_fit_meta(ctx, evaluated, main),
        "hyperparameter_search": ctx.searches.get(algo),
        "fallback": {
            "purpose": "degraded mode (feature store unreachable): the same algorithm on the features that "
                       "exist without the store, with its own thresholds for the same target FPRs",
            "file": FALLBACK_FILE,
            "sha256": sha256_bytes(fallback.onnx),
            "model_type": type(fallback.model).__name__,
            "params": _json_params(fallback.model),
            "n_iter": int(getattr(fallback.model, "n_iter_", 0)) or None,
            "feature_names": list(TRANSACTION_ONLY),
            "thresholds": _thresholds_meta(ctx, fallback, final),
            "onnx": {"input": ONNX_INPUT, "output": ONNX_OUTPUT, "bytes": len(fallback.onnx),
                     "max_abs_diff_vs_sklearn": fallback.onnx_diff},
            "attribution": _attribution_meta(FALLBACK_ATTRIBUTION_FILE, fallback),
            "probability_calibration": _platt_meta(fallback),
            "metrics": fallback_evaluated.metrics,
            "final_fit": _final_fit_meta(ctx, fallback_evaluated, fallback),
            "inference": fallback.inference,
        },
        "training": {
            "data": ctx.data_spec,
            "split": asdict(ctx.split_cfg),
            "periods": split.periods,
            "cutoff": iso(split.cutoff),
            "rows": {"fit": int(split.fit.size), "calibration": int(split.calib.size), "test": int(split.test.size)},
            "fit_frauds_reported_by_cutoff": int(y_fit.sum()),
            "fit_frauds_unreported_at_cutoff": int(unreported.sum()),
            "fit_legit_fraction": ctx.legit_fraction,
        },
        "data_summary": ds.summary(),
        "reference": _reference_meta(ctx, main, fallback, columns),
        "inference": main.inference,
        "libraries": library_versions(),
    }
    text = json.dumps(metadata, indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n"
    _write_atomic(directory / METADATA_FILE, text.encode("utf-8"))
    return metadata


def _json_default(obj: object) -> object:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
