"""Model registry: ``models/<version>/`` holds ``model.onnx``, ``metadata.json`` and ``attribution.onnx``.

:func:`load_model_info` reads the metadata and refuses a model whose files do not match the sha256
recorded at training time (:class:`ModelIntegrityError`) or whose features are not the ones the
engine computes (:class:`ModelError`). It reads no ONNX session: :class:`~fraudactors.modeling.scorer.Scorer`
does that (and checks the bytes it loads against the same sha256).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fraudactors.errors import ModelError, ModelIntegrityError

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
ATTRIBUTION_FILE = "attribution.onnx"


@dataclass(frozen=True)
class ModelInfo:
    version: str
    directory: Path
    feature_names: tuple[str, ...]
    review_threshold: float
    decline_threshold: float
    sha256: str
    metadata: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def attribution_path(self) -> Path | None:
        entry = self.metadata.get("attribution")
        return self.directory / str(entry["file"]) if isinstance(entry, dict) and "file" in entry else None

    @property
    def attribution_sha256(self) -> str | None:
        entry = self.metadata.get("attribution")
        return str(entry["sha256"]) if isinstance(entry, dict) and "sha256" in entry else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(version: str, path: Path, expected: str, data: bytes | None = None) -> None:
    """Raise :class:`ModelIntegrityError` unless ``path`` (or ``data`` read from it) hashes to ``expected``."""
    try:
        actual = sha256_bytes(data) if data is not None else sha256_file(path)
    except OSError as exc:
        raise ModelError(f"model {version}: cannot read {path}: {exc.strerror or exc}") from exc
    if actual != expected:
        raise ModelIntegrityError(
            f"model {version}: {path} has sha256 {actual[:12]}..., metadata.json records {expected[:12]}...; "
            "the file was modified or corrupted - restore it or retrain with `fraudactors train`"
        )


def _expected_features() -> tuple[str, ...]:
    from fraudactors.features.definition import FEATURE_NAMES

    return FEATURE_NAMES


def _check_features(version: str, names: tuple[str, ...], expected: Sequence[str]) -> None:
    expected = tuple(expected)
    if names == expected:
        return
    missing = [n for n in expected if n not in names]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        detail = f"missing {missing[:5]}" if missing else ""
        detail += ("; " if detail and extra else "") + (f"unknown {extra[:5]}" if extra else "")
    else:
        first = next(i for i, (a, b) in enumerate(zip(names, expected, strict=True)) if a != b)
        detail = f"same features in a different order (position {first}: {names[first]!r} vs {expected[first]!r})"
    raise ModelError(f"model {version} was trained on other features than the engine computes: {detail}; "
                     "retrain it with `fraudactors train`")


def load_model_info(models_dir: str | Path, version: str,
                    expected_features: Sequence[str] | None = None) -> ModelInfo:
    """Read and verify ``models_dir/version``; see the module docstring for the errors."""
    directory = Path(models_dir) / version
    meta_path = directory / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model {version} not found: {meta_path} does not exist "
                         "(train it with `fraudactors train`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model {version}: cannot read {meta_path}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelError(f"model {version}: {meta_path} is not a JSON object")
    try:
        names = tuple(str(n) for n in metadata["feature_names"])
        thresholds = metadata["thresholds"]
        review = float(thresholds["review"])
        decline = float(thresholds["decline"])
        sha = str(metadata["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model {version}: {meta_path} lacks a valid {exc} entry") from exc
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise ModelError(f"model {version}: {model_path} is missing")
    verify_sha256(version, model_path, sha)
    info = ModelInfo(version=version, directory=directory, feature_names=names, review_threshold=review,
                     decline_threshold=decline, sha256=sha, metadata=metadata)
    attribution, attribution_sha = info.attribution_path, info.attribution_sha256
    if attribution is not None and attribution_sha is not None:
        verify_sha256(version, attribution, attribution_sha)
    _check_features(version, names, _expected_features() if expected_features is None else expected_features)
    return info
