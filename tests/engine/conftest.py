"""Fixtures of the engine's tests: models to score with, settings for an in-process engine."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fraudactors.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _train_tiny_models(directory: Path) -> None:
    """Test-only: small real sklearn -> ONNX models over the real FEATURE_NAMES (v1 and v2).

    Used only when the repository has no trained models yet; the engine then runs the real ONNX
    path (registry + Scorer) on them. No attribution file, so decisions carry no reasons.
    """
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    from fraudactors.features.definition import FEATURE_INDEX, FEATURE_NAMES

    rng = np.random.default_rng(3)
    X = rng.random((4000, len(FEATURE_NAMES))).astype(np.float32)
    X[:, FEATURE_INDEX["amount"]] *= 500
    y = ((X[:, FEATURE_INDEX["amount"]] > 400) | (X[:, FEATURE_INDEX["tx_count_1h"]] > 0.97)).astype(int)
    for version, model in (("v1", LogisticRegression(max_iter=500)), ("v2", DecisionTreeClassifier(max_depth=4))):
        model.fit(X, y)
        onx = to_onnx(model, X[:1], options={id(model): {"zipmap": False}}, target_opset=17)
        data = onx.SerializeToString()
        target = directory / version
        target.mkdir(parents=True)
        (target / "model.onnx").write_bytes(data)
        (target / "metadata.json").write_text(json.dumps({
            "version": version, "feature_names": list(FEATURE_NAMES),
            "thresholds": {"review": 0.5, "decline": 0.9},
            "sha256": hashlib.sha256(data).hexdigest(), "training": {"source": "tests/engine tiny model"},
        }))


def _loadable(directory: Path) -> bool:
    """The repository's trained models, when they are there and load (the modeling tests own
    their correctness; the engine's tests only need real ONNX models to score with)."""
    if not all((directory / v / "metadata.json").is_file() for v in ("v1", "v2")):
        return False
    from fraudactors.errors import FraudActorsError
    from fraudactors.modeling.registry import load_model_info
    from fraudactors.modeling.scorer import Scorer

    try:
        Scorer([load_model_info(directory, v) for v in ("v1", "v2")])
    except FraudActorsError:
        return False
    return True


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo_models = REPO / "models"
    if _loadable(repo_models):
        return repo_models
    directory = tmp_path_factory.mktemp("models")
    _train_tiny_models(directory)
    return directory


def _inference_mode() -> str:
    try:
        from fraudactors.actors.pool import ProcessPool  # noqa: F401
    except ImportError:
        return "thread"
    return "process"


@pytest.fixture
def engine_settings(settings: Settings, models_dir: Path) -> Iterator[Settings]:
    """The shared ``settings`` plus models, quick group timeouts and the default inference mode."""
    yield settings.replace(
        models={"dir": str(models_dir)},
        engine={"inference_mode": _inference_mode(), "commit_interval_ms": 200, "shutdown_timeout_s": 15.0},
        kafka={"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
    )
