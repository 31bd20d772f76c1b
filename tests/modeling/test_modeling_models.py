"""Trained models: loadable through registry + Scorer, ONNX == scikit-learn, integrity, reasons, reproducible."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fraudactors.cli import main as cli_main
from fraudactors.errors import ModelError, ModelIntegrityError
from fraudactors.features.definition import FEATURE_INDEX, FEATURE_NAMES, TRANSACTION_ONLY
from fraudactors.modeling.attribution import TreeAttribution, build_attribution
from fraudactors.modeling.attribution_onnx import attribution_onnx_bytes, float32_floor
from fraudactors.modeling.data import DataError
from fraudactors.modeling.metrics import card_precision_at_k, threshold_for_fpr
from fraudactors.modeling.pipeline import (
    compute_features,
    fit_model,
    held_out_set,
    load_dataset,
    onnx_proba,
    single_threaded_openmp,
    to_onnx_bytes,
)
from fraudactors.modeling.registry import load_model_info
from fraudactors.modeling.scorer import Scorer, make_session
from fraudactors.modeling.split import SplitConfig, known_labels, time_split


@pytest.fixture(scope="module")
def tiny_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_fit, y_fit, X_test, y_test) of a small simulated month."""
    ds = load_dataset({"kind": "synthetic", "seed": 4, "days": 24, "users": 400, "merchants": 300},
                      show_progress=False)
    X = compute_features(ds, show_progress=False)
    split = time_split(ds.event_time, SplitConfig(warmup_days=3, calib_days=3, gap_days=2, test_days=6))
    y = known_labels(ds, split.cutoff)
    return X[split.fit], y[split.fit], X[split.test], ds.is_fraud[split.test]


def test_trained_models_load_through_registry_and_score(tiny_models: Path) -> None:
    infos = [load_model_info(tiny_models, v) for v in ("v1", "v2")]
    for info in infos:
        assert info.feature_names == FEATURE_NAMES
        assert 0.0 < info.review_threshold <= info.decline_threshold <= 1.0
        assert info.model_path.stat().st_size < 5_000_000
        meta = info.metadata
        assert meta["metrics"]["test"]["auc"] > 0.7
        assert meta["onnx"]["max_abs_diff_vs_sklearn"] < 1e-4
        assert meta["thresholds"]["review_target_fpr"] == 0.02
        assert {"scikit-learn", "onnxruntime", "skl2onnx"} <= set(meta["libraries"])
    assert infos[0].metadata["model_type"] == "RandomForestClassifier"
    assert infos[1].metadata["model_type"] == "HistGradientBoostingClassifier"
    scorer = Scorer(infos)
    X, y, _ = held_out_set(infos[0].metadata["training"], show_progress=False)
    for info in infos:
        probs, reasons = scorer.score(info.version, X[:500])
        assert probs.shape == (500,) and ((probs >= 0) & (probs <= 1)).all()
        assert len(reasons) == 500
        assert all(len(r) <= 3 and set(r) <= set(FEATURE_NAMES) for r in reasons)
        assert any(reasons)
        contrib = scorer.contributions(info.version, X[:500])
        assert contrib is not None
        index = {n: i for i, n in enumerate(FEATURE_NAMES)}
        for c, r in zip(contrib, reasons, strict=True):
            values = [c[index[name]] for name in r]
            assert all(v > 0 for v in values) and values == sorted(values, reverse=True)
            assert len(r) == min(3, int((c > 0).sum()))
        # The held-out rows are the ones the metadata's metrics were computed on.
        full = scorer.predict_proba(info.version, X)
        assert full.size == info.metadata["metrics"]["test"]["transactions"]
        assert int(y.sum()) == info.metadata["metrics"]["test"]["frauds"]


