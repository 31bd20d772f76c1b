"""Fixtures of the load generator's tests: a stand-in engine (the null pipeline answering on
``predictions``) and models for the real engine (the committed ones, or tiny real ONNX models)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fraudactors.settings import Settings
from loadgen.models import REPO_MODELS
from loadgen.nullpipe import NullOptions, NullPipeline


@contextlib.asynccontextmanager
async def responding(settings: Settings, **options: Any) -> AsyncIterator[NullPipeline]:
    """Run a responder (real consumer -> producer loop) until the block exits; ready = partitions assigned."""
    pipeline = NullPipeline(settings, NullOptions(**options))
    task = asyncio.create_task(pipeline.run())
    ready = asyncio.create_task(pipeline.ready.wait())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert ready in done, "responder got no partitions within 30 s"
        yield pipeline
    finally:
        ready.cancel()
        pipeline.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def responder() -> Callable[..., contextlib.AbstractAsyncContextManager[NullPipeline]]:
    return responding


def _train_tiny_models(directory: Path) -> None:
    """Small real sklearn -> ONNX models over the real FEATURE_NAMES, for when models/ is not committed."""
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    from fraudactors.features.definition import FEATURE_INDEX, FEATURE_NAMES

    rng = np.random.default_rng(5)
    X = rng.random((4000, len(FEATURE_NAMES))).astype(np.float32)
    X[:, FEATURE_INDEX["amount"]] *= 500
    y = (X[:, FEATURE_INDEX["amount"]] > 400).astype(int)
    for version, model in (("v1", LogisticRegression(max_iter=500)), ("v2", DecisionTreeClassifier(max_depth=4))):
        model.fit(X, y)
        data = to_onnx(model, X[:1], options={id(model): {"zipmap": False}}, target_opset=17).SerializeToString()
        target = directory / version
        target.mkdir(parents=True)
        (target / "model.onnx").write_bytes(data)
        (target / "metadata.json").write_text(json.dumps({
            "version": version, "feature_names": list(FEATURE_NAMES), "thresholds": {"review": 0.5, "decline": 0.9},
            "sha256": hashlib.sha256(data).hexdigest(), "training": {"source": "tests/loadgen tiny model"},
        }))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if all((REPO_MODELS / v / "metadata.json").is_file() for v in ("v1", "v2")):
        return REPO_MODELS
    directory = tmp_path_factory.mktemp("models")
    _train_tiny_models(directory)
    return directory
