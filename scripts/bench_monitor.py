"""The model monitor's cost on the inference path: ModelMonitor.observe per coalesced call, two
versions (v1 90 %, v2 10 % of the rows), 40 features of 10 reference bins each. Prints the median
microseconds per call and per row; not a test. Run: .venv/bin/python scripts/bench_monitor.py"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.monitor import ModelMonitor
from fraudactors.features.definition import FEATURE_NAMES
from fraudactors.modeling.reference import build_reference, parse_reference
from fraudactors.modeling.registry import ModelInfo
from fraudactors.settings import MonitorSettings


def main() -> None:
    rng = np.random.default_rng(0)
    X = rng.lognormal(0, 1, (50_000, len(FEATURE_NAMES))).astype(np.float32)
    X[:, 2] = rng.random(50_000) < 0.1
    scores = rng.beta(0.5, 10, 50_000)
    section = json.loads(json.dumps(build_reference(X, np.arange(50_000), FEATURE_NAMES, scores, None, what={})))
    reference = parse_reference(section, FEATURE_NAMES)
    infos = [ModelInfo(version=v, directory=Path("."), feature_names=FEATURE_NAMES, review_threshold=0.5,
                       decline_threshold=0.9, sha256="", metadata={}, reference=reference) for v in ("v1", "v2")]
    monitor = ModelMonitor(MonitorSettings(min_rows=100), EngineMetrics(), infos)
    t0 = 1.795e9
    for n in (16, 64, 256, 1024):
        idx = np.arange(n)
        rows_of = {"v1": idx[idx % 10 != 0], "v2": idx[idx % 10 == 0]}
        degraded = np.zeros(n, dtype=bool)
        times = []
        for r in range(max(20, 20_000 // n)):
            event_times = t0 + (r * n + idx) * 0.01
            start = time.perf_counter()
            monitor.observe(X[:n], rows_of, scores[:n], degraded, event_times)
            times.append(time.perf_counter() - start)
        median = float(np.median(times[5:]))
        print(f"{n:5d} rows per call: {median * 1e6:8.1f} us per call, {median / n * 1e6:6.2f} us per row")


if __name__ == "__main__":
    main()