@pytest.mark.parametrize("algo", ["rf", "hgb"])
def test_onnx_probabilities_equal_sklearn_on_held_out_rows(algo: str, tiny_data: tuple[np.ndarray, ...]) -> None:
    X_fit, y_fit, X_test, _ = tiny_data
    model = fit_model(algo, 1, X_fit, y_fit)
    session = make_session(to_onnx_bytes(model, X_fit.shape[1], f"test_{algo}"))
    onnx = onnx_proba(session, X_test)
    with single_threaded_openmp():
        sk = model.predict_proba(X_test)[:, 1]
    assert onnx.shape == sk.shape
    np.testing.assert_allclose(onnx, sk, rtol=0, atol=1e-5)


def test_the_forests_probabilities_are_calibrated_inside_its_onnx_graph(tiny_data: tuple[np.ndarray, ...]) -> None:
    from fraudactors.modeling.metrics import calibration
    from fraudactors.modeling.pipeline import calibrated_onnx_bytes, fit_platt

    X_fit, y_fit, X_test, y_test = tiny_data
    model = fit_model("rf", 1, X_fit, y_fit, legit_fraction=0.2)
    raw_bytes = to_onnx_bytes(model, X_fit.shape[1], "test_rf")
    half = X_test.shape[0] // 2
    raw_fit, raw_check = onnx_proba(make_session(raw_bytes), X_test[:half]), onnx_proba(make_session(raw_bytes),
                                                                                        X_test[half:])
    platt = fit_platt(raw_fit, y_test[:half])
    assert platt.a > 0 and platt.frauds == int(y_test[:half].sum())
    session = make_session(calibrated_onnx_bytes(raw_bytes, platt))
    out = session.run(["probabilities"], {"features": np.ascontiguousarray(X_test[half:], dtype=np.float32)})[0]
    np.testing.assert_allclose(out[:, 1], platt.apply(raw_check), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[:, 0] + out[:, 1], 1.0, atol=1e-6)
    order = np.argsort(raw_check, kind="stable")
    # the ranking is kept (to float32 rounding): detection at any FPR is the same
    assert np.diff(out[order, 1]).min() >= -1e-6, np.diff(out[order, 1]).min()
    # on rows it was not fitted on, the map brings the mean probability to the fraud rate
    before, after = calibration(y_test[half:], raw_check), calibration(y_test[half:], out[:, 1])
    assert after["ece"] < before["ece"] / 2
    assert abs(after["mean_probability"] - after["fraud_rate"]) < abs(before["mean_probability"] - before["fraud_rate"])


def test_platt_refuses_a_calibration_period_without_both_classes_or_ranked_backwards() -> None:
    from fraudactors.modeling.pipeline import fit_platt

    with pytest.raises(DataError, match="needs both classes; 0 frauds in 3 rows"):
        fit_platt(np.array([0.1, 0.2, 0.3]), np.zeros(3, dtype=bool))
    with pytest.raises(DataError, match="came out decreasing"):
        fit_platt(np.linspace(0.01, 0.99, 40), np.arange(40) < 10)  # the frauds score lowest


