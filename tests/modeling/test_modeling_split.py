"""The time split, the search's folds and the final refit's rows: which rows a model is fit, calibrated and
validated on, with the labels known when; the final refit fits up to the label cut-off and calibrates on
recent legitimate rows it did not fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fraudactors.features.schema import Transaction, format_timestamp
from fraudactors.modeling.data import DAY_S, DataError, Dataset
from fraudactors.modeling.pipeline import onnx_proba
from fraudactors.modeling.split import SplitConfig, final_split, known_labels, sample_legit, time_split

T0 = 1790812800.0


def _dataset(days: int, per_day: int = 200, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    times = np.sort(T0 + rng.random(days * per_day) * days * DAY_S)
    fraud = rng.random(times.size) < 0.05
    reported = np.where(fraud, times + rng.uniform(0, 10, times.size) * DAY_S, np.inf)
    txns = [Transaction(f"t{i}", f"u{i % 50}", "m", 1.0, "USD", "x", False, float(t), format_timestamp(float(t)))
            for i, t in enumerate(times.tolist())]
    return Dataset(txns, fraud, np.array(["s"] * times.size), reported)


@pytest.mark.parametrize("fraction", [0.2, 1.0])
def test_final_split_fits_up_to_the_label_cut_off_and_calibrates_on_rows_it_did_not_fit(fraction: float) -> None:
    ds = _dataset(40)
    cfg = SplitConfig(warmup_days=5, calib_days=6, gap_days=4, test_days=10)
    split = final_split(ds, cfg, fraction, seed=3)
    t = ds.event_time
    end = t[-1]
    assert split.cutoff == end
    assert t[split.fit].min() >= t[0] + 5 * DAY_S and t[split.fit].max() < end - 4 * DAY_S
    assert ((t[split.calib] >= end - 10 * DAY_S) & (t[split.calib] < end - 4 * DAY_S)).all()
    y = known_labels(ds, end)
    assert not y[split.calib].any()  # legitimate rows only
    fitted = split.fit[sample_legit(y[split.fit], fraction, 3)]  # what fit_model draws
    assert np.intersect1d(fitted, split.calib).size == 0
    window_legit = ((t >= end - 10 * DAY_S) & (t < end - 4 * DAY_S) & ~y).sum()
    share = split.calib.size / window_legit
    assert share == pytest.approx(1 - fraction if fraction < 1 else 0.5, abs=0.05)
    # every labelled row up to the cut-off is in the fit (but the calibration half, with fraction 1)
    expected = ((t >= t[0] + 5 * DAY_S) & (t < end - 4 * DAY_S)).sum() - (split.calib.size if fraction == 1 else 0)
    assert split.fit.size == expected
    # The calibration rows are exactly the window's rows legitimate as known at the last transaction
    # that the fit did not draw: a fraud reported after it counts as legitimate there too.
    window = (t >= end - 10 * DAY_S) & (t < end - 4 * DAY_S)
    assert np.array_equal(split.calib, np.setdiff1d(np.flatnonzero(window & ~y), fitted))
    reported_later = np.flatnonzero(window & ds.is_fraud & (ds.labeled_at > end))
    assert reported_later.size >= 5  # the data has such rows
    assert np.isin(reported_later, split.calib).any()


def test_final_split_needs_more_than_warm_up_calibration_and_gap() -> None:
    with pytest.raises(DataError, match="the final refit needs more than warm-up"):
        final_split(_dataset(10), SplitConfig(warmup_days=5, calib_days=3, gap_days=3), 0.2, 1)


def test_the_search_validates_before_the_cut_off_without_crossing_the_label_delay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fraudactors.cli import main as cli_main
    from fraudactors.modeling import search
    from fraudactors.modeling.registry import load_model_info

    monkeypatch.setitem(search.GRIDS, "hgb", {"max_leaf_nodes": (7, 15), "min_samples_leaf": (40,)})
    assert cli_main(["train", "--synthetic", "--seed", "3", "--users", "300", "--merchants", "250", "--days", "40",
                     "--warmup-days", "3", "--calib-days", "5", "--gap-days", "3", "--test-days", "7",
                     "--version", "v2", "--search", "--search-folds", "2", "--search-fold-days", "7", "--quiet",
                     "--out", str(tmp_path)]) == 0
    meta = load_model_info(tmp_path, "v2").metadata
    record = meta["hyperparameter_search"]
    assert [r["params"] for r in record["results"]] == [{"max_leaf_nodes": 31, "min_samples_leaf": 100},  # built in
                                                        {"max_leaf_nodes": 7, "min_samples_leaf": 40},
                                                        {"max_leaf_nodes": 15, "min_samples_leaf": 40}]
    assert len(record["folds"]) == 2
    assert {k: meta["params"][k] for k in record["best"]} == record["best"]  # the shipped model uses them
    cutoff = datetime.fromisoformat(meta["training"]["cutoff"])
    for fold in record["folds"]:
        fit_end, v_start, v_end = (datetime.fromisoformat(x) for x in (fold["fit"][1], *fold["validation"]))
        assert v_start - fit_end == timedelta(days=3)  # the label delay between fit and validation
        assert v_end - v_start == timedelta(days=7)
        assert v_end <= cutoff - timedelta(days=3)  # validation labels are in by the cut-off
    assert "--search --search-folds 2 --search-fold-days 7" in meta["command"]


def test_a_search_whose_folds_do_not_fit_the_data_fails_before_the_features(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from fraudactors.cli import main as cli_main
    from fraudactors.modeling import pipeline

    def no_features(*_args: Any) -> np.ndarray:
        raise AssertionError("features computed for a search that cannot run")

    monkeypatch.setattr(pipeline, "compute_features", no_features)
    # 40 days: the default three 12-day windows before the cut-off (day 33) leave no fit before them
    code = cli_main(["train", "--synthetic", "--seed", "3", "--users", "300", "--merchants", "250", "--days", "40",
                     "--warmup-days", "3", "--calib-days", "5", "--gap-days", "3", "--test-days", "7",
                     "--version", "v2", "--search", "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0
    assert "too short for 3 validation windows of 12 days" in err and "--search-folds" in err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------- the time split and its labels

HOUR_S = 3600.0


def _hourly(days: int, fraud: np.ndarray | None = None, reported: np.ndarray | None = None) -> Dataset:
    """One transaction an hour from T0 for ``days`` days: every period boundary falls on a row."""
    times = T0 + np.arange(days * 24) * HOUR_S
    txns = [Transaction(f"t{i}", f"u{i % 50}", "m", 1.0, "USD", "x", False, float(t), format_timestamp(float(t)))
            for i, t in enumerate(times.tolist())]
    fraud = np.zeros(times.size, dtype=bool) if fraud is None else fraud
    reported = np.full(times.size, np.inf) if reported is None else reported
    return Dataset(txns, fraud, np.array(["s"] * times.size), reported)


def test_the_time_split_periods_start_inclusive_end_exclusive_and_leave_the_gap_unused() -> None:
    ds = _hourly(40)  # rows at hours 0 .. 959
    split = time_split(ds.event_time, SplitConfig(warmup_days=5, calib_days=6, gap_days=4, test_days=10))
    # test: the last 10 days (hour 719 .. 959); gap: 4 days before (623 .. 718), never used;
    # calibration: 6 days before that (479 .. 622); fit: from the end of the warm-up (hour 120) to 478
    assert np.array_equal(split.fit, np.arange(120, 479))
    assert np.array_equal(split.calib, np.arange(479, 623))
    assert np.array_equal(split.test, np.arange(719, 960))
    assert split.cutoff == ds.event_time[719]  # the model is "trained" when the test period starts


def test_a_fraud_reported_after_the_cut_off_is_legitimate_in_the_fit_and_calibration() -> None:
    fraud = np.zeros(40 * 24, dtype=bool)
    reported = np.full(fraud.size, np.inf)
    split = time_split(_hourly(40).event_time, SplitConfig(warmup_days=5, calib_days=6, gap_days=4, test_days=10))
    cutoff = split.cutoff
    cases = {200: cutoff - 1, 201: cutoff, 202: cutoff + 1, 203: np.inf, 500: cutoff + 1, 501: cutoff - 60}
    for row, at in cases.items():
        fraud[row], reported[row] = True, at
    ds = _hourly(40, fraud, reported)
    y = known_labels(ds, cutoff)
    # reported before or at the cut-off: fraud; after it, or never: legitimate on that day
    assert [bool(y[row]) for row in cases] == [True, True, False, False, False, True]
    assert set(np.flatnonzero(y[split.fit])) == {200 - 120, 201 - 120}
    assert set(np.flatnonzero(y[split.calib])) == {501 - 479}


def test_the_legit_sample_keeps_every_fraud_and_a_seeded_share_of_the_legitimate_rows() -> None:
    y = np.arange(10000) % 10 == 0
    rows = sample_legit(y, 0.2, seed=5)
    assert y[rows].sum() == y.sum()  # every fraud
    assert (~y[rows]).sum() / (~y).sum() == pytest.approx(0.2, abs=0.02)
    assert np.array_equal(rows, sample_legit(y, 0.2, seed=5))
    assert np.array_equal(sample_legit(y, 1.0, seed=5), np.arange(y.size))


# ---------------------------------------------------------------------- the search's folds


SEARCH_CFG = SplitConfig(warmup_days=3, calib_days=5, gap_days=3, test_days=7)


def test_each_search_fold_fits_up_to_the_label_delay_before_its_validation_week() -> None:
    from fraudactors.modeling.search import folds

    ds = _hourly(60)  # hours 0 .. 1439; the cut-off at hour 1271, the validation weeks end 3 days before it
    split = time_split(ds.event_time, SEARCH_CFG)
    first, second = folds(ds, split, SEARCH_CFG, n_folds=2, fold_days=7)
    # oldest first: validation hours 863 .. 1030 then 1031 .. 1198 (1199 = the cut-off - 3 days);
    # each fit from the end of the warm-up (hour 72) to 3 days before its validation week
    assert np.array_equal(first.validation, np.arange(863, 1031))
    assert np.array_equal(first.fit, np.arange(72, 791))
    assert first.labels_at == ds.event_time[863]
    assert np.array_equal(second.validation, np.arange(1031, 1199))
    assert np.array_equal(second.fit, np.arange(72, 959))
    assert second.labels_at == ds.event_time[1031]


def test_the_default_search_fits_the_default_simulated_days() -> None:
    from fraudactors.modeling.search import folds
    from fraudactors.modeling.train import DEFAULT_DAYS, SEARCH_FOLD_DAYS, SEARCH_FOLDS

    ds = _hourly(int(DEFAULT_DAYS))  # the last row an hour before day 91, as the simulator's is
    chosen = folds(ds, time_split(ds.event_time, SplitConfig()), SplitConfig(), SEARCH_FOLDS, SEARCH_FOLD_DAYS)
    assert len(chosen) == SEARCH_FOLDS
    assert all(ds.event_time[f.fit[-1]] - ds.event_time[f.fit[0]] >= SEARCH_FOLD_DAYS * DAY_S - HOUR_S
               for f in chosen)


def test_the_search_refuses_folds_with_less_than_a_fold_of_fit() -> None:
    from fraudactors.modeling.search import folds

    ds = _hourly(30)  # the cut-off at hour 551: the older fold's fit would end (hour 71) before the warm-up does
    with pytest.raises(DataError, match="too short for 2 validation windows of 7 days"):
        folds(ds, time_split(ds.event_time, SEARCH_CFG), SEARCH_CFG, n_folds=2, fold_days=7)


def _result(params: dict[str, Any], detections: list[float]) -> dict[str, Any]:
    return {"params": params, "detection_at_max_fpr": detections, "mean_detection": float(np.mean(detections)),
            "mean_average_precision": 0.5}


def test_the_search_replaces_the_built_in_hyperparameters_only_with_a_configuration_better_in_every_fold() -> None:
    from fraudactors.modeling.search import choose

    built_in = {"depth": 16}
    kept = _result(built_in, [0.90, 0.88, 0.91])
    noisy = _result({"depth": 10}, [0.95, 0.87, 0.91])  # the best mean, but not better in two folds
    chosen, why = choose([kept, noisy], built_in)
    assert chosen is kept and why.startswith("built-in kept")
    steady = _result({"depth": 12}, [0.91, 0.89, 0.92])  # a smaller mean gain, in every fold
    assert choose([kept, steady], built_in)[0] is steady
    assert choose([kept, noisy, steady], built_in)[0] is kept  # the best mean is the one judged
    assert choose([noisy, steady], None)[0] is noisy  # nothing built in: the best mean
    assert choose([_result(built_in, [0.9, 0.9]), _result({"depth": 12}, [0.9, 0.9])], built_in)[0]["params"] == built_in


class _ColumnModel:
    """A stand-in model whose fraud probability is one column of X (``col``)."""

    def __init__(self, col: int) -> None:
        self.col = col

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = X[:, self.col].astype(np.float64)
        return np.column_stack([1 - p, p])


def test_the_search_fits_each_fold_on_labels_reported_by_its_validation_start_and_scores_against_the_cut_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fraudactors.modeling import pipeline, search

    n = 60 * 24
    fraud = (np.arange(n) % 12) == 5
    # half the frauds are reported within the hour, the others 20 days later
    late = fraud & ((np.arange(n) // 12) % 2 == 1)
    reported = np.where(fraud, T0 + np.arange(n) * HOUR_S + np.where(late, 20 * DAY_S, HOUR_S), np.inf)
    ds = _hourly(60, fraud, reported)
    split = time_split(ds.event_time, SEARCH_CFG)
    known_at_cutoff = known_labels(ds, split.cutoff)
    X = np.zeros((n, 2))
    X[:, 0] = known_at_cutoff  # column 0 finds exactly the frauds known at the cut-off; column 1 nothing
    fits: list[np.ndarray] = []

    def fake_fit(algo: str, seed: int, X_fit: np.ndarray, y_fit: np.ndarray, legit_fraction: float,
                 names: Sequence[str], params: Mapping[str, Any]) -> _ColumnModel:
        fits.append(np.asarray(y_fit).copy())
        return _ColumnModel(params["col"])

    monkeypatch.setattr(pipeline, "fit_model", fake_fit)
    monkeypatch.setitem(search.GRIDS, "col", {"col": (1, 0)})
    best, record = search.search(ds, X, split, SEARCH_CFG, "col", seed=1, legit_fraction=1.0,
                                 feature_names=("a", "b"), n_folds=2, fold_days=7, show_progress=False)
    assert best == {"col": 0}  # the configuration that detects the frauds, not the one that does not
    by_col = {r["params"]["col"]: r for r in record["results"]}
    # validation truth is what is known at the cut-off: a fraud reported later counts as legitimate,
    # so column 0 detects every validation fraud (and flags nothing else)
    assert by_col[0]["detection_at_max_fpr"] == [1.0, 1.0]
    assert by_col[1]["mean_detection"] == 0.0
    chosen = search.folds(ds, split, SEARCH_CFG, n_folds=2, fold_days=7)
    assert len(fits) == 2 * len(chosen)
    for y_fit, fold in zip(fits, [*chosen, *chosen], strict=True):
        expected = known_labels(ds, fold.labels_at)[fold.fit]
        assert np.array_equal(y_fit, expected)  # the labels reported by the fold's validation start
        assert (known_at_cutoff[fold.fit] & ~expected).any()  # ... fewer than the cut-off knows


# ---------------------------------------------------------------------- the fit and calibration of a model


def test_the_time_split_model_is_fit_and_calibrated_on_the_labels_known_at_the_cut_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fraud in the fit or calibration period reported after the cut-off is legitimate there:
    fit as legitimate, and a legitimate row among the calibration scores the thresholds are set on."""
    from fraudactors.modeling import pipeline
    from fraudactors.modeling.metrics import threshold_for_fpr
    from fraudactors.modeling.scorer import make_session

    n = 40 * 24
    rows = np.arange(n)
    fraud = rows % 10 == 3
    late = fraud & ((rows // 10) % 2 == 1)  # every other fraud is reported 100 days later
    reported = np.where(fraud, T0 + rows * HOUR_S + np.where(late, 100 * DAY_S, HOUR_S), np.inf)
    ds = _hourly(40, fraud, reported)
    cfg = SplitConfig(warmup_days=5, calib_days=6, gap_days=4, test_days=10)
    split = time_split(ds.event_time, cfg)
    X = np.column_stack([fraud.astype(np.float64), np.random.default_rng(0).random(n), rows % 7])
    fitted: list[np.ndarray] = []
    real_fit = pipeline.fit_model

    def recording_fit(algo: str, seed: int, X_fit: np.ndarray, y_fit: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        fitted.append(np.asarray(y_fit).copy())
        return real_fit(algo, seed, X_fit, y_fit, *args, **kwargs)

    monkeypatch.setattr(pipeline, "fit_model", recording_fit)
    ctx = pipeline.TrainContext(ds=ds, X=X, split=split, final=None, data_spec={}, split_cfg=cfg, seed=1,
                                review_fpr=0.02, decline_fpr=0.01, command="test", legit_fraction=1.0,
                                show_progress=False)
    built = pipeline._build(ctx, split, "t", "rf", ("a", "b", "c"), None, "",
                            {"n_estimators": 5, "max_depth": 3, "min_samples_leaf": 1})
    known = known_labels(ds, split.cutoff)
    [y_fit] = fitted
    assert np.array_equal(y_fit, known[split.fit])
    assert (ds.is_fraud[split.fit] & ~y_fit).any()  # the late-reported frauds were fit as legitimate
    p_calib = onnx_proba(make_session(built.onnx), X[split.calib])
    legit_at_cutoff = threshold_for_fpr(p_calib[~known[split.calib]], 0.02)
    assert built.thresholds["review"] == legit_at_cutoff
    assert threshold_for_fpr(p_calib[~ds.is_fraud[split.calib]], 0.02) != legit_at_cutoff  # tells them apart
    # the held-out weeks are scored against ground truth, every fraud reported or not
    assert built.metrics["test"]["frauds"] == int(ds.is_fraud[split.test].sum())
