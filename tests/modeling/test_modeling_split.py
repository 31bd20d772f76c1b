"""The final refit's rows: fit up to the label cut-off, calibrate on recent legitimate rows it did not fit."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fraudactors.features.schema import Transaction, format_timestamp
from fraudactors.modeling.data import DAY_S, DataError, Dataset
from fraudactors.modeling.split import SplitConfig, final_split, known_labels, sample_legit

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
