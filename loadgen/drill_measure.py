"""What a fault drill measures, as pure functions of the run's arrays and the engines' logs.

Windows are 1 s of *scheduled* send time on the run clock (``[k, k + 1)``): a window holds the
transactions due in it, decided or not, and its p99 is taken over all of them with an undecided
one counting as infinitely late (nearest rank: the smallest latency that at least 99 % of the
window's transactions do not exceed). So a window that lost more than 1 % of its transactions is
never "good", and a window whose decisions were delayed by the fault is judged by their delay.

Recovery (``recovery``): the pre-fault p99 is the same statistic over every transaction due in a
baseline period before the injection (``fraudactors drill``: from a quarter of the fault time to one
second before the injection, since what is in flight when the fault hits is already its effect);
a window is good when its p99 is at most ``factor`` times
that; the fault has recovered at the first window starting at or after the moment the fault was
cleared that is good and is followed by ``hold - 1`` more good windows (``hold`` in a row, all
within the send period). Time to recover = that window's start minus the clear time. Not
recovered (None) when no such run of windows exists before the load stops.

Detection: the first event of the named kinds in an engine's JSON log (structlog's ISO UTC
``timestamp``) at or after the injection, on the same wall clock as the drill's timeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson


@dataclass(frozen=True)
class Window:
    start_s: float
    sent: int
    decided: int
    p99_ms: float  # inf when more than 1 % of the window is undecided; nan for an empty window
    engine_p99_ms: float = math.nan  # the engine's own part (each decision's latency_ms), decided only

    def good(self, threshold_ms: float) -> bool:
        return self.sent > 0 and self.p99_ms <= threshold_ms

    def as_dict(self) -> dict[str, Any]:
        p99 = None if not math.isfinite(self.p99_ms) else round(self.p99_ms, 1)
        engine = None if not math.isfinite(self.engine_p99_ms) else round(self.engine_p99_ms, 1)
        return {"t": self.start_s, "sent": self.sent, "decided": self.decided, "p99_ms": p99,
                "engine_p99_ms": engine}


def p99_nearest_rank(latency_ms: np.ndarray) -> float:
    """p99 of ``latency_ms`` with NaN (undecided) as +inf; nan when empty."""
    n = len(latency_ms)
    if n == 0:
        return math.nan
    values = np.sort(np.where(np.isnan(latency_ms), np.inf, latency_ms))
    return float(values[max(math.ceil(0.99 * n) - 1, 0)])


def latency_windows(scheduled_s: np.ndarray, latency_ms: np.ndarray, end_s: float, width_s: float = 1.0,
                    engine_ms: np.ndarray | None = None) -> list[Window]:
    """One :class:`Window` per ``width_s`` of scheduled time from 0 to ``end_s`` (the send period)."""
    count = max(math.ceil(end_s / width_s - 1e-9), 0)
    index = np.floor(scheduled_s / width_s).astype(np.int64)
    out: list[Window] = []
    for k in range(count):
        mask = index == k
        lat = latency_ms[mask]
        engine = math.nan
        if engine_ms is not None:
            own = engine_ms[mask]
            own = own[np.isfinite(own)]
            engine = p99_nearest_rank(own) if own.size else math.nan
        out.append(Window(round(k * width_s, 6), int(mask.sum()), int(np.isfinite(lat).sum()),
                          p99_nearest_rank(lat), engine))
    return out


def baseline_p99(scheduled_s: np.ndarray, latency_ms: np.ndarray, from_s: float, to_s: float) -> float:
    """The pre-fault p99: over every transaction due in ``[from_s, to_s)``."""
    mask = (scheduled_s >= from_s) & (scheduled_s < to_s)
    return p99_nearest_rank(latency_ms[mask])


@dataclass(frozen=True)
class Recovery:
    baseline_p99_ms: float
    factor: float
    hold: int
    threshold_ms: float
    window: Window | None  # the first window of the run of good ones; None: not recovered
    seconds: float | None  # window start - cleared_s
    worst_p99_ms: float  # the worst window p99 from the injection on (inf: a window lost > 1 %)

    def as_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return round(x, 1) if math.isfinite(x) else None

        return {"seconds": None if self.seconds is None else round(self.seconds, 2),
                "recovered": self.window is not None,
                "at_s": None if self.window is None else self.window.start_s,
                "baseline_p99_ms": num(self.baseline_p99_ms), "factor": self.factor,
                "threshold_ms": num(self.threshold_ms), "hold_windows": self.hold,
                "worst_window_p99_ms": num(self.worst_p99_ms),
                "worst_window_undecided": math.isinf(self.worst_p99_ms)}


def recovery(windows: Sequence[Window], baseline_ms: float, injected_s: float, cleared_s: float,
             factor: float = 1.5, hold: int = 5) -> Recovery:
    """See the module docstring. ``baseline_ms`` must be finite (a fault before any clean window
    has nothing to recover to: no recovery)."""
    threshold = factor * baseline_ms if math.isfinite(baseline_ms) else math.nan
    after_fault = [w.p99_ms for w in windows if w.start_s + 1e-9 >= math.floor(injected_s) and w.sent]
    worst = max(after_fault) if after_fault else math.nan
    found: Window | None = None
    if math.isfinite(threshold):
        candidates = [i for i, w in enumerate(windows) if w.start_s + 1e-9 >= cleared_s]
        for i in candidates:
            run = windows[i:i + hold]
            if len(run) == hold and all(w.good(threshold) for w in run):
                found = windows[i]
                break
    seconds = None if found is None else found.start_s - cleared_s
    return Recovery(baseline_ms, factor, hold, threshold, found, seconds, worst)


# -- engine logs ------------------------------------------------------------------------------------

def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of an engine log that carry an ``event`` and a ``timestamp``, each with
    ``_t`` (epoch seconds); other lines (a library's plain-text warnings) are skipped."""
    out: list[dict[str, Any]] = []
    try:
        data = Path(path).read_bytes()
    except OSError:
        return out
    for line in data.splitlines():
        if not line.startswith(b"{"):
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict) or "event" not in event or "timestamp" not in event:
            continue
        try:
            event["_t"] = datetime.fromisoformat(str(event["timestamp"])).timestamp()
        except ValueError:
            continue
        out.append(event)
    return out


def first_event(events: Iterable[dict[str, Any]], names: Iterable[str], after_t: float) -> dict[str, Any] | None:
    """The earliest event named in ``names`` at or after ``after_t`` (epoch seconds)."""
    wanted = set(names)
    hits = [e for e in events if e.get("event") in wanted and e["_t"] >= after_t]
    return min(hits, key=lambda e: e["_t"]) if hits else None
