"""The tests score with the committed models and nothing else: models that do not load fail them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from committed_models import REPO_MODELS, committed_models


def test_the_fixture_is_the_committed_models(models_dir: Path) -> None:
    assert models_dir == REPO_MODELS


def test_a_sha256_mismatch_fails_the_tests_instead_of_training_stand_ins(tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(REPO_MODELS, copy)
    model = copy / "v2" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(pytest.fail.Exception, match=r"committed models in .* do not load: model v2: .* sha256"):
        committed_models(copy)
    assert sorted(p.name for p in copy.iterdir()) == ["v1", "v2"]  # nothing written in their place


def test_missing_models_fail_the_tests_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="do not load"):
        committed_models(tmp_path / "nowhere")
