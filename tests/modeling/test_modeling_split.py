"""The time split, the search's folds and the final refit's rows: which rows a model is fit, calibrated and
validated on, with the labels known when; the final refit fits up to the label cut-off and calibrates on
recent legitimate rows it did not fit."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fraudactors.features.schema import Transaction, format_timestamp
from fraudactors.modeling.data import DAY_S, DataError, Dataset
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
                     "--version", "v2", "--search", "--quiet", "--out", str(tmp_path)]) == 0
    meta = load_model_info(tmp_path, "v2").metadata
    record = meta["hyperparameter_search"]
    assert [r["params"] for r in record["results"]] == [{"max_leaf_nodes": 7, "min_samples_leaf": 40},
                                                        {"max_leaf_nodes": 15, "min_samples_leaf": 40}]
    assert {k: meta["params"][k] for k in record["best"]} == record["best"]  # the shipped model uses them
    cutoff = datetime.fromisoformat(meta["training"]["cutoff"])
    for fold in record["folds"]:
        fit_end, v_start, v_end = (datetime.fromisoformat(x) for x in (fold["fit"][1], *fold["validation"]))
        assert v_start - fit_end == timedelta(days=3)  # the label delay between fit and validation
        assert v_end <= cutoff - timedelta(days=3)  # validation labels are in by the cut-off
    assert "--search" in meta["command"]


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
