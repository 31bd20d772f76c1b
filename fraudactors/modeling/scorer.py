"""ONNX scoring with reasons: single-threaded onnxruntime sessions per model version.

``score(version, X)`` returns the fraud probability of every row and, per row, up to ``max_reasons``
feature names with the largest positive tree path contribution (:mod:`.attribution`), computed by a
second session on ``attribution.onnx`` (the same trees as a multi-target ensemble,
:mod:`.attribution_onnx`). Every file is checked against the sha256 in the metadata as it is
loaded, so the sessions run exactly the verified bytes.

A version's fallback (degraded mode) is loaded beside it and scored as ``fallback_id(version)``
(``"v1-fallback"``). It takes the same full feature vector as the main model and reads only its
own (transaction-only) columns of it; its reasons are its own path contributions.
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
    name: str  # the version, or fallback_id(version)
    info: ModelInfo  # the main model's (a fallback's input is the main model's feature vector)
    session: Any
    input_name: str
    output_name: str
    reasons_session: Any  # ONNX path contributions, or None without an attribution file
    feature_names: tuple[str, ...]  # what the session reads (its reasons are named from these)
    columns: np.ndarray | None  # the columns of the full vector it reads; None: all of them


def _load(name: str, info: ModelInfo, path: Path, sha256: str, attr_path: Path | None, attr_sha: str | None,
          feature_names: tuple[str, ...], columns: np.ndarray | None) -> _Loaded:
    n_features = len(feature_names)
    session = _load_session(name, path, sha256)
    outputs = [o.name for o in session.get_outputs()]
    output = "probabilities" if "probabilities" in outputs else outputs[-1]
    reasons_session = None
    if attr_path is not None:
        reasons_session = _load_session(name, attr_path, attr_sha)
        shape = reasons_session.get_outputs()[0].shape
        width = shape[-1] if shape else None
        if width != n_features:
            raise ModelError(f"model {name}: {attr_path.name} explains {width} features, "
                             f"metadata.json lists {n_features}")
    return _Loaded(name=name, info=info, session=session, input_name=session.get_inputs()[0].name,
                   output_name=output, reasons_session=reasons_session, feature_names=feature_names,
                   columns=columns)


def _load_version(info: ModelInfo) -> dict[str, _Loaded]:
    """A version's sessions: the model, and its fallback when it has one."""
    out = {info.version: _load(info.version, info, info.model_path, info.sha256, info.attribution_path,
                               info.attribution_sha256, info.feature_names, None)}
    fb = info.fallback
    if fb is not None:
        columns = np.array([info.feature_names.index(n) for n in fb.feature_names], dtype=np.intp)
        out[fb.version] = _load(fb.version, info, fb.path, fb.sha256, fb.attribution_path,
                                fb.attribution_sha256, fb.feature_names, columns)
    return out


class Scorer:
    def __init__(self, infos: Sequence[ModelInfo]) -> None:
        self._models: dict[str, _Loaded] = {}
        for info in infos:
            self._models.update(_load_version(info))

    def add(self, infos: Sequence[ModelInfo]) -> None:
        """Load more versions, all or none (a live routing change). A version already loaded stays
        as it is; it must be the same model (sha256): a retrained model needs a new version name."""
        loaded: dict[str, _Loaded] = {}
        for info in infos:
            have = self._models.get(info.version)
            if have is None:
                loaded.update(_load_version(info))
            elif have.info.sha256 != info.sha256:
                raise ModelError(f"model {info.version} is loaded with sha256 {have.info.sha256[:12]}..., its files "
                                 f"now have {info.sha256[:12]}...; give a retrained model a new version")
        self._models.update(loaded)

    def retain(self, versions: Sequence[str]) -> None:
        """Unload every version not in ``versions`` (each kept version keeps its fallback): a
        routing change lets go of the models no routing in reach uses, so a process that lives
        through many promotions holds a bounded number of sessions."""
        keep = set(versions)
        self._models = {name: m for name, m in self._models.items() if m.info.version in keep}

    @property
    def versions(self) -> tuple[str, ...]:
        """Everything that can be scored: each version, and ``fallback_id(version)`` when it has one."""
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
        """The rows as the session reads them: float32, C order, the model's own columns."""
        X = np.asarray(X)
        n_features = len(model.info.feature_names)
        if X.ndim != 2 or X.shape[1] != n_features:
            raise ModelError(f"model {model.name} expects (n, {n_features}) features, got {X.shape}")
        if model.columns is not None:
            X = X[:, model.columns]
        return np.ascontiguousarray(X, dtype=np.float32)

    @staticmethod
    def _proba(model: _Loaded, X: np.ndarray) -> np.ndarray:
        if X.shape[0] == 0:
            return np.zeros(0)
        out = model.session.run([model.output_name], {model.input_name: X})[0]
        return np.asarray(out, dtype=np.float64)[:, 1]

    @staticmethod
    def _contributions(model: _Loaded, X: np.ndarray) -> np.ndarray | None:
        session = model.reasons_session
        if session is None:
            return None
        if X.shape[0] == 0:
            return np.zeros((0, X.shape[1]))
        return np.asarray(session.run(None, {session.get_inputs()[0].name: X})[0], dtype=np.float64)

    def predict_proba(self, version: str, X: np.ndarray) -> np.ndarray:
        """Fraud probability per row of the full feature vectors ``X``, float64 (n,)."""
        model = self._get(version)
        return self._proba(model, self._check(model, X))

    def contributions(self, version: str, X: np.ndarray) -> np.ndarray | None:
        """Per-feature path contributions (n, F) over the features the model reads (F = 31 for a
        version, its transaction-only ones for a fallback; probability or log-odds units, see the
        metadata's ``attribution.space``), or None when the model has no attribution file."""
        model = self._get(version)
        return self._contributions(model, self._check(model, X))

    def feature_names(self, version: str) -> tuple[str, ...]:
        """The features ``version`` reads, in the order of its :meth:`contributions` columns."""
        return self._get(version).feature_names

    def score(self, version: str, X: np.ndarray, max_reasons: int = 3) -> tuple[np.ndarray, list[list[str]]]:
        """``(probabilities (n,), reasons)``; reasons are feature names with positive contributions,
        largest first, at most ``max_reasons`` per row."""
        model = self._get(version)
        X = self._check(model, X)
        probs = self._proba(model, X)
        contrib = self._contributions(model, X) if max_reasons > 0 else None
        if contrib is None:
            return probs, [[] for _ in range(X.shape[0])]
        return probs, top_reasons(contrib, model.feature_names, max_reasons)