def test_the_final_refit_ships_the_time_splits_probability_calibration(
        tiny_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    from onnx import numpy_helper

    from fraudactors.modeling import pipeline

    monkeypatch.setattr(pipeline, "MIN_CALIBRATION_FRAUDS", 1)  # the tiny data reports few frauds in time
    assert cli_main(["train", *tiny_args, "--version", "v1", "--out", str(tmp_path)]) == 0
    info = load_model_info(tmp_path, "v1")
    meta = info.metadata
    for section, path in ((meta, info.model_path), (meta["fallback"], tmp_path / "v1" / "fallback.onnx")):
        platt = section["probability_calibration"]
        assert platt["a"] > 0 and platt["frauds"] >= 1 and platt["method"].startswith("Platt")
        # the shipped graph (the final refit) ends in the map fitted on the time split
        weights = {t.name: float(numpy_helper.to_array(t)) for t in onnx.load(str(path)).graph.initializer
                   if t.name in ("platt_a", "platt_b")}
        assert weights == {"platt_a": pytest.approx(platt["a"], rel=1e-6), "platt_b": pytest.approx(platt["b"], rel=1e-6)}
    assert meta["final_fit"]["refit"] is True
    probs = Scorer([info]).predict_proba("v1", held_out_set(meta["training"], show_progress=False)[0])
    assert ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize("algo", ["rf", "hgb"])
def test_path_contributions_decompose_the_model_output(algo: str, tiny_data: tuple[np.ndarray, ...],
                                                       tmp_path: Path) -> None:
    X_fit, y_fit, X_test, _ = tiny_data
    model = fit_model(algo, 1, X_fit, y_fit)
    build_attribution(model, X_fit.shape[1]).save(tmp_path / "a.npz")
    attribution = TreeAttribution.load(tmp_path / "a.npz")
    rows = np.ascontiguousarray(X_test[:300])
    with single_threaded_openmp():
        expected = model.predict_proba(rows)[:, 1] if algo == "rf" else model.decision_function(rows)
    np.testing.assert_allclose(attribution.output(rows), expected, rtol=0, atol=1e-9)
    contrib = attribution.contributions(rows)
    reasons = attribution.reasons(rows, FEATURE_NAMES, 3)
    index = {n: i for i, n in enumerate(FEATURE_NAMES)}
    for c, r in zip(contrib, reasons, strict=True):
        assert len(r) <= 3
        values = [c[index[name]] for name in r]
        assert all(v > 0 for v in values)
        assert values == sorted(values, reverse=True)
        positive = np.sort(c[c > 0])[::-1]
        assert len(r) == min(3, positive.size)
        if r:
            assert values[0] == positive[0]
    # The ONNX form onnxruntime runs in the engine computes the same contributions.
    session = make_session(attribution_onnx_bytes(attribution))
    np.testing.assert_allclose(session.run(None, {"features": rows})[0], contrib, rtol=0, atol=1e-5)


def test_every_version_has_a_fallback_on_the_transaction_only_features(tiny_models: Path) -> None:
    """The fallback scores the full vector's transaction-only columns, with its own thresholds
    calibrated for the same target FPRs, and explains itself with its own features."""
    infos = [load_model_info(tiny_models, v) for v in ("v1", "v2")]
    scorer = Scorer(infos)
    X, y, _ = held_out_set(infos[0].metadata["training"], show_progress=False)
    for info in infos:
        fb = info.fallback
        assert fb is not None and fb.version == f"{info.version}-fallback"
        assert fb.feature_names == TRANSACTION_ONLY
        assert fb.path.name == "fallback.onnx" and fb.path.parent == info.directory
        assert 0.0 < fb.review_threshold <= fb.decline_threshold <= 1.0
        section = info.metadata["fallback"]
        assert section["thresholds"]["review_target_fpr"] == info.metadata["thresholds"]["review_target_fpr"]
        assert section["model_type"] == info.metadata["model_type"]
        assert section["onnx"]["max_abs_diff_vs_sklearn"] < 1e-4
        assert fb.version in scorer.versions
        probs, reasons = scorer.score(fb.version, X[:500])
        assert probs.shape == (500,) and ((probs >= 0) & (probs <= 1)).all()
        assert any(reasons) and all(set(r) <= set(TRANSACTION_ONLY) for r in reasons)
        contrib = scorer.contributions(fb.version, X[:500])
        assert contrib is not None and contrib.shape == (500, len(TRANSACTION_ONLY))
        # Only the transaction-only columns matter: the rest of the vector is ignored.
        scrambled = X[:500].copy()
        others = [FEATURE_INDEX[n] for n in FEATURE_NAMES if n not in TRANSACTION_ONLY]
        scrambled[:, others] = np.random.default_rng(0).random((500, len(others)), dtype=np.float32)
        assert np.array_equal(scorer.predict_proba(fb.version, scrambled), probs)
        # The held-out metrics are the fallback's own, on the same rows as the model's.
        test = section["metrics"]["test"]
        assert test["transactions"] == y.size and test["auc"] > 0.6
        assert test["at_thresholds"]["review"]["threshold"] == section["final_fit"]["time_split_thresholds"]["review"]
        # ... and its own thresholds those of its final refit
        assert fb.review_threshold == section["final_fit"]["calibration"]["at_thresholds"]["review"]["threshold"]


@pytest.mark.parametrize("name", ["fallback.onnx", "fallback_attribution.onnx"])
def test_a_modified_fallback_file_is_refused(tiny_models: Path, tmp_path: Path, name: str) -> None:
    shutil.copytree(tiny_models / "v2", tmp_path / "v2")
    load_model_info(tmp_path, "v2")  # intact: fine
    path = tmp_path / "v2" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError,
                       match=rf"model v2-fallback: .*{name.replace('.', '[.]')} has sha256 .* metadata\.json records"):
        load_model_info(tmp_path, "v2")


