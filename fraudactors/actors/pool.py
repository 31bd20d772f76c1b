"""A process pool for CPU work (ONNX inference), driven by the event loop without polling.

``N`` worker processes, started with the ``forkserver`` context (``spawn`` where there is no
forkserver; never ``fork``: the parent runs an event loop and threads). Each worker runs the
initializer (which stores its state, e.g. ONNX sessions, in a module global) and reports ready
within ``ready_timeout``. One duplex pipe per worker carries pickle-5 frames; the loop watches
each pipe with ``add_reader`` and each process sentinel the same way, so a worker that dies
(``kill -9``) is seen at once: the call in flight on it fails with :class:`WorkerDied`
(retriable) and a replacement is started. Calls beyond ``max_inflight`` wait to be admitted;
admitted calls go, in FIFO order, to the least busy worker, which holds at most
``pipeline_depth`` of them (default 2: the next batch is already in the pipe when the current
one finishes; a worker that dies fails all the calls it held, each with ``WorkerDied``).
The parent never blocks on a pipe: its end is non-blocking, framed like
``multiprocessing.Connection`` (the worker side uses a plain blocking ``Connection``).

A caller that gives up (cancelled, or its ``asyncio.timeout`` expired) leaves the worker busy
until the function returns; with ``kill_on_cancel=True`` the worker is killed instead (the only
way to stop CPU work) and replaced -- the other call it held fails with ``WorkerDied``.

If a replacement cannot start (its initializer fails or times out) the pool is broken
(:class:`PoolBroken`, not retriable): the owner should fail and let its supervisor restart it.

Counters for metrics: ``calls_total`` (calls sent to a worker), ``worker_restarts_total``,
``worker_deaths_total``; gauges ``inflight`` and ``pending``; ``pids`` of live workers.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import pickle
import signal
import struct
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from fraudactors.errors import ActorError, PoolClosed, StartupTimeout, WorkerDied
from fraudactors.logging import get_logger

R = TypeVar("R")

__all__ = ["PoolBroken", "ProcessPool", "RemoteCallError", "WorkerInitError"]

_PROTOCOL = 5
_HEADER = struct.Struct("!BQ")  # kind, call id
_LEN = struct.Struct("!i")  # multiprocessing.Connection framing: length, or -1 then a 64-bit length
_LEN64 = struct.Struct("!Q")
_READ_CHUNK = 1 << 16
_READY, _INIT_ERROR, _OK, _ERROR = range(4)


class WorkerInitError(ActorError):
    """The initializer raised (or the worker exited) before the worker reported ready."""


class PoolBroken(PoolClosed):
    """A replacement worker could not be started; the pool is unusable (restart its owner)."""


class RemoteCallError(ActorError):
    """The call raised in the worker, and its exception could not be sent back as it was."""


# ---------------------------------------------------------------------------- worker side
def _worker_main(conn: Connection, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    """Entry point of a worker process: initialize, report ready, serve calls until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    try:
        _serve(conn, initializer, initargs)
    except (EOFError, OSError):
        pass  # the parent closed the pipe (or died): stop quietly
    finally:
        conn.close()


def _serve(conn: Connection, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:
        _send(conn, _INIT_ERROR, 0, _error_payload(exc))
        return
    from fraudactors import heap

    heap.settle()  # what the initializer loaded (models, sessions) is never scanned by the GC again
    _send(conn, _READY, 0, os.getpid())
    while True:
        frame = conn.recv_bytes()
        call_id = 0
        try:
            call_id, fn, args = pickle.loads(frame)
            result = fn(*args)
        except BaseException as exc:
            _send(conn, _ERROR, call_id, _error_payload(exc))
            continue
        try:
            body = pickle.dumps(result, protocol=_PROTOCOL)
        except Exception as exc:  # PicklingError, TypeError, AttributeError: the result cannot travel
            _, summary, text = _error_payload(exc)
            _send(conn, _ERROR, call_id, (None, f"result could not be sent back: {summary}", text))
            continue
        conn.send_bytes(_HEADER.pack(_OK, call_id) + body)


def _send(conn: Connection, kind: int, call_id: int, obj: Any) -> None:
    body = pickle.dumps(obj, protocol=_PROTOCOL)
    conn.send_bytes(_HEADER.pack(kind, call_id) + body)


def _error_payload(exc: BaseException) -> tuple[BaseException | None, str, str]:
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc, protocol=_PROTOCOL))
        sendable: BaseException | None = exc
    except Exception:
        sendable = None
    return sendable, f"{type(exc).__qualname__}: {exc}", text


