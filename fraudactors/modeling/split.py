"""Which rows a model is fitted, calibrated and evaluated on (days counted back from the last transaction).

The time split, on which the algorithm, its hyperparameters and the evaluation are decided::

    | warm-up | fit weeks ............ | calibration | gap | test (held out) |
                                                          ^ cut-off: the model is "trained" here

- warm-up: transactions only build feature state (windows up to 30 days start empty);
- fit: the model learns from these, with the labels known at the cut-off (a fraud reported after
  the cut-off, or never, counts as legitimate: the model cannot know better on that day);
- calibration: the review / decline thresholds are chosen here for their target false-positive
  rates, on the ONNX model's own probabilities;
- gap: the label delay; nothing from it is used;
- test: never seen; all reported metrics are computed here, against ground truth.

The final split, on which the shipped model is refit once those choices are made::

    | warm-up | fit ........................................ | label delay |
                                         | recent window |               ^ the last transaction
                                                         ^ label cut-off

- fit: every row from the end of the warm-up to the label cut-off, with the labels known at the
  last transaction; the last ``gap_days`` (the label delay) are left out: their frauds are mostly
  not reported yet and would be learnt as legitimate;
- calibration: the thresholds are chosen on the most recent labelled window (``calib_days``
  before the label cut-off), on its legitimate rows the fit did not use: the fit takes every fraud
  but only a seeded share of the legitimate rows (``legit_fraction``), so the others are unseen
  by the model (with ``legit_fraction`` 1, a seeded half of the window's legitimate rows is kept
  out of the fit for this).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from fraudactors.modeling.data import DAY_S, DataError, Dataset


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
    test: np.ndarray  # empty for the final split
    cutoff: float  # the labels known at this time are the ones the fit and calibration use
    periods: dict[str, list[str]]


def iso(t: float) -> str:
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
    periods = {"fit": [iso(fit_start), iso(calib_start)], "calibration": [iso(calib_start), iso(calib_end)],
               "gap": [iso(calib_end), iso(test_start)], "test": [iso(test_start), iso(t1)]}
    return Split(fit=fit, calib=calib, test=test, cutoff=test_start, periods=periods)


def known_labels(ds: Dataset, cutoff: float) -> np.ndarray:
    """Ground truth as known at ``cutoff``: fraud reported at or before it."""
    return ds.is_fraud & (ds.labeled_at <= cutoff)


def sample_legit(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices into ``y``: every fraud and a seeded ``fraction`` of the legitimate rows."""
    if fraction >= 1.0:
        return np.arange(y.size)
    keep = y | (np.random.default_rng([seed, 2]).random(y.size) < fraction)
    return np.flatnonzero(keep)


def final_split(ds: Dataset, cfg: SplitConfig, legit_fraction: float, seed: int) -> Split:
    """The rows of the final refit (module doc): ``fit`` are the rows the model is fitted on --
    :func:`sample_legit` of them with ``legit_fraction`` and ``seed``, as ``fit_model`` draws them --
    and ``calib`` the legitimate rows of the most recent labelled window that sample leaves out."""
    times = ds.event_time
    t0, t1 = float(times[0]), float(times[-1])
    label_cutoff = t1 - cfg.gap_days * DAY_S
    window_start = label_cutoff - cfg.calib_days * DAY_S
    fit_start = t0 + cfg.warmup_days * DAY_S
    if fit_start >= window_start:
        raise DataError(f"the data spans {(t1 - t0) / DAY_S:.1f} days; the final refit needs more than "
                        f"warm-up + calibration + gap = {cfg.warmup_days + cfg.calib_days + cfg.gap_days:g} days")
    idx = np.arange(times.size)
    y = known_labels(ds, t1)
    fit = idx[(times >= fit_start) & (times < label_cutoff)]
    window = (times >= window_start) & (times < label_cutoff) & ~y
    if legit_fraction >= 1.0:
        held = window & (np.random.default_rng([seed, 3]).random(times.size) < 0.5)
        fit = fit[~held[fit]]
        calib = idx[held]
    else:
        used = np.zeros(times.size, dtype=bool)
        used[fit[sample_legit(y[fit], legit_fraction, seed)]] = True
        calib = idx[window & ~used]
    periods = {"fit": [iso(fit_start), iso(label_cutoff)], "calibration": [iso(window_start), iso(label_cutoff)],
               "left_out_label_delay": [iso(label_cutoff), iso(t1)]}
    return Split(fit=fit, calib=calib, test=idx[:0], cutoff=t1, periods=periods)
