"""ONNX scoring with reasons: single-threaded onnxruntime sessions per model version.

``score(version, X)`` returns the fraud probability of every row and, per row, up to ``max_reasons``
feature names with the largest positive tree path contribution (:mod:`.attribution`), computed by a
second session on ``attribution.onnx`` (the same trees as a multi-target ensemble,
:mod:`.attribution_onnx`). Every file is checked against the sha256 in the metadata as it is
loaded, so the sessions run exactly the verified bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.errors import ModelError
from fraudactors.modeling.attribution import top_reasons
from fraudactors.modeling.registry import ModelInfo, verify_sha256


def make_session(data: bytes) -> Any:
    """An onnxruntime session on one thread (the engine runs one per inference worker process)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def _load_session(version: str, path: Path, sha256: str | None) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"model {version}: cannot read {path}: {exc.strerror or exc}") from exc
    if sha256 is not None:
        verify_sha256(version, path, sha256, data)
    try:
        return make_session(data)
    except Exception as exc:  # onnxruntime raises its own (non-public) exception types
        raise ModelError(f"model {version}: onnxruntime cannot load {path}: {exc}") from exc


@dataclass
class _Loaded:
    info: ModelInfo
    session: Any
    input_name: str
    output_name: str
    reasons_session: Any  # ONNX path contributions, or None without an attribution file


class Scorer:
    def __init__(self, infos: Sequence[ModelInfo]) -> None:
        self._models: dict[str, _Loaded] = {}
        for info in infos:
            n_features = len(info.feature_names)
            session = _load_session(info.version, info.model_path, info.sha256)
            outputs = [o.name for o in session.get_outputs()]
            output = "probabilities" if "probabilities" in outputs else outputs[-1]
            reasons_session = None
            attr_path, attr_sha = info.attribution_path, info.attribution_sha256
            if attr_path is not None:
                reasons_session = _load_session(info.version, attr_path, attr_sha)
                shape = reasons_session.get_outputs()[0].shape
                width = shape[-1] if shape else None
                if width != n_features:
                    raise ModelError(f"model {info.version}: {attr_path.name} explains {width} features, "
                                     f"metadata.json lists {n_features}")
            self._models[info.version] = _Loaded(
                info=info, session=session, input_name=session.get_inputs()[0].name, output_name=output,
                reasons_session=reasons_session)

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(self._models)

    def info(self, version: str) -> ModelInfo:
        return self._get(version).info

    def _get(self, version: str) -> _Loaded:
        try:
            return self._models[version]
        except KeyError:
            raise ModelError(f"model {version} is not loaded (loaded: {', '.join(self._models) or 'none'})") from None

    @staticmethod
    def _check(model: _Loaded, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        n_features = len(model.info.feature_names)
        if X.ndim != 2 or X.shape[1] != n_features:
            raise ModelError(f"model {model.info.version} expects (n, {n_features}) features, got {X.shape}")
        return X

    def predict_proba(self, version: str, X: np.ndarray) -> np.ndarray:
        """Fraud probability per row, float64 (n,)."""
        model = self._get(version)
        X = self._check(model, X)
        if X.shape[0] == 0:
            return np.zeros(0)
        out = model.session.run([model.output_name], {model.input_name: X})[0]
        return np.asarray(out, dtype=np.float64)[:, 1]

    def contributions(self, version: str, X: np.ndarray) -> np.ndarray | None:
        """Per-feature path contributions (n, F) (probability or log-odds units, see the metadata's
        ``attribution.space``), or None when the model has no attribution file."""
        model = self._get(version)
        X = self._check(model, X)
        session = model.reasons_session
        if session is None:
            return None
        if X.shape[0] == 0:
            return np.zeros((0, X.shape[1]))
        return np.asarray(session.run(None, {session.get_inputs()[0].name: X})[0], dtype=np.float64)

    def score(self, version: str, X: np.ndarray, max_reasons: int = 3) -> tuple[np.ndarray, list[list[str]]]:
        """``(probabilities (n,), reasons)``; reasons are feature names with positive contributions,
        largest first, at most ``max_reasons`` per row."""
        model = self._get(version)
        X = self._check(model, X)
        probs = self.predict_proba(version, X)
        contrib = self.contributions(version, X) if max_reasons > 0 else None
        if contrib is None:
            return probs, [[] for _ in range(X.shape[0])]
        return probs, top_reasons(contrib, model.info.feature_names, max_reasons)