def test_a_fallback_changed_after_verification_is_refused_by_the_scorer(tiny_models: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_models / "v1", tmp_path / "v1")
    info = load_model_info(tmp_path, "v1")
    path = tmp_path / "v1" / "fallback.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match="v1-fallback"):
        Scorer([info])


def test_a_fallback_missing_or_on_stored_features_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_models / "v1", tmp_path / "v1")
    meta_path = tmp_path / "v1" / "metadata.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    meta["fallback"]["feature_names"] = [*TRANSACTION_ONLY[:-1], "tx_count_1h"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="v1-fallback must score distinct transaction-only features"):
        load_model_info(tmp_path, "v1")
    meta_path.write_text(original)
    (tmp_path / "v1" / "fallback.onnx").unlink()
    with pytest.raises(ModelError, match=r"model v1-fallback: .*fallback\.onnx is missing"):
        load_model_info(tmp_path, "v1")
    meta = json.loads(original)
    del meta["fallback"]
    meta_path.write_text(json.dumps(meta))
    assert load_model_info(tmp_path, "v1").fallback is None  # the engine refuses it (test_engine_degraded)


def test_a_modified_model_file_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_models / "v1", tmp_path / "v1")
    load_model_info(tmp_path, "v1")  # intact: fine
    model = tmp_path / "v1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"model v1: .*model\.onnx has sha256 .* metadata\.json records"):
        load_model_info(tmp_path, "v1")


def test_a_model_changed_after_verification_is_refused_by_the_scorer(tiny_models: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_models / "v2", tmp_path / "v2")
    info = load_model_info(tmp_path, "v2")
    model = tmp_path / "v2" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError):
        Scorer([info])


def test_a_modified_attribution_file_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_models / "v1", tmp_path / "v1")
    (tmp_path / "v1" / "attribution.onnx").write_bytes(b"not the trained file")
    with pytest.raises(ModelIntegrityError, match=r"attribution\.onnx"):
        load_model_info(tmp_path, "v1")


def test_models_with_other_features_or_missing_files_are_refused(tiny_models: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_models / "v1", tmp_path / "v1")
    with pytest.raises(ModelError, match="other features"):
        load_model_info(tmp_path, "v1", expected_features=(*FEATURE_NAMES, "extra_feature"))
    meta_path = tmp_path / "v1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["feature_names"] = list(reversed(meta["feature_names"]))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="different order"):
        load_model_info(tmp_path, "v1")
    with pytest.raises(ModelError, match="model v9 not found"):
        load_model_info(tmp_path, "v9")
    with pytest.raises(ModelError, match="not loaded"):
        Scorer([]).score("v1", np.zeros((1, len(FEATURE_NAMES)), dtype=np.float32))


def test_same_command_same_models(tiny_models: Path, tiny_args: list[str], tmp_path: Path) -> None:
    assert cli_main(["train", *tiny_args, "--out", str(tmp_path)]) == 0
    for version in ("v1", "v2"):
        a = json.loads((tiny_models / version / "metadata.json").read_text())
        b = json.loads((tmp_path / version / "metadata.json").read_text())
        assert a["sha256"] == b["sha256"]
        assert a["attribution"]["sha256"] == b["attribution"]["sha256"]
        assert a["metrics"] == b["metrics"]
        assert a["thresholds"] == b["thresholds"]
        for key in ("sha256", "metrics", "thresholds"):
            assert a["fallback"][key] == b["fallback"][key], key
        assert a["fallback"]["attribution"]["sha256"] == b["fallback"]["attribution"]["sha256"]


