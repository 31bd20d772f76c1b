"""The rows a committed model is evaluated on: transactions it was never fit or calibrated on.

- A model shipped from the time split (``train --no-refit``): the time split's held-out weeks.
- A model refit on all labelled data (the default): the transactions *after* its training data.
  For the simulator these are the next ``test_days`` days of the same seeded world (the stream
  continues the training data exactly: same seed, same first days); for a file, the rows of the
  file given to ``evaluate --data`` that are later than the training data's last transaction
  (the older rows only build the feature state).

The features are recomputed point in time over the whole data, as in training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fraudactors.errors import ModelError
from fraudactors.modeling.data import DAY_S


@dataclass(frozen=True)
class EvalSet:
    X: np.ndarray
    is_fraud: np.ndarray
    scenario: np.ndarray
    cards: np.ndarray  # user_id per row
    days: np.ndarray  # UTC day number per row
    window: str  # what the rows are, for the reader


def _iso_day(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")


def evaluation_key(metadata: Mapping[str, Any]) -> str:
    """Models with the same key are evaluated on the same rows (computed once)."""
    training = metadata.get("training")
    if not isinstance(training, dict):
        raise ModelError(f"model {metadata.get('version')}: metadata.json has no 'training' section to rebuild "
                         "the evaluation rows")
    final = metadata.get("final_fit") or {}
    end = final.get("data_end_epoch") if final.get("refit") else None
    return json.dumps({"data": training.get("data"), "split": training.get("split"), "after": end}, sort_keys=True)


def evaluation_set(metadata: Mapping[str, Any], data_path: str | None = None, show_progress: bool = True) -> EvalSet:
    """The rows to evaluate a model with this metadata on (module doc)."""
    from fraudactors.modeling.pipeline import cards_and_days, compute_features, load_dataset
    from fraudactors.modeling.split import SplitConfig, time_split

    evaluation_key(metadata)  # the training section is there
    training = metadata["training"]
    final = metadata.get("final_fit") or {}
    spec = dict(training["data"])
    cfg = SplitConfig(**training["split"])
    if not final.get("refit"):
        ds = load_dataset(spec, data_path, show_progress)
        X = compute_features(ds, show_progress)
        split = time_split(ds.event_time, cfg)
        rows = split.test
        window = f"the time split's held-out weeks ({split.periods['test'][0][:16]} .. {split.periods['test'][1][:16]})"
    else:
        end = float(final["data_end_epoch"])
        if spec["kind"] == "synthetic":
            spec["days"] = float(spec["days"]) + cfg.test_days
        ds = load_dataset(spec, data_path, show_progress)
        after = np.flatnonzero(ds.event_time > end)
        if after.size == 0 or ds.event_time[after[-1]] - ds.event_time[after[0]] < DAY_S:
            raise ModelError(
                f"model {metadata.get('version')} was refit on all its data up to {_iso_day(end)} UTC: evaluate it "
                "with --data FILE holding at least a day of later transactions (and the history before them); "
                "its time-split evaluation is in metadata.json ('metrics')")
        X = compute_features(ds, show_progress)
        rows = after
        what = f"the {cfg.test_days:g} days after the training data" if spec["kind"] == "synthetic" \
            else "the transactions after the training data"
        window = f"{what} ({_iso_day(ds.event_time[rows[0]])} .. {_iso_day(ds.event_time[rows[-1]])})"
    cards, days = cards_and_days(ds, rows)
    return EvalSet(X=X[rows], is_fraud=ds.is_fraud[rows], scenario=ds.scenario[rows], cards=cards, days=days,
                   window=window)
