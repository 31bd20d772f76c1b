"""ONNX scoring with reasons: one single-threaded onnxruntime session per model version.

``score(version, X)`` returns the fraud probability of every row and, per row, up to ``max_reasons``
feature names with the largest positive tree path contribution (:mod:`.attribution`). The ONNX bytes
are checked against the sha256 of the metadata as they are loaded, so the session runs exactly the
verified file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fraudactors.errors import ModelError
from fraudactors.modeling.attribution import TreeAttribution
from fraudactors.modeling.registry import ModelInfo, verify_sha256


@dataclass
class _Loaded:
    info: ModelInfo
    session: object
    input_name: str
    output_name: str
    attribution: TreeAttribution | None


def make_session(data: bytes) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


class Scorer:
    def __init__(self, infos: Sequence[ModelInfo]) -> None:
        self._models: dict[str, _Loaded] = {}
        for info in infos:
            path = info.model_path
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ModelError(f"model {info.version}: cannot read {path}: {exc.strerror or exc}") from exc
            verify_sha256(info.version, path, info.sha256, data)
            try:
                session = make_session(data)
            except Exception as exc:  # onnxruntime raises its own (non-public) exception types
                raise ModelError(f"model {info.version}: onnxruntime cannot load {path}: {exc}") from exc
            outputs = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
            output = "probabilities" if "probabilities" in outputs else outputs[-1]
            attribution = None
            attr_path, attr_sha = info.attribution_path, info.attribution_sha256
            if attr_path is not None:
                if attr_sha is not None:
                    verify_sha256(info.version, attr_path, attr_sha)
                attribution = TreeAttribution.load(attr_path)
                if attribution.n_features != len(info.feature_names):
                    raise ModelError(f"model {info.version}: attribution has {attribution.n_features} features, "
                                     f"metadata {len(info.feature_names)}")
            self._models[info.version] = _Loaded(
                info=info, session=session, input_name=session.get_inputs()[0].name,  # type: ignore[attr-defined]
                output_name=output, attribution=attribution)

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

    def _check(self, model: _Loaded, X: np.ndarray) -> np.ndarray:
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
        out = model.session.run([model.output_name], {model.input_name: X})[0]  # type: ignore[attr-defined]
        return np.asarray(out, dtype=np.float64)[:, 1]

    def score(self, version: str, X: np.ndarray, max_reasons: int = 3) -> tuple[np.ndarray, list[list[str]]]:
        """``(probabilities (n,), reasons)``; reasons are feature names with positive contributions,
        largest first, at most ``max_reasons`` per row."""
        model = self._get(version)
        X = self._check(model, X)
        probs = self.predict_proba(version, X)
        if model.attribution is None or max_reasons <= 0:
            return probs, [[] for _ in range(X.shape[0])]
        return probs, model.attribution.reasons(X, model.info.feature_names, max_reasons)
