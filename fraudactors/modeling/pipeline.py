"""The training pipeline: data -> point-in-time features -> time split -> fit -> ONNX -> metadata.

Time split (days counted back from the last transaction)::

    | warm-up | fit weeks ............ | calibration | gap | test (held out) |
                                                          ^ cut-off: the model is "trained" here

- warm-up: transactions only build feature state (windows up to 30 days start empty);
- fit: the model learns from these, with the labels known at the cut-off (a fraud reported after
  the cut-off, or never, counts as legitimate: the model cannot know better on that day);
- calibration: the review / decline thresholds are chosen here for their target false-positive
  rates, on the ONNX model's own probabilities;
- gap: the label delay; nothing from it is used;
- test: never seen; all reported metrics are computed here, against ground truth.

Each version also gets a fallback for degraded mode: the same algorithm, fitted, calibrated and
evaluated on the same split but only on the transaction-only features
(``features.definition.TRANSACTION_ONLY``), the ones the engine has while the feature store is
unreachable.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.errors import ModelError
from fraudactors.modeling.data import DataError, Dataset, synthetic_dataset
from fraudactors.modeling.metrics import evaluate_scores, threshold_for_fpr
from fraudactors.modeling.progress import Progress, step
from fraudactors.modeling.table import describe_invalid, load_table

DAY_S = 86400.0
DEFAULT_ALGO = {"v1": "rf", "v2": "hgb"}
ALGOS = ("rf", "hgb")
ONNX_INPUT = "features"
ONNX_OUTPUT = "probabilities"


@dataclass(frozen=True)
class SplitConfig:
    warmup_days: float = 7.0
    calib_days: float = 7.0
    gap_days: float = 7.0
    test_days: float = 14.0


@dataclass(frozen=True)
class Split:
    fit: np.ndarray
    calib: np.ndarray
    test: np.ndarray
    cutoff: float
    periods: dict[str, list[str]]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def time_split(times: np.ndarray, cfg: SplitConfig) -> Split:
    """Index arrays of the fit / calibration / test periods of event-time-sorted ``times``."""
    if times.size == 0:
        raise DataError("no transactions to split")
    t0, t1 = float(times[0]), float(times[-1])
    test_start = t1 - cfg.test_days * DAY_S
    calib_end = test_start - cfg.gap_days * DAY_S
    calib_start = calib_end - cfg.calib_days * DAY_S
    fit_start = t0 + cfg.warmup_days * DAY_S
    need = cfg.warmup_days + cfg.calib_days + cfg.gap_days + cfg.test_days
    if fit_start >= calib_start:
        raise DataError(f"the data spans {(t1 - t0) / DAY_S:.1f} days; the time split needs more than "
                        f"warm-up + calibration + gap + test = {need:g} days "
                        "(shorten them with --warmup-days/--calib-days/--gap-days/--test-days)")
    idx = np.arange(times.size)
    fit = idx[(times >= fit_start) & (times < calib_start)]
    calib = idx[(times >= calib_start) & (times < calib_end)]
    test = idx[times >= test_start]
    periods = {"fit": [_iso(fit_start), _iso(calib_start)], "calibration": [_iso(calib_start), _iso(calib_end)],
               "gap": [_iso(calib_end), _iso(test_start)], "test": [_iso(test_start), _iso(t1)]}
    return Split(fit=fit, calib=calib, test=test, cutoff=test_start, periods=periods)


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


def known_labels(ds: Dataset, cutoff: float) -> np.ndarray:
    """Ground truth as known at ``cutoff``: fraud reported at or before it."""
    return ds.is_fraud & (ds.labeled_at <= cutoff)


def held_out_set(training: Mapping[str, Any], data_path: str | None = None,
                 show_progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rebuild ``(X, is_fraud, scenario)`` of a model's test weeks from its ``training`` metadata."""
    ds = load_dataset(training["data"], data_path, show_progress)
    X = compute_features(ds, show_progress)
    split = time_split(ds.event_time, SplitConfig(**training["split"]))
    return X[split.test], ds.is_fraud[split.test], ds.scenario[split.test]


# ---------------------------------------------------------------------- models


def make_model(algo: str, seed: int) -> Any:
    if algo == "rf":
        from sklearn.ensemble import RandomForestClassifier

        # Modest on purpose: the engine runs it at thousands of rows/s on a shared 2-core box.
        return RandomForestClassifier(n_estimators=60, max_depth=12, min_samples_leaf=20, max_features="sqrt",
                                      class_weight="balanced_subsample", n_jobs=2, random_state=seed)
    if algo == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        # A fixed number of rounds (no early stopping): same trees whatever the validation draw.
        return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=31,
                                              min_samples_leaf=100, l2_regularization=1.0, early_stopping=False,
                                              random_state=seed)
    raise ModelError(f"unknown algorithm {algo!r} (choose from {', '.join(ALGOS)})")


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


