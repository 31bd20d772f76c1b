"""The inference actor: coalesce feature rows from every worker, score them, route per SPEC §7.

Workers call :meth:`InferenceActor.score` with one micro-batch each. Requests wait in a bounded
mailbox; a flusher takes what is there (up to ``batch_max`` requests, lingering ``batch_linger_ms`` for
more), groups rows by model version and makes ONE call to the scorer for all of them, with at most
``max_inflight_batches`` calls in flight. The scorer runs either in a process pool (ONNX sessions
pinned per worker process, the default) or in one thread of this process (``inference_mode``).

A degraded batch (features without the store) is scored by the fallback of each row's variant
(``v1-fallback``: transaction-only features, its own thresholds), and ``decision.degraded_policy``
then says what its decision may be (:mod:`fraudactors.modeling.policy`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.actors import Mailbox, Request, ask
from fraudactors.engine.decision import Router, Thresholds, Variant
from fraudactors.engine.metrics import EngineMetrics, observe_many
from fraudactors.engine.monitor import ModelMonitor
from fraudactors.engine.routing import Routing
from fraudactors.errors import ActorDied, ModelError, PoolClosed, RoutingRefused, WorkerDied
from fraudactors.logging import get_logger
from fraudactors.modeling.policy import DegradedPolicy
from fraudactors.modeling.registry import ModelInfo, fallback_id
from fraudactors.records import record
from fraudactors.settings import Settings

# -- what runs where the scorer lives (a pool worker process, or a thread here) ----------------------

_SCORER: Any = None


def init_scorer(models_dir: str, versions: Sequence[str]) -> None:
    """Pool initializer: load and verify the models, one ONNX session per version, pinned here."""
    global _SCORER
    _SCORER = _build_scorer(models_dir, versions)


def _build_scorer(models_dir: str, versions: Sequence[str]) -> Any:
    from fraudactors.modeling.registry import load_model_info
    from fraudactors.modeling.scorer import Scorer

    return Scorer([load_model_info(models_dir, v) for v in versions])


def load_versions(models_dir: str, pins: Mapping[str, str | None], scorer: Any = None) -> None:
    """Load more versions into this worker's scorer (a routing change), each verified against its
    metadata's sha256 and, when pinned, against the sha256 the routing document records."""
    from fraudactors.modeling.registry import load_model_info

    scorer = scorer if scorer is not None else _SCORER
    if scorer is None:
        raise ModelError("scorer not initialised in this worker")
    infos = [load_model_info(models_dir, version) for version in pins]
    for info in infos:
        _check_pin(info.version, info.sha256, pins[info.version])
    scorer.add(infos)


def unload_versions(keep: Sequence[str], scorer: Any = None) -> None:
    """Let go of every version (and its fallback) not in ``keep`` in this worker's scorer."""
    scorer = scorer if scorer is not None else _SCORER
    if scorer is None:
        raise ModelError("scorer not initialised in this worker")
    scorer.retain(keep)


def scorer_versions(scorer: Any = None) -> tuple[str, ...]:
    """What this worker's scorer holds: every version and fallback it can score."""
    scorer = scorer if scorer is not None else _SCORER
    return () if scorer is None else tuple(scorer.versions)


def _check_pin(version: str, sha256: str, pinned: str | None) -> None:
    if pinned is not None and sha256 != pinned:
        raise ModelError(f"model {version}: model.onnx has sha256 {sha256[:12]}... here, the routing document "
                         f"was issued for {pinned[:12]}...; the models directories differ")


def score_requests(requests: Sequence[tuple[str, np.ndarray]], max_reasons: int,
                   scorer: Any = None) -> list[tuple[np.ndarray, list[list[str]]]]:
    """Score several (version, rows) groups in one call; returns (probabilities, reasons) per group."""
    scorer = scorer if scorer is not None else _SCORER
    if scorer is None:
        raise ModelError("scorer not initialised in this worker")
    out = []
    for version, X in requests:
        probs, reasons = scorer.score(version, X, max_reasons)
        out.append((np.asarray(probs, dtype=np.float64), reasons))
    return out


# -- results ---------------------------------------------------------------------------------------------

@record
class Scored:
    """The deciding outcome of one row."""

    variant: str
    model_version: str  # what scored it: the variant's version, or its fallback (``v1-fallback``)
    probability: float
    decision: str
    is_fraud: bool
    reasons: list[str]
    # What each shadow variant said about the same row (A/B evidence, SPEC §3 ``shadow``).
    shadows: tuple[ShadowScore, ...] = ()


@record
class ShadowScore:
    """A shadow variant's score of a row (it never decides)."""

    variant: str
    model_version: str  # the shadow's version, or its fallback for a degraded row
    probability: float
    decision: str  # what it would have decided
    is_fraud: bool


@dataclass(frozen=True, slots=True)
class _Rows:
    """One worker's micro-batch: its feature rows, the variant each row is routed to, and whether
    the rows are degraded (scored by the variants' fallbacks)."""

    X: np.ndarray
    deciding: list[Variant]
    degraded: bool = False
    router: Router | None = None  # what routed the rows (its shadows score them too)
    event_times: Sequence[float] | None = None  # for the model monitor (None: not monitored)
    # Count this scoring in the metrics and the monitor now. False: the caller may score the rows
    # again (its state write is pending) and hands the scoring it publishes to observe().
    observe: bool = True


_Request = Request[_Rows, list[Scored]]


@dataclass(frozen=True, slots=True)
class _Published:
    """A published scoring waiting to be counted: its rows, outcomes, degraded flags, event times."""

    X: np.ndarray
    scored: list[Scored]
    degraded: np.ndarray  # bool per row
    times: np.ndarray  # float64 per row (NaN: unknown, not in the monitor's windows)


def _model(version: str, degraded: bool) -> str:
    """What scores a row of ``version``: the version, or its fallback when the row is degraded."""
    return fallback_id(version) if degraded else version


@dataclass(slots=True)
class _Results:
    """One coalesced call's results, per model: probabilities and reasons of the rows it scored,
    and each batch row's position among them (-1: not scored by that model)."""

    degraded: list[bool]
    amounts: np.ndarray | None  # the rows' amount feature (only for decision.degraded_policy approve-below)
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    reasons: dict[str, list[list[str]]] = field(default_factory=dict)
    position: dict[str, np.ndarray] = field(default_factory=dict)


def _chunks(requests: list[_Request], max_rows: int) -> list[list[_Request]]:
    """Group requests into calls of at most ``max_rows`` rows (a larger request goes alone)."""
    out: list[list[_Request]] = []
    current: list[_Request] = []
    rows = 0
    for req in requests:
        if req.abandoned:
            continue
        n = len(req.payload.deciding)
        # rows routed before and after a routing change never share a call (their shadows differ)
        if current and (rows + n > max_rows or req.payload.router is not current[0].payload.router):
            out.append(current)
            current, rows = [], 0
        current.append(req)
        rows += n
    if current:
        out.append(current)
    return out


class InferenceActor:
    """Micro-batched, routed scoring on top of a process pool or a thread."""

    def __init__(self, settings: Settings, metrics: EngineMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.router = Router(settings.models.variants)
        # swapped by apply_routing (a routing change from the control topic), kept across restarts
        self.routing = Routing.from_settings(settings.models)
        self._applying = asyncio.Lock()
        # per model that scores: each version and its fallback (fallback_id(version))
        self._thresholds: dict[str, Thresholds] = {}
        self._policy = DegradedPolicy.from_settings(settings.decision)
        self._amount_column = 0
        self.mailbox: Mailbox[_Request] = Mailbox(max(64, settings.engine.mailbox_size // 8), "inference")
        self._inflight = asyncio.Semaphore(settings.engine.max_inflight_batches)
        self._pool: Any = None
        self._thread: ThreadPoolExecutor | None = None
        self._local_scorer: Any = None
        self._loaded: tuple[str, ...] = ()  # versions in every scorer (see apply_routing)
        self._ready = asyncio.Event()
        # Calls in flight and the requests each one answers (a call cancelled before it started
        # never runs: its requests are failed from here on close).
        self._calls: dict[asyncio.Task[None], list[_Request]] = {}
        self._log = get_logger(actor="inference", mode=settings.engine.inference_mode)
        self._not_a_probability_logged: dict[str, float] = {}
        self.feature_names: tuple[str, ...] = ()
        self.monitor: ModelMonitor | None = None
        # Published scorings not yet counted in the metrics and the monitor (see observe()); a
        # scrape counts them first (the hook runs before the monitor's, which is added later).
        self._published: list[_Published] = []
        self._published_rows = 0
        metrics.on_collect.append(self._count_published)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def depth(self) -> int:
        return self.mailbox.depth

    def _load_thresholds(self) -> None:
        thresholds, names, infos = self._thresholds_for(self.router.versions, self.routing.models)
        self._thresholds.update(thresholds)
        self.feature_names = names
        self._monitor_models(infos)
        if self._policy.mode == "approve-below":
            if "amount" not in self.feature_names:
                raise ModelError("decision.degraded_policy approve-below needs the models' 'amount' feature")
            self._amount_column = self.feature_names.index("amount")

    def _thresholds_for(self, versions: Sequence[str], pins: Mapping[str, str | None],
                        ) -> tuple[dict[str, Thresholds], tuple[str, ...], list[ModelInfo]]:
        """Read and verify ``versions``' metadata: the thresholds of each and of its fallback, the
        feature names they share, and their infos."""
        from fraudactors.modeling.registry import load_model_info

        names: tuple[str, ...] | None = None
        thresholds: dict[str, Thresholds] = {}
        infos: list[ModelInfo] = []
        for version in versions:
            info = load_model_info(self._settings.models.dir, version)
            infos.append(info)
            _check_pin(version, info.sha256, pins.get(version))
            thresholds[version] = Thresholds.resolve(
                self._settings.decision, info.review_threshold, info.decline_threshold)
            if info.fallback is None:
                raise ModelError(f"model {version} has no fallback for degraded mode ({info.directory}/metadata.json "
                                 "has no 'fallback' section); retrain it with `fraudactors train`")
            # decision.review_threshold / decline_threshold are probabilities of the main models;
            # the fallback always decides with its own calibrated thresholds.
            thresholds[info.fallback.version] = Thresholds(
                review=min(info.fallback.review_threshold, info.fallback.decline_threshold),
                decline=info.fallback.decline_threshold)
            if names is not None and tuple(info.feature_names) != names:
                raise ModelError(f"model {version} expects different features than the other variants")
            names = tuple(info.feature_names)
        return thresholds, names or (), infos

    def _monitor_models(self, infos: Sequence[ModelInfo]) -> None:
        """Monitor ``infos`` too (the first call creates the monitor; its windows outlive restarts)."""
        if not self._settings.monitor.enabled:
            return
        if self.monitor is None:
            self.monitor = ModelMonitor(self._settings.monitor, self._metrics, infos)
        else:
            self.monitor.add(infos)

    async def apply_routing(self, routing: Routing) -> None:
        """Route by ``routing`` from now on. Every version it scores with is first loaded and
        sha256-checked in every scorer (each pool worker, or the scorer thread); any failure raises
        :class:`RoutingRefused` and the routing in force stays. The swap is one assignment: a batch
        routed before it finishes with its variants and models (they stay loaded), every batch
        routed after it uses the new routing. Other errors (the actor stopping) propagate.

        After the swap the scorers let go of every version that neither this routing, the one it
        names as its previous (a rollback needs no load) nor the routing it replaced (batches it
        routed may still be in flight) uses: through any number of promotions a scorer holds at
        most three routings' models. A version unloaded here is loaded again (and checked) if a
        later routing brings it back."""
        async with self._applying:
            await self._ready.wait()
            router = Router(routing.variants)
            pins = {version: routing.models.get(version) for version in router.versions}
            models_dir = str(Path(self._settings.models.dir))
            try:
                thresholds, names, infos = await asyncio.to_thread(self._thresholds_for, router.versions, pins)
                if self.feature_names and names != self.feature_names:
                    raise ModelError("the routed models expect different features than the ones loaded")
                loaded = tuple(sorted(set(self._loaded) | set(router.versions)))
                if self._pool is not None:
                    await self._pool.broadcast(load_versions, models_dir, pins, initargs=(models_dir, loaded))
                elif self._thread is not None:
                    await asyncio.get_running_loop().run_in_executor(
                        self._thread, load_versions, models_dir, pins, self._local_scorer)
                else:
                    raise ActorDied("inference actor is not running")
            except ModelError as exc:
                raise RoutingRefused(f"routing revision {routing.revision} refused: {exc}") from exc
            self._thresholds.update(thresholds)
            self._loaded = loaded
            self._monitor_models(infos)
            replaced, self.router, self.routing = self.router, router, routing
            keep = set(router.versions) | set(replaced.versions)
            if routing.previous is not None:
                keep |= set(Router(routing.previous.variants).versions)
            await self._unload(models_dir, tuple(sorted(keep)))

    async def _unload(self, models_dir: str, keep: tuple[str, ...]) -> None:
        """Every scorer keeps ``keep`` only (a worker started later loads just those)."""
        dropped = sorted(set(self._loaded) - set(keep))
        if not dropped:
            return
        try:
            if self._pool is not None:
                await self._pool.broadcast(unload_versions, keep, initargs=(models_dir, keep))
            elif self._thread is not None:
                await asyncio.get_running_loop().run_in_executor(self._thread, unload_versions, keep,
                                                                 self._local_scorer)
        except (ModelError, PoolClosed) as exc:  # the routing is applied; this is memory only
            self._log.warning("models_unload_failed", versions=dropped, error=repr(exc))
            return
        self._loaded = keep
        if self.monitor is not None:
            self.monitor.retain([*keep, *(fallback_id(v) for v in keep)])
        self._log.info("models_unloaded", versions=dropped, loaded=list(keep))

    async def scorer_versions(self) -> tuple[str, ...]:
        """What the scorer holds (one pool worker's view; the workers are kept alike)."""
        if self._pool is not None:
            return await self._pool.call(scorer_versions)
        if self._thread is not None:
            return await asyncio.get_running_loop().run_in_executor(self._thread, scorer_versions,
                                                                    self._local_scorer)
        return ()

    async def run(self, task_status: Any) -> None:
        """Supervised child: load models (verify sha256), start the scorer, then serve."""
        engine = self._settings.engine
        models_dir = str(Path(self._settings.models.dir))
        versions = self._loaded = self.router.versions
        if self.mailbox.failed:  # a restart after a crash: the old mailbox failed its callers
            self.mailbox = Mailbox(self.mailbox.maxsize, self.mailbox.name)
        await asyncio.to_thread(self._load_thresholds)
        if engine.inference_mode == "process":
            from fraudactors.actors.pool import ProcessPool

            pool = ProcessPool(engine.inference_workers, init_scorer, (models_dir, versions),
                               max_inflight=engine.max_inflight_batches,
                               ready_timeout=engine.start_timeout_s)
            await pool.start()
            self._pool = pool
        else:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fraudactors-scorer")
            loop = asyncio.get_running_loop()
            self._local_scorer = await loop.run_in_executor(self._thread, _build_scorer, models_dir, versions)
        self._ready.set()
        self._log.info("inference_started", versions=list(versions), workers=engine.inference_workers)
        task_status.started()
        try:
            await self._flush_loop()
        finally:
            self._ready.clear()
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        self._count_published()
        for task, batch in list(self._calls.items()):
            task.cancel()
            for req in batch:
                req.reject(ActorDied("inference actor stopped"))
        # Every caller still waiting (queued, or blocked on a full mailbox) gets ActorDied now.
        self.mailbox.fail(ActorDied("inference actor stopped"))
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.shutdown(wait=False, cancel_futures=True)

    async def score(self, X: np.ndarray, transaction_ids: Sequence[str], degraded: bool = False,
                    event_times: Sequence[float] | None = None, observe: bool = True) -> list[Scored]:
        """Score one micro-batch; rows are routed by transaction id; ``degraded`` rows are scored by
        their variant's fallback under ``decision.degraded_policy``; ``event_times`` (the rows'
        transaction times) feed the model monitor. With ``observe=False`` the scoring is not
        counted in the metrics nor the monitor: the caller hands the one it publishes to
        :meth:`observe`. Raises ActorDied when stopped."""
        if not self._ready.is_set():
            await self._ready.wait()
        router = self.router
        route = router.route
        return await ask(self.mailbox, _Rows(X, [route(t) for t in transaction_ids], degraded, router, event_times,
                                             observe))

    def observe(self, X: np.ndarray, scored: Sequence[Scored], degraded: bool,
                event_times: Sequence[float] | None) -> None:
        """Count a scoring made with ``observe=False`` in the metrics and the model monitor: the
        one its caller published (a batch is scored while its state is written, and scored again
        on other features if the write fails: only the published scoring is counted). Counted with
        the next coalesced call, at the next scrape, or once ``batch_max`` rows wait."""
        n = len(scored)
        if not n:
            return
        times = (np.asarray(event_times, dtype=np.float64) if event_times is not None
                 else np.full(n, np.nan))
        self._published.append(_Published(X, list(scored), np.full(n, degraded), times))
        self._published_rows += n
        if self._published_rows >= self._settings.engine.batch_max:
            self._count_published()

    async def _flush_loop(self) -> None:
        """Coalesce the workers' requests: flush on ``batch_max`` requests or after the linger."""
        engine = self._settings.engine
        loop = asyncio.get_running_loop()
        while True:
            requests = await self.mailbox.get_batch(engine.batch_max, engine.batch_linger_ms / 1000.0)
            for batch in _chunks(requests, engine.batch_max):
                await self._start_call(loop, batch)

    async def _start_call(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        """One scoring call in flight, once a permit is free. The permit goes back when the call's
        task is done, however it ends: a task cancelled before its first step (the actor
        stopping or crashing right after starting it) never runs its own code, and the
        semaphore outlives the actor's restarts."""
        await self._inflight.acquire()
        task = loop.create_task(self._call(batch))
        self._calls[task] = batch
        task.add_done_callback(self._forget_call)

    def _forget_call(self, task: asyncio.Task[None]) -> None:
        self._calls.pop(task, None)
        self._inflight.release()

    async def _call(self, batch: list[_Request]) -> None:
        try:
            results = await self._score_batch(batch)
        except BaseException as exc:
            for req in batch:
                req.reject(exc if isinstance(exc, Exception) else ActorDied(repr(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for req, result in zip(batch, results, strict=True):
            req.resolve(result)

    async def _score_batch(self, batch: list[_Request]) -> list[list[Scored]]:
        X = np.concatenate([r.payload.X for r in batch]) if len(batch) > 1 else batch[0].payload.X
        deciding = [v for r in batch for v in r.payload.deciding]
        degraded = [r.payload.degraded for r in batch for _ in r.payload.deciding]
        n = len(deciding)
        router = batch[0].payload.router or self.router  # one router per call (see _chunks)
        self._metrics.inference_batch_size.observe(n)
        # The rows each model scores: its deciding rows, plus every row for each shadow variant
        # (a degraded row is scored by the variant's fallback).
        deciding_model = [_model(v.version, degraded[i]) for i, v in enumerate(deciding)]
        rows_of: dict[str, list[int]] = {}
        for i, model in enumerate(deciding_model):
            rows_of.setdefault(model, []).append(i)
        for shadow in router.shadows:
            for i in range(n):
                rows_of.setdefault(_model(shadow.version, degraded[i]), []).append(i)
        index = {model: np.unique(rows) for model, rows in rows_of.items()}  # sorted, each row once
        requests = [(model, X if rows.size == n else X[rows]) for model, rows in index.items()]
        t0 = time.perf_counter()
        results = await self._invoke(requests)
        self._metrics.stage_latency.labels("inference").observe(time.perf_counter() - t0)

        res = _Results(degraded=degraded,
                       amounts=X[:, self._amount_column] if self._policy.mode == "approve-below" else None)
        for (model, rows), (p, r) in zip(index.items(), results, strict=True):
            if not ((p >= 0.0) & (p <= 1.0)).all():  # NaN fails both
                p = self._not_a_probability(model, p)
            position = np.full(n, -1, dtype=np.intp)
            position[rows] = np.arange(rows.size)
            res.probs[model], res.reasons[model], res.position[model] = p, r, position
        shadow_scores = self._shadow_scores(res, router)

        scored: list[Scored] = []
        is_fraud_decisions = self._settings.decision.is_fraud_decisions
        for i, (v, model) in enumerate(zip(deciding, deciding_model, strict=True)):
            prob, decision, reasons = self._outcome(res, model, i)
            shadows = tuple(scores[i] for scores in shadow_scores) if shadow_scores else ()
            scored.append(Scored(v.name, model, prob, decision, decision in is_fraud_decisions, reasons, shadows))
        # Split back per request; count the ones to be counted now.
        out: list[list[Scored]] = []
        start = 0
        for req in batch:
            payload = req.payload
            end = start + len(payload.deciding)
            out.append(scored[start:end])
            if payload.observe:
                self.observe(payload.X, out[-1], payload.degraded, payload.event_times)
            start = end
        self._count_published()
        return out

    def _not_a_probability(self, model: str, p: np.ndarray) -> np.ndarray:
        """A broken model's scores that are no probability go to review: neither approved (every
        comparison with NaN is false) nor declined on a number that means nothing, and never an
        exception on the decision path (the batch would be retried for ever)."""
        bad = ~((p >= 0.0) & (p <= 1.0))
        p = p.copy()
        p[bad] = self._thresholds[model].review
        count = int(bad.sum())
        self._metrics.nonfinite_scores.labels(model).inc(count)
        now = time.monotonic()
        if now - self._not_a_probability_logged.get(model, -math.inf) >= 10.0:  # not a line per batch
            self._not_a_probability_logged[model] = now
            self._log.error("model_score_not_a_probability", version=model, rows=count,
                            detail="decided at the model's review threshold; counted in "
                                   "fraudactors_nonfinite_scores_total (logged at most every 10 s)")
        return p

    def _count_published(self) -> None:
        """Count the published scorings waiting (see :meth:`observe`) in the metrics and the monitor."""
        if not self._published:
            return
        published, self._published, self._published_rows = self._published, [], 0
        metrics, monitor = self._metrics, self.monitor
        if len(published) == 1:
            scored, degraded = published[0].scored, published[0].degraded
        else:
            scored = [s for p in published for s in p.scored]
            degraded = np.concatenate([p.degraded for p in published])
        # the histograms are the main models' scores; a fallback's scale differs
        observed: dict[str, list[float]] = {}
        shadow_counts: dict[tuple[str, str, str], int] = {}
        # per model, deciding or shadow: the rows it scored and its probabilities (for the monitor)
        by_model: dict[str, tuple[list[int], list[float]]] = {}
        for i, (s, fallback) in enumerate(zip(scored, degraded.tolist(), strict=True)):
            if monitor is not None:
                rows, probs = by_model.setdefault(s.model_version, ([], []))
                rows.append(i)
                probs.append(s.probability)
            if not fallback:
                observed.setdefault(s.variant, []).append(s.probability)
            for sh in s.shadows:
                if not fallback:
                    observed.setdefault(sh.variant, []).append(sh.probability)
                key = (sh.variant, sh.model_version, sh.decision)
                shadow_counts[key] = shadow_counts.get(key, 0) + 1
                if monitor is not None:
                    rows, probs = by_model.setdefault(sh.model_version, ([], []))
                    rows.append(i)
                    probs.append(sh.probability)
        for name, values in observed.items():
            observe_many(metrics.fraud_probability.labels(name), values)
        for labels, count in shadow_counts.items():
            metrics.shadow_scores.labels(*labels).inc(count)
        if monitor is not None:  # the feature rows and times are the monitor's alone
            one = len(published) == 1
            X = published[0].X if one else np.concatenate([p.X for p in published])
            times = published[0].times if one else np.concatenate([p.times for p in published])
            monitor.observe(X, {m: (np.asarray(rows, dtype=np.intp), np.asarray(probs, dtype=np.float64))
                                for m, (rows, probs) in by_model.items()}, degraded, times)

    def _outcome(self, res: _Results, model: str, row: int) -> tuple[float, str, list[str]]:
        """``model``'s probability, decision and reasons for ``row`` (degraded: under the policy)."""
        at = int(res.position[model][row])
        prob = float(res.probs[model][at])
        decision = self._thresholds[model].decide(prob)
        if res.degraded[row]:
            decision = self._policy.apply(decision, float(res.amounts[row]) if res.amounts is not None else 0.0)
        return prob, decision, res.reasons[model][at]

    def _shadow_scores(self, res: _Results, router: Router) -> list[list[ShadowScore]]:
        """Each shadow variant's score of every row."""
        out: list[list[ShadowScore]] = []
        is_fraud_decisions = self._settings.decision.is_fraud_decisions
        for shadow in router.shadows:
            scores: list[ShadowScore] = []
            for i, degraded in enumerate(res.degraded):
                model = _model(shadow.version, degraded)
                prob, decision, _ = self._outcome(res, model, i)
                scores.append(ShadowScore(shadow.name, model, prob, decision, decision in is_fraud_decisions))
            out.append(scores)
        return out

    async def _invoke(self, requests: list[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, list[list[str]]]]:
        max_reasons = self._settings.decision.max_reasons
        timeout = self._settings.engine.inference_timeout_s
        if self._pool is not None:
            pool = self._pool
            try:
                async with asyncio.timeout(timeout):
                    result: list[tuple[np.ndarray, list[list[str]]]] = await pool.call(
                        score_requests, requests, max_reasons)
                    return result
            except WorkerDied:
                self._log.warning("inference_worker_died_retrying")
                async with asyncio.timeout(timeout):
                    result = await pool.call(score_requests, requests, max_reasons)
                    return result
        if self._thread is None:
            raise ActorDied("inference actor is not running")
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            return await loop.run_in_executor(self._thread, score_requests, requests, max_reasons,
                                              self._local_scorer)
