"""The model monitor on its own: PSI against a training reference over an event-time window.

A reference is built (as training builds it) from rows of a known distribution; the monitor then
sees rows from the same distribution (PSI stays low), rows with the amount tripled (PSI of the
amount passes 0.2, the others stay), rows that left the window, a model without a reference.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import metric_samples
from structlog.testing import capture_logs

from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.monitor import CALENDAR_FEATURES, EventTimeRing, ModelMonitor
from fraudactors.modeling.reference import build_reference, parse_reference, psi
from fraudactors.modeling.registry import FallbackInfo, ModelInfo, fallback_id, load_model_info
from fraudactors.settings import MonitorSettings

NAMES = ("amount", "is_international", "tx_count_24h")
T0 = 1_795_000_000.0


def rows(rng: np.random.Generator, n: int, amount_scale: float = 1.0) -> np.ndarray:
    return np.column_stack([rng.lognormal(3.5, 1.0, n) * amount_scale, rng.random(n) < 0.1,
                            rng.poisson(3.0, n)]).astype(np.float32)


def scores(X: np.ndarray) -> np.ndarray:
    """A stand-in model: the score rises with the amount."""
    return 1.0 / (1.0 + np.exp(-(np.log1p(X[:, 0].astype(np.float64)) - 6.0)))


def model_info(reference: bool = True, offline: float | None = 0.9, fallback: bool = False) -> ModelInfo:
    rng = np.random.default_rng(1)
    X = rows(rng, 50_000)
    contrib = np.column_stack([X[:, 0], np.zeros(len(X)), X[:, 2] * 0.1]).astype(np.float64)
    section = build_reference(X, np.arange(len(X)), NAMES, scores(X), contrib, what={},
                              fallback_scores=scores(X) if fallback else None)
    section = json.loads(json.dumps(section))  # as metadata.json holds it
    metadata = {"metrics": {"test": {"at_thresholds": {"review": {"detection_rate": offline}}}}}
    return ModelInfo(version="v9", directory=Path("."), feature_names=NAMES, review_threshold=0.5,
                     decline_threshold=0.9, sha256="", metadata=metadata,
                     reference=parse_reference(section, NAMES) if reference else None,
                     reference_problem=None if reference else "metadata.json has no 'reference' section",
                     fallback=FallbackInfo(fallback_id("v9"), Path("fallback.onnx"), "", NAMES[:2], 0.5, 0.9,
                                           None, None) if fallback else None)


def observe(monitor: ModelMonitor, X: np.ndarray, t0: float, step: float = 1.0, degraded: bool = False) -> None:
    n = len(X)
    monitor.observe(X, {"v9": (np.arange(n), scores(X))}, np.full(n, degraded), t0 + step * np.arange(n))


SETTINGS = MonitorSettings(window_s=3600.0, sub_windows=6, min_rows=500, top_features=1)


def test_reference_bins_are_deduplicated_quantiles_and_shares_add_up() -> None:
    info = model_info()
    assert info.reference is not None
    amount = info.reference.features["amount"]
    assert amount.edges.size == 9 and np.allclose(amount.shares, 0.1, atol=0.01)
    flag = info.reference.features["is_international"]  # 90 % zeros: bins <= 0 and > 0
    assert flag.edges.tolist() == [0.0] and flag.shares == pytest.approx([0.9, 0.1], abs=0.01)
    assert info.reference.top_features[0] == "amount"
    for hist in (*info.reference.features.values(), info.reference.score):
        assert hist.shares.sum() == pytest.approx(1.0, abs=1e-4)
    assert psi(np.array([50, 50]), np.array([0.5, 0.5])) == 0.0
    assert psi(np.array([90, 10]), np.array([0.5, 0.5])) == pytest.approx(0.4 * np.log(9), rel=1e-6)


def test_the_same_distribution_stays_low_and_tripled_amounts_pass_the_threshold() -> None:
    metrics = EngineMetrics()
    monitor = ModelMonitor(SETTINGS, metrics, [model_info()])
    rng = np.random.default_rng(2)
    observe(monitor, rows(rng, 499), T0)
    assert monitor.psi("v9") is None, "below min_rows: no figure"
    assert "fraudactors_score_psi" not in metric_samples(metrics.render())
    observe(monitor, rows(rng, 1500), T0 + 499)
    normal = monitor.psi("v9")
    assert normal is not None and max(normal.values()) < 0.05, normal
    # An hour later (a window) of tripled amounts: the amount and the score move, the rest stays.
    observe(monitor, rows(rng, 2000, amount_scale=3.0), T0 + 4000)
    drifted = monitor.psi("v9")
    assert drifted is not None
    assert drifted["amount"] > 0.2 and drifted["score"] > 0.2, drifted
    assert drifted["is_international"] < 0.05 and drifted["tx_count_24h"] < 0.05, drifted
    samples = metric_samples(metrics.render())
    feature = samples["fraudactors_feature_psi"]
    assert feature[(("feature", "amount"), ("top", "true"), ("version", "v9"))] == pytest.approx(drifted["amount"])
    assert feature[(("feature", "tx_count_24h"), ("top", "false"), ("version", "v9"))] < 0.05
    assert samples["fraudactors_score_psi"][(("version", "v9"),)] == pytest.approx(drifted["score"])
    assert samples["fraudactors_model_offline_detection_rate"][(("version", "v9"),)] == 0.9


def test_rows_older_than_the_window_leave_it_and_late_rows_are_not_counted() -> None:
    ring = EventTimeRing(slots=4, slot_s=10.0, width=2)
    ring.add(np.array([0.0, 5.0, 15.0]), np.array([[0], [0], [1]]))
    assert ring.totals()[0] == 3
    ring.add(np.array([35.0]), np.array([[1]]))  # sub-windows 0..3 in the window
    assert ring.totals() == (4, pytest.approx([2, 2]))
    ring.add(np.array([45.0]), np.array([[1]]))  # sub-window 0 leaves
    assert ring.totals()[0] == 3 and ring.totals()[1].tolist() == [0, 3]
    ring.add(np.array([2.0]), np.array([[0]]))  # older than the window: dropped
    assert ring.totals()[0] == 3


def test_the_degraded_share_is_over_the_window_and_degraded_rows_only_feed_the_fallbacks_score() -> None:
    """Degraded rows carry stand-ins for the missing state: they count in the degraded share and
    the fallback's score PSI, never in the model's window, and the fallback has no feature PSI
    (a drift alert on stand-in values would be false)."""
    metrics = EngineMetrics()
    monitor = ModelMonitor(SETTINGS, metrics, [model_info(fallback=True)])
    rng = np.random.default_rng(3)
    X = rows(rng, 1000)
    fallback = fallback_id("v9")
    observe(monitor, X, T0)  # 1000 normal rows
    before = monitor.psi("v9")
    # then 600 degraded ones, the amounts tripled (as stand-ins could make them look)
    degraded = X[:600] * np.float32(3.0)
    monitor.observe(degraded, {fallback: (np.arange(600), scores(degraded))}, np.full(600, True),
                    T0 + 1000 + np.arange(600))
    samples = metric_samples(metrics.render())
    assert samples["fraudactors_degraded_share"][()] == pytest.approx(600 / 1600)
    assert monitor.psi("v9") == before, "degraded rows entered the model's window"
    after = monitor.psi(fallback)
    assert after is not None and set(after) == {"score"} and after["score"] > 0.2
    assert {dict(k)["version"] for k in samples["fraudactors_feature_psi"]} == {"v9"}
    assert (("version", fallback),) in samples["fraudactors_score_psi"]
    # a window later, with no degraded rows, the share is back at 0, and the fallback, which
    # scored nothing since, has no figure left (its score PSI would otherwise alert for good)
    observe(monitor, X, T0 + 10_000)
    samples = metric_samples(metrics.render())
    assert samples["fraudactors_degraded_share"][()] == 0.0
    assert monitor.psi(fallback) is None
    assert set(samples["fraudactors_score_psi"]) == {(("version", "v9"),)}


def test_a_shadow_variants_scores_of_the_same_rows_fill_its_own_window() -> None:
    """A row decided by v9 and scored by the shadow v10: each version's score PSI is of its own
    probabilities, the rows count once in the degraded share; v10 has a window before it decides."""
    metrics = EngineMetrics()
    shadow = dataclasses.replace(model_info(), version="v10")
    monitor = ModelMonitor(SETTINGS, metrics, [model_info(), shadow])
    X = rows(np.random.default_rng(5), 1000)
    everything = np.arange(len(X))
    # the shadow scores every row as if its amounts were three times larger
    monitor.observe(X, {"v9": (everything, scores(X)), "v10": (everything, scores(X * np.float32(3.0)))},
                    np.full(len(X), False), T0 + everything)
    v9, v10 = monitor.psi("v9"), monitor.psi("v10")
    assert v9 is not None and v10 is not None
    assert v9["score"] < 0.1 < 0.2 < v10["score"]
    assert v9["amount"] == v10["amount"], "the same rows: the same features"
    samples = metric_samples(metrics.render())
    assert samples["fraudactors_score_psi"][(("version", "v10"),)] == pytest.approx(v10["score"])
    assert samples["fraudactors_degraded_share"][()] == 0.0


def test_rows_without_an_event_time_are_not_counted() -> None:
    monitor = ModelMonitor(SETTINGS, EngineMetrics(), [model_info()])
    X = rows(np.random.default_rng(4), 600)
    times = T0 + np.arange(600.0)
    times[:200] = np.nan
    monitor.observe(X, {"v9": (np.arange(600), scores(X))}, np.full(600, False), times)
    assert monitor.psi("v9") is None  # 400 < min_rows


def test_a_model_without_a_reference_is_reported_and_scores_on_without_psi() -> None:
    metrics = EngineMetrics()
    with capture_logs() as logs:
        monitor = ModelMonitor(SETTINGS, metrics, [model_info(reference=False)])
    missing = [e for e in logs if e["event"] == "model_reference_missing"]
    assert [e["version"] for e in missing] == ["v9"] and "no 'reference' section" in missing[0]["problem"]
    X = rows(np.random.default_rng(5), 2000)
    observe(monitor, X, T0)
    samples = metric_samples(metrics.render())
    assert "fraudactors_feature_psi" not in samples and "fraudactors_score_psi" not in samples
    assert samples["fraudactors_model_offline_detection_rate"][(("version", "v9"),)] == 0.9
    assert monitor.versions == ()


def test_the_committed_models_carry_a_reference_with_their_fallbacks_scores(models_dir: Path) -> None:
    for version in ("v1", "v2"):
        info = load_model_info(models_dir, version)
        assert info.reference is not None, info.reference_problem
        assert set(info.reference.features) == set(info.feature_names)
        assert sorted(info.reference.top_features) == sorted(info.feature_names)
        assert info.reference.fallback_score is not None
        assert info.offline_detection_rate is not None and 0.5 < info.offline_detection_rate <= 1.0
        monitor = ModelMonitor(MonitorSettings(), EngineMetrics(), [info])
        assert set(monitor.versions) == {version, fallback_id(version)}
        top = monitor.top_features(version)
        assert len(top) == MonitorSettings().top_features and not set(top) & CALENDAR_FEATURES
        ranked = [n for n in info.reference.top_features if n not in CALENDAR_FEATURES]
        assert set(top) == set(ranked[: len(top)])


def test_a_model_directory_without_a_reference_loads_and_says_so(models_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(models_dir / "v1", tmp_path / "v1")
    meta_path = tmp_path / "v1" / "metadata.json"
    metadata = json.loads(meta_path.read_text())
    del metadata["reference"]
    meta_path.write_text(json.dumps(metadata))
    info = load_model_info(tmp_path, "v1")
    assert info.reference is None and "no 'reference' section" in str(info.reference_problem)
    metadata["reference"] = {"features": {}}
    meta_path.write_text(json.dumps(metadata))
    info = load_model_info(tmp_path, "v1")
    assert info.reference is None and "invalid" in str(info.reference_problem)
    assert dataclasses.replace(info).fallback is not None  # the model itself is intact


def test_a_version_a_routing_change_brings_is_monitored_and_a_known_one_keeps_its_window() -> None:
    metrics = EngineMetrics()
    monitor = ModelMonitor(SETTINGS, metrics, [model_info()])
    rng = np.random.default_rng(6)
    observe(monitor, rows(rng, 800), T0)
    other = dataclasses.replace(model_info(offline=0.8), version="v10")
    monitor.add([model_info(), other])  # v9 again: nothing resets
    assert set(monitor.versions) == {"v9", "v10"}
    assert monitor.psi("v9") is not None
    samples = metric_samples(metrics.render())
    assert samples["fraudactors_model_offline_detection_rate"] == {(("version", "v9"),): 0.9,
                                                                    (("version", "v10"),): 0.8}


def test_a_version_the_routing_drops_loses_its_window_and_its_series() -> None:
    metrics = EngineMetrics()
    other = dataclasses.replace(model_info(offline=0.8), version="v10")
    monitor = ModelMonitor(SETTINGS, metrics, [model_info(fallback=True), other])
    rng = np.random.default_rng(8)
    X = rows(rng, 800)
    monitor.observe(X, {"v9": (np.arange(800), scores(X)), "v10": (np.arange(800), scores(X)),
                        fallback_id("v9"): (np.arange(800), scores(X))}, np.full(800, False), T0 + np.arange(800))
    samples = metric_samples(metrics.render())
    assert {dict(k)["version"] for k in samples["fraudactors_score_psi"]} == {"v9", "v10", fallback_id("v9")}
    monitor.retain(["v10"])
    assert monitor.versions == ("v10",) and monitor.psi("v9") is None
    samples = metric_samples(metrics.render())
    for name in ("fraudactors_score_psi", "fraudactors_feature_psi", "fraudactors_model_offline_detection_rate"):
        assert {dict(k)["version"] for k in samples[name]} == {"v10"}, name
    monitor.add([model_info(fallback=True)])  # routed to again: a new window, no figure yet
    assert monitor.psi("v9") is None and monitor.psi(fallback_id("v9")) is None


def test_the_committed_fallbacks_export_their_offline_figure(models_dir: Path) -> None:
    metrics = EngineMetrics()
    infos = [load_model_info(models_dir, v) for v in ("v1", "v2")]
    ModelMonitor(MonitorSettings(), metrics, infos)
    offline = metric_samples(metrics.render())["fraudactors_model_offline_detection_rate"]
    for info in infos:
        assert info.fallback is not None
        fallback = info.metadata["fallback"]["metrics"]["test"]["at_thresholds"]["review"]["detection_rate"]
        assert offline[(("version", info.fallback.version),)] == fallback
        assert offline[(("version", info.version),)] == info.offline_detection_rate