def sample_legit(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices into ``y``: every fraud and a seeded ``fraction`` of the legitimate rows."""
    if fraction >= 1.0:
        return np.arange(y.size)
    keep = y | (np.random.default_rng([seed, 2]).random(y.size) < fraction)
    return np.flatnonzero(keep)


def fit_model(algo: str, seed: int, X: np.ndarray, y: np.ndarray, legit_fraction: float = 1.0) -> Any:
    """Fit on every fraud and ``legit_fraction`` of the legitimate rows. Boosting gets the legit rows
    re-weighted by ``1 / legit_fraction`` so its probabilities keep the real base rate; the forest
    balances classes itself (``class_weight``)."""
    model = make_model(algo, seed)
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
    return {k: v for k, v in model.get_params().items() if v is None or isinstance(v, bool | int | float | str)}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrainContext:
    """Everything the versions trained in one run share."""

    ds: Dataset
    X: np.ndarray
    split: Split
    data_spec: dict[str, Any]
    split_cfg: SplitConfig
    seed: int
    review_fpr: float
    decline_fpr: float
    command: str
    legit_fraction: float = 0.2
    show_progress: bool = True


@dataclass(frozen=True)
class _Built:
    """One fitted, converted, calibrated and evaluated model (a version's main model or its fallback)."""

    model: Any
    onnx: bytes
    attribution: Any  # TreeAttribution
    attribution_onnx: bytes
    thresholds: dict[str, float]
    onnx_diff: float
    metrics: dict[str, Any]  # {"test": ..., "calibration": ...}
    inference: dict[str, float]


def _build(ctx: TrainContext, name: str, algo: str, names: tuple[str, ...], columns: np.ndarray | None,
           what: str) -> _Built:
    """Fit ``algo`` on ``columns`` of the features (all when None), convert it and its path
    contributions to ONNX, calibrate the thresholds and evaluate it on the held-out weeks."""
    from fraudactors.modeling.attribution import build_attribution
    from fraudactors.modeling.attribution_onnx import attribution_onnx_bytes
    from fraudactors.modeling.scorer import make_session

    ds, split = ctx.ds, ctx.split
    X = ctx.X if columns is None else np.ascontiguousarray(ctx.X[:, columns])
    y_known = known_labels(ds, split.cutoff)
    y_fit = y_known[split.fit]
    s = step(f"fitting {name} ({algo}{what})", ctx.show_progress)
    model = fit_model(algo, ctx.seed, X[split.fit], y_fit, ctx.legit_fraction)
    s.done(f"on the {int(y_fit.sum()):,} frauds and {ctx.legit_fraction:.0%} of {int((~y_fit).sum()):,} legit rows")

    s = step(f"converting {name} to ONNX", ctx.show_progress)
    onnx_bytes = to_onnx_bytes(model, X.shape[1], "fraudactors_" + name.replace("-", "_"))
    session = make_session(onnx_bytes)
    parity_rows = X[split.test[: 20000]]
    with single_threaded_openmp():
        sk_rows = model.predict_proba(parity_rows)[:, 1]
    onnx_diff = float(np.abs(onnx_proba(session, parity_rows) - sk_rows).max()) if parity_rows.size else 0.0
    attribution = build_attribution(model, X.shape[1])
    attr_bytes = attribution_onnx_bytes(attribution, "fraudactors_" + name.replace("-", "_") + "_reasons")
    reasons_session = make_session(attr_bytes)
    s.done()

    s = step(f"evaluating {name} on the held-out weeks", ctx.show_progress)
    p_calib = onnx_proba(session, X[split.calib])
    calib_legit = ~y_known[split.calib]
    thresholds = {"review": threshold_for_fpr(p_calib[calib_legit], ctx.review_fpr),
                  "decline": threshold_for_fpr(p_calib[calib_legit], ctx.decline_fpr)}
    p_test = onnx_proba(session, X[split.test])
    test_metrics = evaluate_scores(ds.is_fraud[split.test], p_test, ds.scenario[split.test], thresholds)
    calib_metrics = evaluate_scores(y_known[split.calib], p_calib, ds.scenario[split.calib], thresholds)
    calib_metrics.pop("per_scenario", None)
    timings = measure_inference(session, reasons_session, X[split.test], names)
    s.done()
    return _Built(model=model, onnx=onnx_bytes, attribution=attribution, attribution_onnx=attr_bytes,
                  thresholds=thresholds, onnx_diff=onnx_diff,
                  metrics={"test": test_metrics, "calibration": calib_metrics}, inference=timings)


def _thresholds_meta(ctx: TrainContext, built: _Built) -> dict[str, Any]:
    return {
        "review": built.thresholds["review"], "decline": built.thresholds["decline"],
        "review_target_fpr": ctx.review_fpr, "decline_target_fpr": ctx.decline_fpr,
        "chosen_on": "calibration period, ONNX probabilities, labels known at the cut-off; flag when p >= threshold",
    }


def _attribution_meta(file: str, built: _Built) -> dict[str, Any]:
    from fraudactors.modeling.registry import sha256_bytes

    a = built.attribution
    return {"file": file, "sha256": sha256_bytes(built.attribution_onnx),
            "method": "Saabas tree path contributions (exact decomposition of the tree output), "
                      "as an ONNX TreeEnsembleRegressor with one target per feature",
            "input": "features", "output": "contributions", "space": a.space,
            "bias": a.bias, "trees": int(a.roots.size), "nodes": int(a.feature.size), "max_depth": a.depth}


def train_version(ctx: TrainContext, version: str, algo: str, out_dir: str | Path) -> dict[str, Any]:
    """Fit, convert, calibrate, evaluate and write ``out_dir/version`` -- the model and its
    fallback for degraded mode (the same algorithm on the transaction-only features, its own
    thresholds for the same target FPRs); returns the metadata."""
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
    if y_fit.sum() == 0 or y_fit.all():
        raise DataError(f"the fit period holds {int(y_fit.sum())} reported frauds out of {y_fit.size} "
                        "transactions; training needs both classes")
    main = _build(ctx, version, algo, FEATURE_NAMES, None, "")
    columns = np.array([FEATURE_INDEX[n] for n in TRANSACTION_ONLY], dtype=np.intp)
    fallback = _build(ctx, fallback_id(version), algo, TRANSACTION_ONLY, columns,
                      f", {len(TRANSACTION_ONLY)} transaction-only features")

    directory = Path(out_dir) / version
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / ATTRIBUTION_FILE, main.attribution_onnx)
    _write_atomic(directory / MODEL_FILE, main.onnx)
    _write_atomic(directory / FALLBACK_ATTRIBUTION_FILE, fallback.attribution_onnx)
    _write_atomic(directory / FALLBACK_FILE, fallback.onnx)
    unreported = ds.is_fraud[split.fit] & ~y_fit
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
        "thresholds": _thresholds_meta(ctx, main),
        "sha256": sha256_bytes(main.onnx),
        "onnx": {"file": MODEL_FILE, "input": ONNX_INPUT, "output": ONNX_OUTPUT, "bytes": len(main.onnx),
                 "opset": {"": 17, "ai.onnx.ml": 3}, "max_abs_diff_vs_sklearn": main.onnx_diff},
        "attribution": _attribution_meta(ATTRIBUTION_FILE, main),
        "metrics": main.metrics,
        "fallback": {
            "purpose": "degraded mode (feature store unreachable): the same algorithm on the features that "
                       "exist without the store, with its own thresholds for the same target FPRs",
            "file": FALLBACK_FILE,
            "sha256": sha256_bytes(fallback.onnx),
            "model_type": type(fallback.model).__name__,
            "params": _json_params(fallback.model),
            "n_iter": int(getattr(fallback.model, "n_iter_", 0)) or None,
            "feature_names": list(TRANSACTION_ONLY),
            "thresholds": _thresholds_meta(ctx, fallback),
            "onnx": {"input": ONNX_INPUT, "output": ONNX_OUTPUT, "bytes": len(fallback.onnx),
                     "max_abs_diff_vs_sklearn": fallback.onnx_diff},
            "attribution": _attribution_meta(FALLBACK_ATTRIBUTION_FILE, fallback),
            "metrics": fallback.metrics,
            "inference": fallback.inference,
        },
        "training": {
            "data": ctx.data_spec,
            "split": asdict(ctx.split_cfg),
            "periods": split.periods,
            "cutoff": _iso(split.cutoff),
            "rows": {"fit": int(split.fit.size), "calibration": int(split.calib.size), "test": int(split.test.size)},
            "fit_frauds_reported_by_cutoff": int(y_fit.sum()),
            "fit_frauds_unreported_at_cutoff": int(unreported.sum()),
            "fit_legit_fraction": ctx.legit_fraction,
        },
        "data_summary": ds.summary(),
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
