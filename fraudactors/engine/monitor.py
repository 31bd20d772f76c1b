"""The model monitor: population stability of each model's inputs and scores, in event time.

:class:`ModelMonitor` sees every published scoring (the feature rows, each model that scored them
-- the deciding one and every shadow variant's -- with its probabilities, whether each row was
degraded, its event time). It bins them on the edges of
the model's training reference (``metadata.json`` section ``reference``,
:mod:`fraudactors.modeling.reference`) into a ring of ``monitor.sub_windows`` sub-windows covering
the last ``monitor.window_s`` seconds of **event time**. The hot path only bins and counts; each
scrape of /metrics (``EngineMetrics.on_collect``) then exports per version the PSI of each feature
and of the score once the window holds ``monitor.min_rows`` rows, and the share of degraded
decisions in the window. Rows older than the window are not counted.

Degraded rows are scored by the fallback, whose features are stand-ins for the missing state:
they count towards the fallback's score PSI (``version="v1-fallback"``) and the degraded share,
never towards the feature PSI. A shadow variant's version has its own window: its score PSI (and
its reference's feature PSI) is there before it decides anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fraudactors.engine.metrics import EngineMetrics
from fraudactors.logging import get_logger
from fraudactors.modeling.reference import PSI_EPSILON, Histogram
from fraudactors.modeling.registry import ModelInfo, fallback_id
from fraudactors.settings import MonitorSettings

# Features of the calendar: a window shorter than a week sees only some of their values by
# construction, so their PSI is high without any drift. Exported, never "top" (never alerted on).
CALENDAR_FEATURES = frozenset({"hour_of_day", "day_of_week", "is_night"})


class EventTimeRing:
    """Counts of ``width`` bins in ``slots`` sub-windows of ``slot_s`` seconds of event time; a
    sub-window is cleared when a newer one takes its place. Rows older than the window are dropped."""

    def __init__(self, slots: int, slot_s: float, width: int) -> None:
        self.slot_s = slot_s
        self.counts = np.zeros((slots, width), dtype=np.int64)
        self.rows = np.zeros(slots, dtype=np.int64)
        self.held = np.full(slots, np.iinfo(np.int64).min, dtype=np.int64)  # sub-window number in each slot
        self.newest = np.iinfo(np.int64).min

    def add(self, times: np.ndarray, bins: np.ndarray) -> None:
        """``bins``: (rows, k) bin indices in ``[0, width)`` of rows at event ``times``."""
        if times.size == 0:
            return
        number = np.floor(times / self.slot_s).astype(np.int64)
        slots = self.counts.shape[0]
        self.newest = max(self.newest, int(number.max()))
        first, last = number.min(), number.max()
        groups = [(int(first), None)] if first == last else [(int(k), number == k) for k in np.unique(number)]
        for k, mask in groups:
            if k <= self.newest - slots:
                continue  # older than the window
            ring = k % slots
            if self.held[ring] != k:
                if self.held[ring] > k:
                    continue
                self.held[ring] = k
                self.counts[ring] = 0
                self.rows[ring] = 0
            chosen = bins if mask is None else bins[mask]
            self.counts[ring] += np.bincount(chosen.ravel(), minlength=self.counts.shape[1])
            self.rows[ring] += chosen.shape[0]

    def totals(self, newest: int | None = None) -> tuple[int, np.ndarray]:
        """(rows, counts per bin) of the sub-windows within the window that ends at sub-window
        ``newest`` (default: the newest this ring was given)."""
        live = self.held > (self.newest if newest is None else newest) - self.counts.shape[0]
        return int(self.rows[live].sum()), self.counts[live].sum(axis=0)


def _psi_per_group(counts: np.ndarray, expected: np.ndarray, starts: np.ndarray, rows: int) -> np.ndarray:
    """PSI of each group of consecutive bins (``starts``: each group's first bin), ``rows`` per group."""
    actual = np.maximum(counts / max(rows, 1), PSI_EPSILON)
    terms = (actual - expected) * np.log(actual / expected)
    return np.add.reduceat(terms, starts)


@dataclass
class _Model:
    """One monitored model: its histograms laid side by side in one flat bin space."""

    version: str
    columns: np.ndarray | None  # feature columns binned (None: score only)
    edges_t: np.ndarray  # (most edges, histograms): each feature's edges then the score's, padded with +inf
    offsets: np.ndarray  # first flat bin of each histogram
    expected: np.ndarray  # reference shares, floored at PSI_EPSILON
    ring: EventTimeRing
    features: list[tuple[str, str]]  # (feature, top) label values of each feature gauge
    gauges: list[Any] | None = None  # the feature gauges then the score gauge, while exported


class ModelMonitor:
    """Observes the scored rows of every inference call; see the module docstring."""

    def __init__(self, settings: MonitorSettings, metrics: EngineMetrics, infos: Sequence[ModelInfo]) -> None:
        self._settings = settings
        self._metrics = metrics
        self._log = get_logger(actor="monitor")
        self._slot_s = settings.window_s / settings.sub_windows
        self._degraded = EventTimeRing(settings.sub_windows, self._slot_s, 2)
        self._models: dict[str, _Model] = {}
        self._seen: set[str] = set()
        self.add(infos)
        metrics.on_collect.append(self.export)
        self._log.info("monitor_started", versions=sorted(self._models), window_s=settings.window_s)

    def add(self, infos: Sequence[ModelInfo]) -> None:
        """Monitor these versions too (a routing change); a version already known keeps its window."""
        settings, metrics = self._settings, self._metrics
        for info in infos:
            if info.version in self._seen:
                continue
            self._seen.add(info.version)
            if info.offline_detection_rate is not None:
                metrics.model_offline_detection_rate.labels(info.version).set(info.offline_detection_rate)
            fallback_rate = info.fallback_offline_detection_rate
            if info.fallback is not None and fallback_rate is not None:
                metrics.model_offline_detection_rate.labels(info.fallback.version).set(fallback_rate)
            if info.reference is None:
                self._log.warning("model_reference_missing", version=info.version, problem=info.reference_problem)
                continue
            ref = info.reference
            ranked = [n for n in ref.top_features if n not in CALENDAR_FEATURES]
            top = set(ranked[: settings.top_features])
            names = list(info.feature_names)
            hists = [ref.features[n] for n in names]
            labels = [(n, "true" if n in top else "false") for n in names]
            self._models[info.version] = self._model(info.version, np.arange(len(names)), hists, ref.score, labels)
            if info.fallback is not None and ref.fallback_score is not None:
                name = info.fallback.version
                self._models[name] = self._model(name, None, [], ref.fallback_score, [])

    def retain(self, versions: Sequence[str]) -> None:
        """Stop monitoring every model not in ``versions`` (names as scored: ``v1``,
        ``v1-fallback``): its window and its series go (the scorers unloaded it; a routing that
        brings it back starts a new window)."""
        keep = set(versions)
        known = self._seen | {fallback_id(v) for v in self._seen} | set(self._models)
        for name in sorted(known - keep):
            self._seen.discard(name)
            model = self._models.pop(name, None)
            if model is not None and model.gauges is not None:
                for feature, top in model.features:
                    self._metrics.feature_psi.remove(name, feature, top)
                self._metrics.score_psi.remove(name)
            with contextlib.suppress(KeyError):  # a series never set
                self._metrics.model_offline_detection_rate.remove(name)

    def _model(self, version: str, columns: np.ndarray | None, hists: list[Histogram], score: Histogram,
               labels: list[tuple[str, str]]) -> _Model:
        all_hists = [*hists, score]
        sizes = np.array([h.shares.size for h in all_hists], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        expected = np.maximum(np.concatenate([h.shares for h in all_hists]), PSI_EPSILON)
        edges = np.full((len(all_hists), max(h.edges.size for h in all_hists)), np.inf)
        for k, h in enumerate(all_hists):
            edges[k, : h.edges.size] = h.edges
        return _Model(version=version, columns=columns, edges_t=np.ascontiguousarray(edges.T), offsets=offsets,
                      expected=expected, ring=EventTimeRing(self._settings.sub_windows, self._slot_s, int(sizes.sum())),
                      features=labels)

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(self._models)

    def top_features(self, version: str) -> tuple[str, ...]:
        """The features of ``version`` exported with ``top="true"``."""
        model = self._models.get(version)
        return tuple(f for f, top in model.features if top == "true") if model is not None else ()

    def observe(self, X: np.ndarray, scored: Mapping[str, tuple[np.ndarray, np.ndarray]], degraded: np.ndarray,
                event_times: np.ndarray) -> None:
        """Rows of ``X`` as published: ``scored[model]`` is ``(rows, probabilities)``, the rows of
        ``X`` (ascending) that ``model`` scored and its probability of each -- a row decided by one
        model and scored by shadows is in several; ``degraded`` and ``event_times`` (NaN: unknown,
        not counted) per row of ``X``."""
        known = ~np.isnan(event_times)
        everything = bool(known.all())
        if not everything:
            if not known.any():
                return
            self._degraded.add(event_times[known], degraded[known, None].astype(np.int16))
        else:
            self._degraded.add(event_times, degraded[:, None].astype(np.int16))
        for version, (rows, probs) in scored.items():
            model = self._models.get(version)
            if model is None:
                continue
            if not everything:
                keep = known[rows]
                rows, probs = rows[keep], probs[keep]
            if rows.size == X.shape[0]:
                self._add(model, X, probs, event_times)
            elif rows.size:
                self._add(model, X[rows], probs, event_times[rows])

    def _add(self, model: _Model, X: np.ndarray, probs: np.ndarray, times: np.ndarray) -> None:
        # bin = how many edges lie below the value (searchsorted side="left"), for every column at once
        values = probs[:, None] if model.columns is None else np.column_stack([X[:, model.columns], probs])
        bins = np.broadcast_to(model.offsets.astype(np.int16), values.shape).copy()
        for column in model.edges_t:  # one pass per edge rank (<= bins - 1), all features at once
            bins += values > column
        model.ring.add(times, bins)

    def export(self) -> None:
        """Set the gauges from the windows (run per scrape: EngineMetrics.on_collect)."""
        rows, counts = self._degraded.totals()
        if rows:
            self._metrics.degraded_share.set(counts[1] / rows)
        for model in self._models.values():
            self._export_model(model)

    def _totals(self, model: _Model) -> tuple[int, np.ndarray]:
        # Every window ends at the newest event time of all rows (the degraded ring sees each):
        # a model whose rows stop (a fallback after an outage, a version no longer routed to) has
        # its rows leave the window as the stream goes on, not keep its last figures for good.
        return model.ring.totals(self._degraded.newest)

    def _export_model(self, model: _Model) -> None:
        rows, counts = self._totals(model)
        if rows < self._settings.min_rows:
            if model.gauges is not None:  # the window emptied (its rows stopped, or a jump in event time)
                for feature, top in model.features:
                    self._metrics.feature_psi.remove(model.version, feature, top)
                self._metrics.score_psi.remove(model.version)
                model.gauges = None
            return
        if model.gauges is None:  # created on the first figure: before it the series are absent
            model.gauges = [*(self._metrics.feature_psi.labels(model.version, feature, top)
                              for feature, top in model.features),
                            self._metrics.score_psi.labels(model.version)]
        values = _psi_per_group(counts, model.expected, model.offsets, rows)
        for gauge, value in zip(model.gauges, values, strict=True):
            gauge.set(float(value))

    def psi(self, version: str) -> Mapping[str, float] | None:
        """The current PSI per feature and ``"score"`` of ``version`` (None below ``min_rows``)."""
        model = self._models.get(version)
        if model is None:
            return None
        rows, counts = self._totals(model)
        if rows < self._settings.min_rows:
            return None
        values = _psi_per_group(counts, model.expected, model.offsets, rows)
        names = [feature for feature, _ in model.features]
        return {**dict(zip(names, map(float, values[:-1]), strict=True)), "score": float(values[-1])}