def test_evaluate_reproduces_the_training_metrics(tiny_models_no_refit: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A model shipped from the time split is evaluated on the time split's held-out weeks: the
    committed files give exactly the metrics recorded at training."""
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--models", str(tiny_models_no_refit), "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "scored by the committed ONNX files on the time split's held-out weeks" in table
    assert "| v1 (rf) |" in table and "| v2 (hgb) |" in table
    assert "| v1-fallback (rf) |" in table and "| v2-fallback (hgb) |" in table
    assert "| v1-fallback | approve-below 20 |" in table
    assert "Recorded at training" not in table  # the table above is that evaluation
    assert "Calibration: per probability bin" in table and "| model | [0, 0.01) |" in table
    results = json.loads(out.read_text())
    for version in ("v1", "v2"):
        meta = json.loads((tiny_models_no_refit / version / "metadata.json").read_text())
        assert meta["final_fit"]["refit"] is False
        assert results[version]["metrics"] == meta["metrics"]["test"]
        assert 0 <= results[version]["metrics"]["card_precision_at_100"]["mean"] <= 1
        calibration = results[version]["metrics"]["calibration"]
        assert sum(b["rows"] for b in calibration["bins"]) == results[version]["metrics"]["transactions"]
        fallback = results[f"{version}-fallback"]
        assert fallback["metrics"] == meta["fallback"]["metrics"]["test"]
        policies = {p["policy"]: p for p in fallback["policies"]}
        assert list(policies) == ["score", "review", "approve-below 20"]
        review_thr = fallback["metrics"]["at_thresholds"]["review"]
        assert policies["score"]["detection_rate"] == review_thr["detection_rate"]
        assert policies["score"]["fpr"] == review_thr["fpr"]
        assert policies["review"]["detection_rate"] == policies["review"]["fpr"] == 1.0
        below = policies["approve-below 20"]
        assert below["fpr"] <= policies["score"]["fpr"] and below["detection_rate"] <= policies["score"]["detection_rate"]


def test_the_final_refit_fits_up_to_the_label_cut_off_and_calibrates_on_unseen_recent_rows(
        tiny_models: Path, tiny_models_no_refit: Path) -> None:
    for version in ("v1", "v2"):
        meta = json.loads((tiny_models / version / "metadata.json").read_text())
        plain = json.loads((tiny_models_no_refit / version / "metadata.json").read_text())
        final = meta["final_fit"]
        assert final["refit"] is True
        # the time-split evaluation is the same as the model shipped without a refit
        assert meta["metrics"] == plain["metrics"]
        assert final["time_split_thresholds"] == {k: plain["thresholds"][k] for k in ("review", "decline")}
        # fit from the end of the warm-up to the label cut-off (the last --gap-days, 3, left out)
        end = datetime.fromisoformat(final["periods"]["left_out_label_delay"][1])
        cutoff = datetime.fromisoformat(final["periods"]["fit"][1])
        assert end - cutoff == timedelta(days=3)
        assert final["periods"]["calibration"] == [
            (cutoff - timedelta(days=5)).isoformat(timespec="seconds"), cutoff.isoformat(timespec="seconds")]
        assert final["fit_rows"] > meta["training"]["rows"]["fit"] + meta["training"]["rows"]["calibration"]
        assert final["fit_frauds"] > meta["training"]["fit_frauds_reported_by_cutoff"]
        # calibrated on legitimate rows only, at about the target FPR there
        assert final["calibration"]["frauds"] == 0 and final["calibration_rows"] > 1000
        assert final["calibration"]["at_thresholds"]["review"]["fpr"] <= 0.02
        assert meta["thresholds"]["review"] == final["calibration"]["at_thresholds"]["review"]["threshold"]
        assert meta["sha256"] != plain["sha256"]
        assert "final fit did not use" in meta["thresholds"]["chosen_on"]
        assert meta["fallback"]["final_fit"]["refit"] is True


def test_evaluate_scores_a_refit_model_on_the_weeks_after_its_data(
        tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--models", str(tiny_models), "--models", str(tiny_models), "--versions", "v2",
                     "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "scored by the committed ONNX files on the 7 days after the training data (2026-10-31" in table
    assert "Recorded at training" in table and "card precision@100 per day" in table
    results = json.loads(out.read_text())
    label = f"{tiny_models}:v2"
    assert set(results) == {label, f"{tiny_models}:v2-fallback"}
    meta = json.loads((tiny_models / "v2" / "metadata.json").read_text())
    after = results[label]["metrics"]
    assert after["transactions"] > 5000 and after["frauds"] > 20
    assert after != meta["metrics"]["test"]
    assert len(results[label]["card_precision_per_day"]) == 7


def test_card_precision_at_k_excludes_cards_caught_on_earlier_days() -> None:
    cards = np.array(["a", "a", "b", "c", "d", "a", "b", "c", "d"], dtype=object)
    days = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2])
    y = np.array([0, 1, 0, 0, 0, 1, 0, 1, 0], dtype=bool)
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.3, 0.99, 0.5, 0.4, 0.6])
    result = card_precision_at_k(cards, days, y, scores, k=2)
    day1, day2 = result["per_day"]
    assert day1 == {"day": 1, "cards": 4, "compromised": 1, "precision": 0.5, "best_possible": 0.5}  # a (yes), b
    # a was caught on day 1: day 2 ranks d (0.6), b (0.5) -- c, the compromised one, is third
    assert day2 == {"day": 2, "cards": 3, "compromised": 1, "precision": 0.0, "best_possible": 0.5}
    assert result["mean"] == 0.25 and result["best_possible_mean"] == 0.5 and result["days"] == 2


def test_threshold_for_fpr_keeps_the_false_positive_rate_under_target() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 7, 50, 1000, 12345):
        neg = rng.random(n).astype(np.float32)
        neg[: n // 3] = neg[0]  # ties
        for target in (0.001, 0.02, 0.1, 0.5):
            t = threshold_for_fpr(neg, target)
            flagged = (neg.astype(np.float64) >= t).sum()
            assert flagged <= np.floor(target * n + 1e-9)
            lower = neg[neg < t]
            if lower.size:  # the next lower legit score would flag too many
                assert (neg >= lower.max()).sum() > np.floor(target * n + 1e-9)


def test_float32_floor_keeps_float64_comparisons() -> None:
    rng = np.random.default_rng(1)
    thresholds = rng.normal(size=2000) * 10.0 ** rng.integers(-3, 6, size=2000)
    t32 = float32_floor(thresholds)
    assert (t32.astype(np.float64) <= thresholds).all()
    x = np.concatenate([t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-np.inf))])
    thr = np.tile(thresholds, 3)
    t = np.tile(t32, 3)
    assert ((x.astype(np.float64) <= thr) == (x <= t)).all()


def test_the_reference_is_the_fit_population_and_the_held_out_weeks_do_not_drift_from_it(
        tiny_models_no_refit: Path) -> None:
    """metadata.json 'reference': the fit rows' quantile bins. The held-out weeks (the same population,
    later) stay under the 0.2 drift threshold on the amount and the score; tripled amounts pass it."""
    from fraudactors.modeling.reference import bin_counts, psi

    info = load_model_info(tiny_models_no_refit, "v1")
    ref = info.reference
    assert ref is not None, info.reference_problem
    assert sorted(ref.top_features) == sorted(FEATURE_NAMES) and ref.fallback_score is not None
    meta = info.metadata
    assert meta["reference"]["feature_rows"] == meta["training"]["rows"]["fit"]
    for hist in (*ref.features.values(), ref.score, ref.fallback_score):
        assert hist.shares.sum() == pytest.approx(1.0, abs=1e-4) and hist.shares.size == hist.edges.size + 1
    assert ref.features["is_international"].edges.size <= 2  # a 0/1 flag: ties merged
    X, _, _ = held_out_set(meta["training"], show_progress=False)
    amount = ref.features["amount"]
    column = X[:, FEATURE_INDEX["amount"]]
    probs = Scorer([info]).predict_proba("v1", X)
    print("held-out weeks PSI: amount", psi(bin_counts(column, amount.edges), amount.shares),
          "score", psi(bin_counts(probs, ref.score.edges), ref.score.shares))
    assert psi(bin_counts(column, amount.edges), amount.shares) < 0.1
    assert psi(bin_counts(probs, ref.score.edges), ref.score.shares) < 0.2
    assert psi(bin_counts(column * 3, amount.edges), amount.shares) > 0.2


def test_a_score_equal_to_a_threshold_is_flagged() -> None:
    """``p >= threshold`` flags, as the engine decides: a fraud scoring exactly the threshold is detected."""
    from fraudactors.modeling.metrics import at_threshold

    y = np.array([1, 1, 0, 0], dtype=bool)
    s = np.array([0.5, 0.2, 0.5, 0.1])
    assert at_threshold(y, s, 0.5) == {"threshold": 0.5, "detection_rate": 0.5, "fpr": 0.5, "precision": 0.5}


def test_the_fpr_threshold_is_chosen_on_the_legitimate_scores_only() -> None:
    from fraudactors.modeling.metrics import evaluate_scores

    legit = np.linspace(0.0, 0.5, 100)
    frauds = np.full(10, 0.9)  # above every legitimate score
    y = np.r_[np.zeros(100, dtype=bool), np.ones(10, dtype=bool)]
    m = evaluate_scores(y, np.r_[legit, frauds], np.array(["s"] * 110))
    # 2 of 100 legit rows may be flagged: the threshold sits just above the third highest legit score
    assert m["at_max_fpr"]["threshold"] == float(np.nextafter(np.float32(legit[-3]), np.float32(np.inf)))
    assert m["at_max_fpr"]["detection_rate"] == 1.0 and m["at_max_fpr"]["fpr"] == 0.02


def test_each_scenario_is_scored_on_its_own_frauds_against_all_legitimate_transactions() -> None:
    from fraudactors.modeling.metrics import evaluate_scores

    legit = np.linspace(0.0, 0.5, 100)
    y = np.r_[np.zeros(100, dtype=bool), np.ones(8, dtype=bool)]
    s = np.r_[legit, [0.9] * 4, [0.3] * 4]  # "atm" frauds above every legit score, "ato" among them
    scenario = np.array(["none"] * 100 + ["atm"] * 4 + ["ato"] * 4)
    m = evaluate_scores(y, s, scenario)
    atm, ato = m["per_scenario"]["atm"], m["per_scenario"]["ato"]
    assert atm["frauds"] == ato["frauds"] == 4
    assert atm["auc"] == 1.0 and atm["average_precision"] == 1.0  # not lowered by the other scenario's frauds
    assert atm["detection_rate_at_max_fpr"] == 1.0 and ato["detection_rate_at_max_fpr"] == 0.0
    assert 0.3 < ato["auc"] < 0.8


def test_card_precision_ranks_a_card_by_its_highest_score_and_counts_it_compromised_by_any_fraud() -> None:
    cards = np.array(["a", "a", "b"], dtype=object)
    days = np.array([1, 1, 1])
    y = np.array([1, 0, 0], dtype=bool)
    scores = np.array([0.9, 0.1, 0.5])  # card a: its fraud scored first and highest
    top1 = card_precision_at_k(cards, days, y, scores, k=1)
    assert top1["per_day"] == [{"day": 1, "cards": 2, "compromised": 1, "precision": 1.0, "best_possible": 1.0}]
    # a queue longer than the open cards: the precision is still over k checks
    top4 = card_precision_at_k(cards, days, y, scores, k=4)
    assert top4["per_day"][0]["precision"] == 0.25 and top4["per_day"][0]["best_possible"] == 0.25
    assert top4["mean"] == 0.25 and top4["best_possible_mean"] == 0.25


def test_evaluate_scores_reports_card_precision_at_100() -> None:
    from fraudactors.modeling.metrics import evaluate_scores

    cards = np.array([f"c{i}" for i in range(150)], dtype=object)
    y = np.arange(150) < 30
    m = evaluate_scores(y, y.astype(float), np.array(["s"] * 150), cards=cards, days=np.zeros(150, dtype=np.int64))
    assert m["card_precision_at_100"] == {"k": 100, "days": 1, "mean": 0.3, "best_possible_mean": 0.3}


def test_calibration_compares_each_probability_bins_fraud_rate_with_its_mean_probability() -> None:
    from fraudactors.modeling.metrics import calibration

    # 100 rows at 0.005 (none fraud), 10 at 0.4 (4 fraud), 10 at 0.95 and 1.0 (all fraud)
    p = np.r_[np.full(100, 0.005), np.full(10, 0.4), np.full(5, 0.95), np.full(5, 1.0)]
    y = np.r_[np.zeros(100), np.ones(4), np.zeros(6), np.ones(10)].astype(bool)
    cal = calibration(y, p)
    assert [(b["range"], b["rows"]) for b in cal["bins"]] == [([0.0, 0.01], 100), ([0.3, 0.5], 10), ([0.9, 1.0], 10)]
    top = cal["bins"][2]  # 1.0 falls in the last bin, which includes it
    assert top["fraud_rate"] == 1.0 and top["mean_probability"] == pytest.approx(0.975)
    assert cal["bins"][1]["fraud_rate"] == pytest.approx(0.4)  # calibrated there
    assert cal["ece"] == pytest.approx((100 * 0.005 + 10 * 0.0 + 10 * 0.025) / 120)
    assert cal["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert cal["fraud_rate"] == pytest.approx(14 / 120) and cal["mean_probability"] == pytest.approx(p.mean())


def test_degraded_policy_metrics_count_a_score_at_the_review_threshold_and_only_fraud_amounts_caught() -> None:
    from fraudactors.modeling.evaluate import policy_metrics
    from fraudactors.modeling.policy import DegradedPolicy

    y = np.array([1, 1, 0, 0], dtype=bool)
    probs = np.array([0.5, 0.1, 0.7, 0.2])  # a fraud exactly at the review threshold; a legit row above it
    amounts = np.array([100.0, 300.0, 50.0, 10.0])
    m = policy_metrics(y, probs, amounts, review=0.5, decline=0.9, policy=DegradedPolicy("score"))
    assert m == {"policy": "score", "detection_rate": 0.5, "fpr": 0.5, "precision": 0.5,
                 "fraud_amount_caught": 0.25, "flagged_share": 0.5}


def test_a_refit_model_is_evaluated_only_on_transactions_strictly_after_its_data(tmp_path: Path) -> None:
    import csv

    from fraudactors.features.schema import format_timestamp
    from fraudactors.modeling.evalset import evaluation_set

    t0 = 1790812800.0
    times = [t0 + i * 3600.0 for i in range(4 * 24)]
    path = tmp_path / "tx.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["transaction_id", "user_id", "amount", "timestamp", "is_fraud"])
        for i, t in enumerate(times):
            w.writerow([f"t{i}", f"u{i % 5}", 10 + i, format_timestamp(t), int(i % 9 == 0)])
    end = times[47]  # the refit model's last training transaction
    metadata = {"version": "v1", "training": {"data": {"kind": "file", "path": str(path)},
                                              "split": {"warmup_days": 1, "calib_days": 1, "gap_days": 1,
                                                        "test_days": 1}},
                "final_fit": {"refit": True, "data_end_epoch": end}}
    rows = evaluation_set(metadata, show_progress=False)
    assert rows.X.shape[0] == 48  # hours 48 .. 95; hour 47 was trained on
    assert rows.X[0, FEATURE_INDEX["amount"]] == 10 + 48
    assert rows.is_fraud.tolist() == [i % 9 == 0 for i in range(48, 96)]
