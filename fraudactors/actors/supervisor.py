"""Supervision as data: children are declared, strategies are named, the budget is a window.

A :class:`Supervisor` owns child tasks declared by :class:`ChildSpec`. Start-up is ordered: child
N+1 starts only after child N called ``task_status.started()``, each within its
``start_timeout`` (:class:`StartupTimeout` counts as a failure). The supervisor reports ready
once all children are. When a child exits, its :class:`Restart` policy decides:

- ``PERMANENT`` -- always restarted (even after a normal return);
- ``TRANSIENT`` -- restarted only after an abnormal exit (an exception, or a cancel it did not ask for);
- ``TEMPORARY`` -- never restarted.

The :class:`Strategy` decides what is restarted: the failed child (``ONE_FOR_ONE``) or, after
stopping the siblings in reverse order, all of them in order (``ONE_FOR_ALL``). Restarts wait an
exponential backoff with jitter. At most ``max_restarts`` happen within any ``window_s`` seconds;
one more failure and the supervisor stops its children and raises
:class:`RestartIntensityExceeded` to its parent -- supervisors nest, since ``Supervisor.run`` is
a valid ``ChildSpec.start``. :func:`run_root` turns a failing root into one log line and an exit
code.

Everything happens in ``run()``, one event at a time: child exits (task done-callbacks) and
commands (``start_child``, ``terminate_child``, ``stop``) arrive on one queue. No polling.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fraudactors.actors.taskstatus import IGNORED, TaskStatus
from fraudactors.errors import ActorDied, ActorError, RestartIntensityExceeded, StartupTimeout
from fraudactors.logging import get_logger

__all__ = ["ChildSpec", "Restart", "Strategy", "Supervisor", "run_root"]


class Restart(StrEnum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(StrEnum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"


@dataclass(frozen=True)
class ChildSpec:
    id: str
    start: Callable[[TaskStatus], Awaitable[None]]  # runs the child; calls task_status.started() when READY
    restart: Restart = Restart.PERMANENT
    start_timeout: float = 30.0
    shutdown_timeout: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "restart", Restart(self.restart))  # "transient" works too
        if self.start_timeout <= 0 or self.shutdown_timeout <= 0:
            raise ValueError(f"child {self.id!r}: start_timeout and shutdown_timeout must be > 0")


class _ChildStatus:
    __slots__ = ("_ready",)

    def __init__(self, ready: asyncio.Future[Any]) -> None:
        self._ready = ready

    def started(self, value: Any = None) -> None:
        if self._ready.cancelled():
            return  # the supervisor gave up waiting; the child is being cancelled
        if self._ready.done():
            raise RuntimeError("task_status.started() called twice")
        self._ready.set_result(value)


class _Child:
    __slots__ = ("spec", "starts", "task")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.task: asyncio.Task[None] | None = None
        self.starts = 0


@dataclass(eq=False)
class _Exit:
    child: _Child
    task: asyncio.Task[None]


@dataclass(eq=False)
class _Command:
    kind: str  # "start" (arg: a ChildSpec) | "terminate" (arg: a tuple of ids)
    arg: Any
    reply: asyncio.Future[None]


_STOP = object()


def _exit_reason(task: asyncio.Task[None]) -> tuple[str, BaseException | None]:
    if task.cancelled():
        return "cancelled", None
    exc = task.exception()
    if exc is not None:
        return "error", exc
    return "normal", None


class Supervisor:
    """Runs, watches and restarts its children; fails upward when its restart budget is spent."""

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 5,
        window_s: float = 60.0,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        *,
        clock: Callable[[], float] | None = None,
        seed: int | None = None,
    ) -> None:
        ids = [spec.id for spec in children]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"supervisor {name}: duplicate child ids {duplicates}")
        if max_restarts < 0 or window_s <= 0:
            raise ValueError("max_restarts must be >= 0 and window_s > 0")
        self.name = name
        self.strategy = Strategy(strategy)
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.restarts_total = 0
        self.restarts_by_child: dict[str, int] = {}  # by the id of the child whose exit caused it
        self._static = tuple(children)
        self._clock = clock
        self._rng = random.Random(seed)
        self._children: list[_Child] = []
        self._restarts: deque[float] = deque()
        self._events: asyncio.Queue[Any] | None = None  # bounded by children + waiting callers
        self._stop_requested: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._command: _Command | None = None
        self._running = False
        self._ready = False

    @property
    def _log(self) -> Any:
        return get_logger(supervisor=self.name)  # resolved per event: supervision events are rare

    # ------------------------------------------------------------------ introspection
    @property
    def running(self) -> bool:
        return self._running

    @property
    def ready(self) -> bool:
        """True between "all children reported ready" and the start of shutdown."""
        return self._ready

    @property
    def child_ids(self) -> tuple[str, ...]:
        return tuple(c.spec.id for c in self._children)

    def child_running(self, child_id: str) -> bool:
        child = self._find(child_id)
        return child is not None and child.task is not None and not child.task.done()

    def __repr__(self) -> str:
        return f"Supervisor({self.name!r}, {self.strategy}, children={list(self.child_ids)})"

    # ------------------------------------------------------------------ public API
    async def run(self, task_status: TaskStatus = IGNORED) -> None:
        """Start the children in order, report ready, supervise until stopped or out of budget."""
        if self._running:
            raise RuntimeError(f"supervisor {self.name} is already running")
        loop = asyncio.get_running_loop()
        self._running = True
        self._ready = False
        self._children = [_Child(spec) for spec in self._static]  # dynamic children do not survive a restart
        self._restarts.clear()
        self._events = asyncio.Queue()
        self._stop_requested = loop.create_future()
        self._done = loop.create_future()
        try:
            await self._start_initial()
            if not self._stopping:
                self._ready = True
                self._log.info("supervisor_started", children=list(self.child_ids))
                task_status.started()
                await self._serve()
        finally:
            self._ready = False
            cleanup = loop.create_task(self._shutdown(), name=f"{self.name}.shutdown")
            await asyncio.shield(cleanup)

    async def stop(self) -> None:
        """Stop the children in reverse order and let ``run()`` return. Idempotent."""
        if not self._running or self._done is None:
            return
        self._request_stop()
        await asyncio.shield(self._done)

    async def start_child(self, spec: ChildSpec) -> None:
        """Add and start a child on a running supervisor; returns once it reported ready.

        Raises ``ValueError`` for a duplicate id, or the start failure (e.g. StartupTimeout),
        in which case the child is not added. Do not call it before your own child reported ready.
        """
        await self._submit("start", spec)

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child (cancel, wait up to its shutdown_timeout) and forget it. Unknown id: no-op."""
        await self._submit("terminate", (child_id,))

    async def terminate_children(self, child_ids: Iterable[str]) -> None:
        """Stop several children at once -- concurrently, each within its shutdown_timeout -- and
        forget them (peers that drain in parallel, e.g. one worker per partition). Unknown ids: no-op."""
        await self._submit("terminate", tuple(child_ids))

    # ------------------------------------------------------------------ internals
    @property
    def _stopping(self) -> bool:
        return self._stop_requested is None or self._stop_requested.done()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _find(self, child_id: str) -> _Child | None:
        for child in self._children:
            if child.spec.id == child_id:
                return child
        return None

    def _request_stop(self) -> None:
        if self._stop_requested is not None and not self._stop_requested.done():
            self._stop_requested.set_result(None)
            assert self._events is not None
            self._events.put_nowait(_STOP)

    async def _submit(self, kind: str, arg: Any) -> None:
        if not self._running or self._stopping or self._events is None:
            raise ActorError(f"supervisor {self.name} is not running")
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(_Command(kind, arg, reply))
        await reply

    async def _start_initial(self) -> None:
        for child in list(self._children):
            if self._stopping:
                return
            if child not in self._children:
                continue  # a TEMPORARY sibling dropped by a one-for-all recovery
            if child.task is not None:
                continue  # already (re)started by a one-for-all recovery
            error = await self._start_one(child)
            if error is not None and not self._stopping:
                await self._handle_exit(child, "start_failed", error)

    async def _serve(self) -> None:
        assert self._events is not None
        while True:
            event = await self._events.get()
            if event is _STOP:
                return
            if isinstance(event, _Exit):
                if event.child.task is event.task and event.child in self._children:
                    event.child.task = None
                    reason, error = _exit_reason(event.task)
                    await self._handle_exit(event.child, reason, error)
                else:
                    _exit_reason(event.task)  # stale (we stopped it on purpose): retrieve its outcome
            elif isinstance(event, _Command):
                if event.reply.done():
                    continue  # the caller gave up before we got to it
                # Cleared only when the command ran to its end: if run() is cancelled (or fails)
                # meanwhile, _shutdown fails the command's caller instead of leaving it waiting.
                self._command = event
                await self._run_command(event)
                self._command = None

    async def _run_command(self, command: _Command) -> None:
        reply = command.reply
        if command.kind == "start":
            spec: ChildSpec = command.arg
            if self._find(spec.id) is not None:
                _fail(reply, ValueError(f"supervisor {self.name}: child {spec.id!r} already exists"))
                return
            child = _Child(spec)
            self._children.append(child)
            error = await self._start_one(child)
            if error is None:
                _resolve(reply)
            else:
                self._children.remove(child)
                _fail(reply, error)
        else:
            found = [c for c in map(self._find, command.arg) if c is not None]
            for child in found:
                self._children.remove(child)
            await asyncio.gather(*(self._stop_child(child) for child in found))
            for child in found:
                self._log.info("child_terminated", child=child.spec.id)
            _resolve(reply)

    async def _handle_exit(self, child: _Child, reason: str, error: BaseException | None) -> None:
        spec = child.spec
        if reason == "start_failed":
            pass  # already logged as child_start_failed
        elif reason != "normal" or spec.restart is Restart.PERMANENT:
            log = self._log.error if reason == "error" else self._log.warning
            log("child_exited", child=spec.id, reason=reason, restart=str(spec.restart),
                error=repr(error) if error is not None else None)
        else:
            self._log.info("child_exited", child=spec.id, reason=reason, restart=str(spec.restart))
        if spec.restart is Restart.TEMPORARY or (spec.restart is Restart.TRANSIENT and reason == "normal"):
            self._children.remove(child)
            return
        await self._recover(child, reason, error)

    async def _recover(self, failed: _Child, reason: str, error: BaseException | None) -> None:
        """Restart per strategy, with backoff, until the group is up again or the budget is spent."""
        if self.strategy is Strategy.ONE_FOR_ALL:
            siblings = [c for c in self._children if c is not failed and c.task is not None]
            await self._stop_children(siblings)
            for c in siblings:
                if c.spec.restart is Restart.TEMPORARY:
                    self._children.remove(c)
            group = [c for c in self._children if c is failed or c in siblings]
        else:
            group = [failed]
        while True:
            self._charge(failed, reason, error)
            delay = self.backoff_delay(len(self._restarts))
            self._log.warning("child_restarting", child=failed.spec.id, delay_s=round(delay, 4),
                              restarts_in_window=len(self._restarts), group=[c.spec.id for c in group])
            if not await self._pause(delay):
                return
            for child in group:
                error = await self._start_one(child)
                if self._stopping:
                    return
                if error is not None:
                    failed, reason = child, "start_failed"
                    break
            else:
                return
            if self.strategy is Strategy.ONE_FOR_ALL:
                await self._stop_children([c for c in group if c.task is not None])

    def _charge(self, child: _Child, reason: str, error: BaseException | None) -> None:
        now = self._now()
        while self._restarts and self._restarts[0] <= now - self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            self._log.error("restart_intensity_exceeded", child=child.spec.id, reason=reason,
                            max_restarts=self.max_restarts, window_s=self.window_s,
                            error=repr(error) if error is not None else None)
            raise RestartIntensityExceeded(
                f"supervisor {self.name}: child {child.spec.id!r} exited ({reason}) after "
                f"{self.max_restarts} restarts within {self.window_s}s"
            ) from error
        self._restarts.append(now)
        self.restarts_total += 1
        self.restarts_by_child[child.spec.id] = self.restarts_by_child.get(child.spec.id, 0) + 1

    def backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with equal jitter: in [d/2, d], d = min(max, base * 2**(attempt-1))."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempt - 1)))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def _pause(self, delay: float) -> bool:
        """Sleep ``delay`` unless a stop is requested first; False when stopping."""
        assert self._stop_requested is not None
        if delay > 0:
            await asyncio.wait({self._stop_requested}, timeout=delay)
        return not self._stopping

    async def _start_one(self, child: _Child) -> BaseException | None:
        """Start one child and wait until it reports ready; returns the failure, if any."""
        assert self._stop_requested is not None and self._events is not None
        spec = child.spec
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = loop.create_future()
        task = loop.create_task(_run_child(spec, _ChildStatus(ready)), name=f"{self.name}.{spec.id}")
        child.task = task
        child.starts += 1
        try:
            await asyncio.wait({ready, task, self._stop_requested}, timeout=spec.start_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            child.task = None
            ready.cancel()
            await _stop_task(task, spec.shutdown_timeout)
            raise
        if ready.done():
            events = self._events
            task.add_done_callback(lambda t: events.put_nowait(_Exit(child, t)))
            self._log.info("child_started", child=spec.id, start=child.starts)
            return None
        child.task = None
        ready.cancel()
        if task.done():
            reason, error = _exit_reason(task)
            if error is None:
                error = ActorError(f"child {spec.id!r} exited ({reason}) before reporting ready")
        elif self._stopping:
            await _stop_task(task, spec.shutdown_timeout)
            return ActorError(f"start of child {spec.id!r} aborted: supervisor {self.name} stopping")
        else:
            await _stop_task(task, spec.shutdown_timeout)
            error = StartupTimeout(
                f"child {spec.id!r} of supervisor {self.name} not ready within {spec.start_timeout}s")
        self._log.error("child_start_failed", child=spec.id, error=repr(error))
        return error

    async def _stop_child(self, child: _Child) -> None:
        task, child.task = child.task, None
        if task is None:
            return
        if not await _stop_task(task, child.spec.shutdown_timeout):
            self._log.error("child_shutdown_timeout", child=child.spec.id, timeout_s=child.spec.shutdown_timeout)

    async def _stop_children(self, children: Sequence[_Child]) -> None:
        """Stop in reverse order, one after the other."""
        for child in reversed(children):
            await self._stop_child(child)

    async def _shutdown(self) -> None:
        try:
            self._request_stop()
            await self._stop_children([c for c in self._children if c.task is not None])
        finally:
            stopped = ActorDied(f"supervisor {self.name} stopped")
            if self._command is not None:
                _fail(self._command.reply, stopped)
            assert self._events is not None
            while not self._events.empty():
                event = self._events.get_nowait()
                if isinstance(event, _Command):
                    _fail(event.reply, ActorDied(f"supervisor {self.name} stopped"))
                elif isinstance(event, _Exit):
                    _exit_reason(event.task)
            self._running = False
            self._log.info("supervisor_stopped", restarts_total=self.restarts_total)
            assert self._done is not None
            _resolve(self._done)


async def _run_child(spec: ChildSpec, status: TaskStatus) -> None:
    await spec.start(status)


async def _stop_task(task: asyncio.Task[None], timeout: float) -> bool:  # noqa: ASYNC109
    """Cancel ``task`` and wait up to ``timeout``; False when it did not finish in time."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            task.add_done_callback(_exit_reason)  # retrieve its outcome whenever it ends
            return False
    _exit_reason(task)
    return True


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


async def run_root(supervisor: Supervisor, task_status: TaskStatus = IGNORED) -> int:
    """Run the root supervisor; 0 after a clean stop, 1 (and one clear log line) when it failed.

    ``CancelledError`` propagates (after the children were stopped).
    """
    try:
        await supervisor.run(task_status)
    except Exception as exc:
        cause = _root_cause(exc)
        get_logger().error("supervisor_failed", supervisor=supervisor.name, error=str(exc),
                           cause=repr(cause) if cause is not exc else None)
        return 1
    return 0
