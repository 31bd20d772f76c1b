"""The engine: every actor of one replica under a root supervisor, plus readiness and /predict.

Children, in start order (each reports ready before the next starts; they stop in reverse):

    feature_store -> inference -> routing -> publisher -> outcomes -> ingestor -> labels -> ab -> http
    -> readiness

``routing`` follows the control topic (live routing changes, :mod:`fraudactors.engine.control`): it
applies the newest routing document before the ingestor starts, so no transaction is decided before
this replica routes as the others do.

The root strategy is one-for-one: the actors hold no state the others depend on across a restart
(a worker waiting on the publisher or the inference actor waits for its restart), so a crash of
one does not tear down the others. The ingestor owns the per-partition feature workers (a supervisor of their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from fraudactors.engine.ab import ABReporter
from fraudactors.engine.control import RoutingFollower
from fraudactors.engine.decision import encode_decision, utc_now_iso
from fraudactors.engine.features import FeatureStoreActor
from fraudactors.engine.http import HttpServer, Response
from fraudactors.engine.inference import InferenceActor
from fraudactors.engine.ingestor import Ingestor
from fraudactors.engine.labels import LabelConsumer, OutcomeRecorder
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.publisher import Publisher
from fraudactors.engine.worker import Stages
from fraudactors.errors import FraudActorsError, InvalidRecord, StartupTimeout
from fraudactors.logging import get_logger
from fraudactors.redact import redact
from fraudactors.settings import Settings, secret_values

_JSON = "application/json"
_READINESS_INTERVAL_S = 0.1


class Engine:
    """One replica. ``await engine.start()`` returns once every actor is up (not necessarily ready:
    see :meth:`wait_ready`); ``await engine.stop()`` drains, commits and leaves the group."""

    def __init__(self, settings: Settings) -> None:
        from fraudactors.actors.supervisor import ChildSpec, Restart, Strategy, Supervisor

        self.settings = settings
        self.metrics = EngineMetrics()
        m = self.metrics
        self.features = FeatureStoreActor(settings, m)
        self.inference = InferenceActor(settings, m)
        self.routing = RoutingFollower(settings, m, self.inference)
        self.publisher = Publisher(settings, m)
        self.outcomes = OutcomeRecorder(settings, m)
        self.ingestor = Ingestor(settings, m, Stages(self.features, self.inference, self.publisher,
                                                     on_decided=self.outcomes.record))
        self.labels = LabelConsumer(settings, m, self.features, self.outcomes, self.publisher)
        self.ab = ABReporter(settings, m)
        self.http = HttpServer(settings.http, self.metrics.registry, self)
        self._secrets = secret_values(settings)
        engine = settings.engine
        start_timeout = engine.start_timeout_s
        stop_timeout = engine.shutdown_timeout_s
        self._specs = [
            ChildSpec("feature_store", self.features.run, start_timeout=start_timeout, shutdown_timeout=5.0),
            ChildSpec("inference", self.inference.run, start_timeout=start_timeout, shutdown_timeout=10.0),
            ChildSpec("routing", self.routing.run, start_timeout=start_timeout, shutdown_timeout=5.0),
            ChildSpec("publisher", self.publisher.run, start_timeout=start_timeout,
                      shutdown_timeout=stop_timeout),
            ChildSpec("outcomes", self.outcomes.run, start_timeout=start_timeout, shutdown_timeout=5.0),
            # transient: it returns normally only when the engine stops; a stall or crash restarts it
            ChildSpec("ingestor", self.ingestor.run, restart=Restart.TRANSIENT, start_timeout=start_timeout,
                      shutdown_timeout=stop_timeout),
            ChildSpec("labels", self.labels.run, start_timeout=start_timeout, shutdown_timeout=5.0),
            ChildSpec("ab", self.ab.run, start_timeout=10.0, shutdown_timeout=2.0),
            ChildSpec("http", self.http.run, start_timeout=10.0, shutdown_timeout=5.0),
            ChildSpec("readiness", self._readiness_loop, restart=Restart.PERMANENT, shutdown_timeout=2.0),
        ]
        self._specs = [dataclasses.replace(spec, start=self._counted(spec.id, spec.start)) for spec in self._specs]
        self.supervisor = Supervisor("engine", self._specs, strategy=Strategy.ONE_FOR_ONE,
                                     max_restarts=engine.restart_max, window_s=engine.restart_window_s)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._was_ready = False
        self._stopping = False
        self._log = get_logger(actor="engine")

    def _counted(self, child_id: str, start: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        """Wrap a child's start: every call after the first is a restart, counted per actor."""
        calls = 0
        counter = self.metrics.actor_restarts

        async def run(task_status: Any) -> None:
            nonlocal calls
            calls += 1
            if calls > 1:
                counter.labels(child_id).inc()
            await start(task_status)

        return run

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        class _Status:
            def started(self, value: Any = None) -> None:
                if not started.done():
                    started.set_result(None)

        self._task = asyncio.create_task(self.supervisor.run(_Status()), name="engine-supervisor")
        await asyncio.wait([started, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            await self._task  # raises the start failure
            raise StartupTimeout("engine supervisor exited before it was ready")

    @property
    def done(self) -> asyncio.Task[None] | None:
        """The root supervisor's task: it ends when the engine stops or fails for good."""
        return self._task

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        async with asyncio.timeout(timeout_s):
            waiter = asyncio.ensure_future(self._ready.wait())
            try:
                tasks: list[asyncio.Future[Any]] = [waiter]
                if self._task is not None:
                    tasks.append(self._task)
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if self._task is not None and self._task.done():
                self._task.result()
                raise StartupTimeout("engine stopped before it was ready")

    async def stop(self) -> None:
        """Graceful: stop fetching, finish and publish what is in flight, commit, leave the group.

        The children stop in reverse start order: the ingestor (workers drained, acknowledgements
        awaited, offsets committed) before the publisher, whose shutdown flushes what is still
        unacknowledged within a deadline and then stops retrying (``Publisher.flush``/``stop``).
        """
        if self._stopping:
            return
        self._stopping = True
        self._log.info("engine_stopping")
        self.ingestor.stop_fetching()
        try:
            async with asyncio.timeout(self.settings.engine.shutdown_timeout_s):
                await self.supervisor.stop()
        finally:
            if self._task is not None and not self._task.done():
                self._task.cancel()
            if self._task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._log.info("engine_stopped")

    # ---------------------------------------------------------------- readiness
    def readiness(self) -> dict[str, Any]:
        problems: dict[str, Any] = {}
        ing = self.ingestor
        if ing.stalled_reason is not None:
            problems["consumer"] = f"stalled, restarting: {ing.stalled_reason}"
        elif not ing.running:
            problems["consumer"] = "not running"
        elif not ing.assigned:
            problems["partitions"] = "no partitions assigned"
        if not self.inference.ready:
            problems["models"] = "not loaded"
        if not self.features.up:
            problems["feature_store"] = "unreachable"
        if not self.publisher.ready:
            problems["publisher"] = "producer not started"
        if self._stopping:
            problems["engine"] = "stopping"
        return problems

    async def _readiness_loop(self, task_status: Any) -> None:
        task_status.started()
        while True:
            ready = not self.readiness()
            self.metrics.ready.set(1 if ready else 0)
            if ready and not self._was_ready:
                self._ready.set()
                self._log.info("engine_ready", port=self.http.port, partitions=self.ingestor.assigned)
            elif not ready and self._was_ready:
                self._ready.clear()
                self._log.warning("engine_not_ready", problems=self.readiness())
            self._was_ready = ready
            for mailbox, depth in (("inference", self.inference.depth), ("publisher", self.publisher.pending)):
                self.metrics.mailbox_depth.labels(mailbox).set(depth)
            t = time.perf_counter()
            await asyncio.sleep(_READINESS_INTERVAL_S)
            self.metrics.loop_lag.observe(max(0.0, time.perf_counter() - t - _READINESS_INTERVAL_S))

    # ---------------------------------------------------------------- HTTP (engine/http.py serves these)
    def healthz(self) -> Response:
        alive = self._task is not None and not self._task.done()
        return (200 if alive else 503), _JSON, orjson.dumps({"status": "alive" if alive else "dead"})

    def readyz(self) -> Response:
        problems = {name: redact(str(why), self._secrets) for name, why in self.readiness().items()}
        if problems:
            return 503, _JSON, orjson.dumps({"ready": False, "not_ready": problems})
        return 200, _JSON, orjson.dumps({"ready": True, "partitions": self.ingestor.assigned})

    async def predict(self, body: bytes) -> Response:
        """SPEC §6: one transaction in, one decision out, same features, models and routing.

        /predict reads the user's online state but does not write it: it is a what-if score, and
        the same transaction arriving later on the stream must not be counted twice.
        """
        from fraudactors.features.schema import transaction_from_obj

        t0 = time.monotonic()
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return 422, _JSON, orjson.dumps({"error": f"body is not JSON: {exc}"})
        try:
            txn = transaction_from_obj(obj)
        except InvalidRecord as exc:
            return 422, _JSON, orjson.dumps({"error": exc.reason})
        if not self.inference.ready:
            return 503, _JSON, orjson.dumps({"error": "models not loaded"})
        try:
            X, degraded = await self.features.peek([txn])
            scored = (await self.inference.score(X, [txn.transaction_id], degraded=degraded))[0]
        except FraudActorsError as exc:
            return 503, _JSON, orjson.dumps({"error": redact(str(exc), self._secrets)})
        return 200, _JSON, encode_decision(
            transaction_id=txn.transaction_id, user_id=txn.user_id, is_fraud=scored.is_fraud,
            fraud_probability=scored.probability, decision=scored.decision,
            model_version=scored.model_version, variant=scored.variant, reasons=scored.reasons,
            degraded=degraded, event_time=txn.timestamp, decided_at=utc_now_iso(),
            latency_ms=(time.monotonic() - t0) * 1000.0,
            shadow={sh.variant: sh.probability for sh in scored.shadows}
            if self.settings.engine.emit_shadow else None)
