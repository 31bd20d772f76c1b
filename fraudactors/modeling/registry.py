"""Model registry: ``models/<version>/`` holds ``model.onnx``, ``metadata.json`` and ``attribution.onnx``,
and the version's fallback for degraded mode, ``fallback.onnx`` and ``fallback_attribution.onnx``
(its section ``fallback`` in ``metadata.json``).

:func:`load_model_info` reads the metadata and refuses a model whose files do not match the sha256
recorded at training time (:class:`ModelIntegrityError`) or whose features are not the ones the
engine computes (:class:`ModelError`); a fallback may only use the transaction-only features
(``features.definition.TRANSACTION_ONLY``), the ones that exist without the feature store. It reads
no ONNX session: :class:`~fraudactors.modeling.scorer.Scorer` does that (and checks the bytes it
loads against the same sha256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fraudactors.errors import ModelError, ModelIntegrityError
from fraudactors.modeling.reference import Reference, parse_reference

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
ATTRIBUTION_FILE = "attribution.onnx"
FALLBACK_FILE = "fallback.onnx"
FALLBACK_ATTRIBUTION_FILE = "fallback_attribution.onnx"
FALLBACK_SUFFIX = "-fallback"


def fallback_id(version: str) -> str:
    """The name a version's fallback scores under (the decisions' ``model_version``): ``v1-fallback``."""
    return version + FALLBACK_SUFFIX


@dataclass(frozen=True)
class FallbackInfo:
    """A version's degraded-mode model: the transaction-only features, its own thresholds."""

    version: str  # fallback_id(main version)
    path: Path
    sha256: str
    feature_names: tuple[str, ...]  # a subset of the main model's, in the fallback's input order
    review_threshold: float
    decline_threshold: float
    attribution_path: Path | None
    attribution_sha256: str | None


@dataclass(frozen=True)
class ModelInfo:
    version: str
    directory: Path
    feature_names: tuple[str, ...]
    review_threshold: float
    decline_threshold: float
    sha256: str
    metadata: dict[str, Any]
    fallback: FallbackInfo | None = None
    # The monitor's reference distributions (metadata 'reference'); None with the reason when absent.
    reference: Reference | None = None
    reference_problem: str | None = None

    @property
    def offline_detection_rate(self) -> float | None:
        """Detection at the review threshold on the time split's held-out weeks (metadata 'metrics')."""
        try:
            value = self.metadata["metrics"]["test"]["at_thresholds"]["review"]["detection_rate"]
        except (KeyError, TypeError):
            return None
        return float(value) if isinstance(value, int | float) else None

    @property
    def fallback_offline_detection_rate(self) -> float | None:
        """The same figure of the version's fallback (metadata 'fallback.metrics')."""
        try:
            value = self.metadata["fallback"]["metrics"]["test"]["at_thresholds"]["review"]["detection_rate"]
        except (KeyError, TypeError):
            return None
        return float(value) if isinstance(value, int | float) else None

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


def _transaction_only() -> tuple[str, ...]:
    from fraudactors.features.definition import TRANSACTION_ONLY

    return TRANSACTION_ONLY


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
    if "fallback" in metadata:
        fallback = _load_fallback(version, directory, metadata["fallback"], names)
        info = dataclasses.replace(info, fallback=fallback)
    return dataclasses.replace(info, **_load_reference(metadata, names))


def _load_reference(metadata: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``reference`` / ``reference_problem`` of :class:`ModelInfo`: a model without a (valid) reference
    still scores; only its drift is not monitored."""
    entry = metadata.get("reference")
    if entry is None:
        return {"reference_problem": "metadata.json has no 'reference' section (trained before the monitor; "
                                     "retrain with `fraudactors train`)"}
    try:
        return {"reference": parse_reference(entry, names)}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return {"reference_problem": f"metadata.json section 'reference' is invalid: {exc!r}"}


def _load_fallback(version: str, directory: Path, entry: Any, main_names: tuple[str, ...]) -> FallbackInfo:
    """The ``fallback`` section of ``version``'s metadata, its files verified like the main model's."""
    name = fallback_id(version)
    where = f"{directory / METADATA_FILE} section 'fallback'"
    try:
        names = tuple(str(n) for n in entry["feature_names"])
        review = float(entry["thresholds"]["review"])
        decline = float(entry["thresholds"]["decline"])
        path = directory / str(entry["file"])
        sha = str(entry["sha256"])
        attribution = entry.get("attribution")
        attr_path = directory / str(attribution["file"]) if isinstance(attribution, dict) else None
        attr_sha = str(attribution["sha256"]) if isinstance(attribution, dict) else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"model {name}: {where} lacks a valid {exc} entry") from exc
    if not path.is_file():
        raise ModelError(f"model {name}: {path} is missing")
    verify_sha256(name, path, sha)
    if attr_path is not None and attr_sha is not None:
        verify_sha256(name, attr_path, attr_sha)
    allowed = _transaction_only()
    outside = [n for n in names if n not in allowed or n not in main_names]
    if not names or outside or len(set(names)) != len(names):
        raise ModelError(f"model {name} must score distinct transaction-only features ({', '.join(allowed)}), "
                         f"got {list(names)}; retrain it with `fraudactors train`")
    return FallbackInfo(version=name, path=path, sha256=sha, feature_names=names, review_threshold=review,
                        decline_threshold=decline, attribution_path=attr_path, attribution_sha256=attr_sha)
