"""observe_many: a batch of values lands in the same buckets as observing them one by one."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Histogram

from fraudactors.engine import metrics as engine_metrics
from fraudactors.engine.metrics import observe_many

BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)


def _samples(h: Histogram, registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in registry.collect() for s in metric.samples if not s.name.endswith("_created")}


def _pair(labels: bool) -> tuple[tuple[Histogram, CollectorRegistry], tuple[Histogram, CollectorRegistry]]:
    out = []
    for _ in range(2):
        r = CollectorRegistry()
        out.append((Histogram("x_seconds", "x", ["v"] if labels else [], buckets=BOUNDS, registry=r), r))
    return out[0], out[1]


def test_the_same_buckets_count_and_sum_as_one_by_one() -> None:
    rng = random.Random(5)
    values = [rng.lognormvariate(-4, 2) for _ in range(2_000)]
    values += [*BOUNDS, 0.0, -1.0, 1e9, math.inf, math.nextafter(0.1, 1.0), math.nextafter(0.1, 0.0)]
    for labels in (False, True):
        (a, ra), (b, rb) = _pair(labels)
        one, many = (a.labels("A"), b.labels("A")) if labels else (a, b)
        for v in values:
            one.observe(v)
        for start in range(0, len(values), 300):  # several batches, one of them short
            observe_many(many, values[start:start + 300])
        observe_many(many, [])
        sa, sb = _samples(a, ra), _samples(b, rb)
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if key[0].endswith("_sum"):
                assert math.isclose(sb[key], value, rel_tol=1e-9)
            else:
                assert sb[key] == value, key  # buckets and count exactly


def test_a_nan_counts_in_no_bucket_like_observe() -> None:
    (a, ra), (b, rb) = _pair(False)
    values = [0.003] * 10 + [math.nan]
    for v in values:
        a.observe(v)
    observe_many(b, values)
    sa, sb = _samples(a, ra), _samples(b, rb)
    for key, value in sa.items():
        if key[0].endswith("_sum"):
            assert math.isnan(value) and math.isnan(sb[key])
        else:
            assert sb[key] == value, key


def test_the_fast_path_is_taken_with_the_installed_prometheus_client() -> None:
    """If prometheus_client renames its histogram fields, observe_many silently falls back to a
    loop: this test makes that visible instead."""
    (a, _), _ = _pair(False)
    calls = []
    original = Histogram.observe

    def counted(self: Histogram, amount: float, exemplar: object = None) -> None:
        calls.append(amount)
        original(self, amount)

    Histogram.observe = counted  # type: ignore[method-assign]
    try:
        observe_many(a, [0.01] * (engine_metrics._OBSERVE_MANY_MIN + 5))
    finally:
        Histogram.observe = original  # type: ignore[method-assign]
    assert calls == []