def _rebuild_error(payload: tuple[BaseException | None, str, str], pid: int | None) -> BaseException:
    exc, summary, text = payload
    if exc is None:
        exc = RemoteCallError(summary)
    exc.add_note(f"raised in worker pid {pid}:\n{text}")
    return exc


# ---------------------------------------------------------------------------- parent side
class _Call:
    __slots__ = ("fut", "id", "payload", "worker")

    def __init__(self, call_id: int, payload: bytes, fut: asyncio.Future[Any]) -> None:
        self.id = call_id
        self.payload = payload
        self.fut = fut
        self.worker: _Worker | None = None  # set once sent


class _Worker:
    __slots__ = ("alive", "calls", "conn", "exited", "fd", "pid", "process", "ready", "rx", "sentinel", "tx")

    def __init__(self, process: Any, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.process = process
        self.conn = conn
        self.pid: int | None = process.pid
        self.fd = conn.fileno()
        self.sentinel: int = process.sentinel
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.add_done_callback(_retrieve)  # a failure is read by whoever waits, if anyone
        self.exited: asyncio.Future[None] = loop.create_future()
        self.calls: deque[_Call] = deque()  # sent to this worker, answered in order
        self.alive = True
        self.rx = bytearray()  # bytes read but not yet a whole frame
        self.tx: deque[memoryview] | None = None  # output the socket did not take yet (in order)
        os.set_blocking(self.fd, False)  # the loop never blocks on a worker (uvloop would do this too)

    def next_frame(self) -> bytes | None:
        """Cut one whole frame (multiprocessing.Connection framing) off ``rx``, if there is one."""
        buf = self.rx
        if len(buf) < 4:
            return None
        (size,) = _LEN.unpack_from(buf, 0)
        offset = 4
        if size == -1:
            if len(buf) < 12:
                return None
            (size,) = _LEN64.unpack_from(buf, 4)
            offset = 12
        end = offset + size
        if len(buf) < end:
            return None
        frame = bytes(buf[offset:end])
        del buf[:end]
        return frame


class ProcessPool:
    """Worker processes for CPU-bound calls; see the module docstring."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any],
        initargs: tuple[Any, ...] = (),
        max_inflight: int = 8,
        ready_timeout: float = 30.0,
        *,
        name: str = "pool",
        mp_context: str | None = None,
        pipeline_depth: int = 2,
        kill_on_cancel: bool = False,
    ) -> None:
        if workers < 1 or max_inflight < 1 or pipeline_depth < 1:
            raise ValueError("workers, max_inflight and pipeline_depth must be >= 1")
        if mp_context is None:
            mp_context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if mp_context == "fork":
            raise ValueError("the fork start method is unsafe here (event loop and threads in the parent)")
        self.workers = workers
        self.max_inflight = max_inflight
        self.ready_timeout = ready_timeout
        self.pipeline_depth = pipeline_depth
        self.kill_on_cancel = kill_on_cancel
        self.name = name
        self._ctx = multiprocessing.get_context(mp_context)
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[_Worker] = []
        self._serving: list[_Worker] = []  # ready and alive
        self._pending: deque[_Call] = deque()
        self._admission = asyncio.Semaphore(max_inflight)
        self._replacements: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._state = "new"  # new -> starting -> running -> (broken) -> closing -> closed
        self._failure: BaseException | None = None
        self.calls_total = 0
        self.worker_restarts_total = 0
        self.worker_deaths_total = 0

    # ------------------------------------------------------------------ introspection
    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.alive and w.ready.done() and w.pid is not None]

    @property
    def ready_workers(self) -> int:
        return sum(1 for w in self._workers if w.alive and w.ready.done() and not w.ready.exception())

    @property
    def inflight(self) -> int:
        return sum(len(w.calls) for w in self._workers)

    @property
    def pending(self) -> int:
        return sum(1 for c in self._pending if not c.fut.done())

    @property
    def state(self) -> str:
        return self._state

    def __repr__(self) -> str:
        return f"ProcessPool({self.name!r}, {self._state}, workers={self.pids})"

    @property
    def _log(self) -> Any:
        return get_logger(pool=self.name)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start every worker; return once each ran the initializer and reported ready.

        Raises :class:`WorkerInitError` (initializer failed) or :class:`StartupTimeout`; no
        worker is left behind either way.
        """
        if self._state != "new":
            raise RuntimeError(f"pool {self.name} already started")
        self._loop = asyncio.get_running_loop()
        self._state = "starting"
        try:
            workers = [self._spawn() for _ in range(self.workers)]
            await self._await_ready(workers)
        except BaseException:
            await asyncio.shield(self._loop.create_task(self._terminate_all(0.0)))
            self._state = "closed"
            raise
        self._state = "running"
        self._serving.extend(workers)
        self._log.info("pool_started", workers=self.workers, pids=self.pids,
                       context=self._ctx.get_start_method())

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop taking calls, let in-flight calls finish (up to ``timeout``), stop the workers."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "closing":
            await asyncio.gather(*(asyncio.shield(w.exited) for w in self._workers), return_exceptions=True)
            return
        assert self._loop is not None
        self._state = "closing"
        for task in self._replacements:
            task.cancel()
        self._fail_pending(lambda: PoolClosed(f"pool {self.name} closed"))
        busy = [c.fut for w in self._workers if w.alive for c in w.calls]
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        await asyncio.shield(self._loop.create_task(self._terminate_all(timeout)))
        self._state = "closed"
        self._log.info("pool_closed", calls_total=self.calls_total,
                       worker_restarts_total=self.worker_restarts_total)

    async def __aenter__(self) -> ProcessPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ calls
    async def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` in a worker and return its result (its exception is re-raised here).

        ``fn`` must be importable by the workers (a module-level function). Raises
        :class:`WorkerDied` (retriable) when the worker dies during the call,
        :class:`PoolClosed` / :class:`PoolBroken` when the pool cannot take calls.
        """
        self._check_usable()
        call_id = next(self._ids)
        payload = pickle.dumps((call_id, fn, args), protocol=_PROTOCOL)
        async with self._admission:
            self._check_usable()
            assert self._loop is not None
            fut: asyncio.Future[R] = self._loop.create_future()
            call = _Call(call_id, payload, fut)
            self._pending.append(call)
            self._dispatch()
            try:
                return await fut
            except asyncio.CancelledError:
                if self.kill_on_cancel and call.worker is not None and call.worker.alive:
                    self._kill(call.worker, "its call was abandoned (kill_on_cancel)")
                raise

    async def broadcast(self, fn: Callable[..., Any], *args: Any, initargs: tuple[Any, ...] | None = None) -> None:
        """Run ``fn(*args)`` once in every worker, then start later workers with ``initargs``.

        Every live worker gets the call, a starting one too (it runs right after its initializer),
        ahead of nothing: calls it already holds finish first. A worker that dies meanwhile is
        skipped; its replacement, started with the old initargs, gets the call as well. Raises
        the first error a worker raised (the initargs are then left as they were).
        """
        self._check_usable()
        assert self._loop is not None
        done: set[_Worker] = set()
        while targets := [w for w in self._workers if w.alive and w not in done]:
            futures: list[asyncio.Future[Any]] = []
            for worker in targets:
                done.add(worker)
                fut: asyncio.Future[Any] = self._loop.create_future()
                call_id = next(self._ids)
                call = _Call(call_id, pickle.dumps((call_id, fn, args), protocol=_PROTOCOL), fut)
                call.worker = worker
                worker.calls.append(call)
                self._send_frame(worker, call.payload)
                futures.append(fut)
            for result in await asyncio.gather(*futures, return_exceptions=True):
                if isinstance(result, BaseException) and not isinstance(result, WorkerDied):
                    raise result
            self._check_usable()
        if initargs is not None:
            self._initargs = tuple(initargs)

    def _check_usable(self) -> None:
        if self._state == "running":
            return
        if self._state == "broken":
            assert self._failure is not None
            raise PoolBroken(f"pool {self.name} is broken: {self._failure!r}") from self._failure
        if self._state in ("new", "starting"):
            raise PoolClosed(f"pool {self.name} is not started")
        raise PoolClosed(f"pool {self.name} is closed")

    def _dispatch(self) -> None:
        pending, serving, depth = self._pending, self._serving, self.pipeline_depth
        while pending and serving:
            worker = min(serving, key=_load) if len(serving) > 1 else serving[0]
            if len(worker.calls) >= depth:
                return
            call = pending.popleft()
            if call.fut.done():
                continue  # the caller gave up before a worker was free
            worker.calls.append(call)
            call.worker = worker
            self._send_frame(worker, call.payload)
            if worker.alive:
                self.calls_total += 1

    def _send_frame(self, worker: _Worker, payload: bytes) -> None:
        size = len(payload)
        header = _LEN.pack(size) if size <= 0x7FFFFFFF else _LEN.pack(-1) + _LEN64.pack(size)
        if worker.tx is not None:  # earlier output still queued: keep the frames in order
            worker.tx.append(memoryview(header + payload))
            return
        try:
            sent = os.writev(worker.fd, [header, payload])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._worker_lost(worker, f"send failed: {exc!r}")
            return
        if sent < len(header) + size:
            assert self._loop is not None
            worker.tx = deque([memoryview(header + payload)[sent:]])
            self._loop.add_writer(worker.fd, self._on_writable, worker)

    def _on_writable(self, worker: _Worker) -> None:
        assert self._loop is not None and worker.tx is not None
        tx = worker.tx
        while tx:
            try:
                sent = os.write(worker.fd, tx[0])
            except BlockingIOError:
                return
            except OSError as exc:
                self._worker_lost(worker, f"send failed: {exc!r}")
                return
            if sent < len(tx[0]):
                tx[0] = tx[0][sent:]
                return
            tx.popleft()
        worker.tx = None
        self._loop.remove_writer(worker.fd)

    def _fail_pending(self, error: Callable[[], BaseException]) -> None:
        while self._pending:
            call = self._pending.popleft()
            if not call.fut.done():
                call.fut.set_exception(error())

    # ------------------------------------------------------------------ workers
    def _spawn(self) -> _Worker:
        assert self._loop is not None
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main, args=(child_conn, self._initializer, self._initargs),
            name=f"{self.name}-worker", daemon=True)
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        worker = _Worker(process, parent_conn, self._loop)
        self._workers.append(worker)
        self._loop.add_reader(worker.fd, self._on_readable, worker)
        self._loop.add_reader(worker.sentinel, self._on_exit, worker)
        return worker

    async def _await_ready(self, workers: list[_Worker]) -> None:
        readies = [w.ready for w in workers]
        _done, not_done = await asyncio.wait(readies, timeout=self.ready_timeout)
        for fut in readies:
            error = fut.exception() if fut.done() else None
            if error is not None:
                raise error
        if not_done:
            raise StartupTimeout(
                f"pool {self.name}: {len(not_done)} worker(s) not ready within {self.ready_timeout}s")

    def _on_readable(self, worker: _Worker) -> None:
        try:
            chunk = os.read(worker.fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._worker_lost(worker, f"read failed: {exc!r}")
            return
        if not chunk:
            self._worker_lost(worker, "pipe closed")
            return
        worker.rx += chunk
        while worker.alive:
            frame = worker.next_frame()
            if frame is None:
                return
            self._on_frame(worker, frame)

    def _on_frame(self, worker: _Worker, frame: bytes) -> None:
        kind, _call_id = _HEADER.unpack_from(frame)
        try:
            obj = pickle.loads(memoryview(frame)[_HEADER.size:])
        except Exception as exc:
            obj, kind = (exc, "unpickle", ""), _ERROR
        if kind in (_OK, _ERROR):
            call = worker.calls.popleft() if worker.calls else None
            if call is not None and not call.fut.done():
                if kind == _OK:
                    call.fut.set_result(obj)
                else:
                    call.fut.set_exception(_rebuild_error(obj, worker.pid))
            if worker.alive:
                self._dispatch()
        elif kind == _READY:
            if not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == _INIT_ERROR:
            error = _rebuild_error(obj, worker.pid)
            failure = WorkerInitError(f"pool {self.name}: initializer failed in worker pid {worker.pid}: "
                                      f"{obj[1]}")
            failure.__cause__ = error
            if not worker.ready.done():
                worker.ready.set_exception(failure)

    def _on_exit(self, worker: _Worker) -> None:
        assert self._loop is not None
        self._loop.remove_reader(worker.sentinel)
        worker.process.join(0)
        exitcode = worker.process.exitcode
        self._worker_lost(worker, f"exit code {exitcode}")
        worker.process.close()
        if worker in self._workers:
            self._workers.remove(worker)
        if not worker.exited.done():
            worker.exited.set_result(None)
        if self._state in ("running", "broken"):
            self._log.warning("worker_exited", pid=worker.pid, exitcode=exitcode)

    def _worker_lost(self, worker: _Worker, reason: str) -> None:
        if not worker.alive:
            return
        assert self._loop is not None
        worker.alive = False
        self._release_fd(worker)
        expected = self._state == "closing"
        if not expected:
            self.worker_deaths_total += 1
        if worker in self._serving:
            self._serving.remove(worker)
        lost_calls = 0
        while worker.calls:
            call = worker.calls.popleft()
            if not call.fut.done():
                lost_calls += 1
                call.fut.set_exception(
                    WorkerDied(f"pool {self.name}: worker pid {worker.pid} died during the call ({reason})"))
        if not worker.ready.done():
            worker.ready.set_exception(
                WorkerInitError(f"pool {self.name}: worker pid {worker.pid} died before reporting ready ({reason})"))
        if worker.process.exitcode is None:
            try:
                worker.process.kill()  # a worker without its pipe is of no use
            except (OSError, ValueError):
                pass
        if self._state == "running":
            self._log.warning("worker_died", pid=worker.pid, reason=reason,
                              calls_failed=lost_calls)
            task = self._loop.create_task(self._replace(), name=f"{self.name}.replace")
            self._replacements.add(task)
            task.add_done_callback(self._replacements.discard)

    def _kill(self, worker: _Worker, reason: str) -> None:
        """Stop a worker whose CPU work nobody waits for any more; it is replaced like any dead one."""
        self._log.warning("worker_killed", pid=worker.pid, reason=reason)
        self._worker_lost(worker, reason)  # at once: no further call goes to it; kills the process

    def _release_fd(self, worker: _Worker) -> None:
        assert self._loop is not None
        self._loop.remove_reader(worker.fd)
        if worker.tx is not None:
            worker.tx = None
            self._loop.remove_writer(worker.fd)
        worker.conn.close()

    async def _replace(self) -> None:
        self.worker_restarts_total += 1
        try:
            worker = self._spawn()
            await self._await_ready([worker])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._break(exc)
            return
        if self._state != "running":
            return
        self._log.info("worker_replaced", pid=worker.pid)
        self._serving.append(worker)
        self._dispatch()

    def _break(self, cause: BaseException) -> None:
        if self._state != "running":
            return
        self._state = "broken"
        self._failure = cause
        self._log.error("pool_broken", error=repr(cause))
        self._fail_pending(lambda: _chained(PoolBroken(f"pool {self.name} is broken: {cause!r}"), cause))

    async def _terminate_all(self, timeout: float) -> None:  # noqa: ASYNC109
        """Close every pipe (workers exit on EOF), wait for the exits, kill what is left."""
        assert self._loop is not None
        for worker in list(self._workers):
            if worker.alive:
                worker.alive = False
                self._release_fd(worker)
            while worker.calls:
                call = worker.calls.popleft()
                if not call.fut.done():
                    call.fut.set_exception(PoolClosed(f"pool {self.name} closed during the call"))
        exits = [w.exited for w in self._workers]
        if exits and timeout > 0:
            await asyncio.wait(exits, timeout=timeout)
        for worker in list(self._workers):
            if not worker.exited.done():
                try:
                    worker.process.kill()
                except (OSError, ValueError):
                    pass
        exits = [w.exited for w in self._workers]
        if exits:
            await asyncio.wait(exits, timeout=max(timeout, 5.0))
        for worker in list(self._workers):  # still there: reap synchronously
            self._loop.remove_reader(worker.sentinel)
            worker.process.join(1.0)
            self._workers.remove(worker)
        self._serving.clear()


def _load(worker: _Worker) -> int:
    return len(worker.calls)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _chained(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc
