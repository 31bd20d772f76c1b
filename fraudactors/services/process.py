"""A service binary run as a child process that cannot outlive us.

Three layers, so no broker or Redis is ever left behind:

1. the child gets its own process group, and :meth:`ChildProcess.stop` signals the whole group
   (SIGTERM, then SIGKILL after a grace period);
2. on Linux the child asks the kernel for ``PR_SET_PDEATHSIG = SIGKILL``: if the thread that
   spawned it dies — even by SIGKILL — the child is killed too;
3. an ``atexit`` hook stops every child still running when the interpreter exits.

``PR_SET_PDEATHSIG`` fires when the *spawning thread* exits, so children are spawned from the
calling thread (the event loop's), never from a short-lived executor thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from fraudactors.logging import get_logger

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 4000

log = get_logger(component="services")

# Strong references: a child whose owner was dropped without stop() must still be reaped at exit.
_live: set[ChildProcess] = set()
_live_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller retries if a race takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _make_preexec(parent_pid: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return None

    def preexec() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class ChildProcess:
    """One service binary; its output goes to a log file whose tail explains failures."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        fd, log_name = tempfile.mkstemp(prefix=f"fraudactors-{self.name}-", suffix=".log")
        self._log_path = Path(log_name)
        env = dict(os.environ if self.env is None else self.env)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=_make_preexec(os.getpid()),
                close_fds=True,
            )
        finally:
            os.close(fd)
        with _live_lock:
            _live.add(self)
        log.debug("service_spawned", service=self.name, pid=self.proc.pid, argv=self.argv)

    def log_tail(self, limit: int = _LOG_TAIL_BYTES) -> str:
        if self._log_path is None:
            return ""
        try:
            with self._log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - limit))
                return fh.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop_sync(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM the group, SIGKILL after ``grace_s``; blocks until the child is reaped."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait()
        else:
            # The leader is gone; make sure nothing it forked survives in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._forget()
        return proc.returncode

    async def stop(self, grace_s: float = 5.0) -> int | None:
        """As :meth:`stop_sync` without blocking the loop; finishes the stop even if cancelled."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                await wait_exit(proc, grace_s)
        finally:
            # Cancelled or not, the child must be gone when we return.
            self.stop_sync(grace_s=0.0 if proc.poll() is None else grace_s)
        return proc.returncode

    def _forget(self) -> None:
        with _live_lock:
            _live.discard(self)
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``proc`` to exit, woken by its pidfd (Linux) rather than polling."""
    if proc.poll() is not None:
        return True
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: wait in a thread instead
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, timeout_s)
        return proc.poll() is not None
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        async with asyncio.timeout(timeout_s):
            await exited
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.poll() is not None


def stop_all(grace_s: float = 2.0) -> None:
    """Stop every child still running (atexit, signal handlers)."""
    with _live_lock:
        children = list(_live)
    for child in children:
        with contextlib.suppress(Exception):
            child.stop_sync(grace_s)


atexit.register(stop_all)
