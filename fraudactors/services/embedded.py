"""The common life cycle of an embedded service: spawn on a free loopback port, wait until it
really answers, stop it without leaving anything behind.

Use it as an async context manager (``async with EmbeddedBroker() as broker``) or, where no loop
is running yet (session fixtures), through :meth:`start_sync` / :meth:`stop_sync`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from fraudactors.errors import ServiceError
from fraudactors.logging import get_logger
from fraudactors.services.process import ChildProcess, free_port, port_open

log = get_logger(component="services")

# A free port can be taken between our probe and the child's bind; try a few.
_PORT_ATTEMPTS = 3


class EmbeddedService:
    """Base of :class:`EmbeddedBroker` and :class:`EmbeddedRedis`.

    Without ``port`` a free loopback port is picked at the first start; once started, the
    service keeps that port, so ``stop()`` then ``start()`` brings it back on the same address.
    """

    name = "service"
    host = "127.0.0.1"

    def __init__(self, binary: str, *, port: int | None = None, start_timeout_s: float = 30.0,
                 stop_grace_s: float = 5.0) -> None:
        self.binary = binary
        self._fixed_port = port
        self.port: int = port or 0
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self._child: ChildProcess | None = None

    # -- what a subclass says --------------------------------------------------------------
    def argv(self, port: int) -> Sequence[str]:
        raise NotImplementedError

    async def check(self, budget_s: float) -> None:
        """One readiness attempt: a real round trip; raises on failure."""
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    def log_tail(self) -> str:
        return self._child.log_tail() if self._child is not None else ""

    # -- life cycle -----------------------------------------------------------------------
    async def start(self) -> Self:
        """Spawn and return once the service answered a real request (ServiceError otherwise)."""
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._spawn()
            try:
                await self._wait_ready()
                self._fixed_port = self.port  # a restart comes back on the same address
                return self
            except _ExitedEarly as exc:
                await self._discard()
                if self._fixed_port is not None or attempt == _PORT_ATTEMPTS:
                    raise ServiceError(str(exc)) from None
                # Expected now and then (another process took the free port first): info, not a warning.
                log.info("service_port_retry", service=self.name, port=self.port, attempt=attempt)
            except BaseException:
                await self._discard()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def start_sync(self) -> Self:
        """:meth:`start` for code without a running loop. The child is spawned in this thread
        (PR_SET_PDEATHSIG is tied to the spawning thread); only the readiness check runs in a
        helper thread with its own event loop."""
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._spawn()
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-ready")
            try:
                pool.submit(asyncio.run, self._wait_ready()).result()
                self._fixed_port = self.port  # a restart comes back on the same address
                return self
            except _ExitedEarly as exc:
                self._discard_sync()
                if self._fixed_port is not None or attempt == _PORT_ATTEMPTS:
                    raise ServiceError(str(exc)) from None
            except BaseException:
                # Ctrl-C included: kill the child now; the check then ends on its own (child gone).
                self._discard_sync()
                raise
            finally:
                pool.shutdown(wait=False)
        raise AssertionError("unreachable")  # pragma: no cover

    async def stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            code = await child.stop(self.stop_grace_s)
            log.info("service_stopped", service=self.name, pid=child.pid, port=self.port, returncode=code)

    def stop_sync(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            code = child.stop_sync(self.stop_grace_s)
            log.info("service_stopped", service=self.name, pid=child.pid, port=self.port, returncode=code)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def __enter__(self) -> Self:
        return self.start_sync()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_sync()

    # -- internals ------------------------------------------------------------------------
    def _spawn(self) -> None:
        if self.running:
            raise ServiceError(f"{self.name} is already running on port {self.port}")
        self.port = self._fixed_port or free_port(self.host)
        self._child = ChildProcess(self.name, self.argv(self.port))
        try:
            self._child.spawn()
        except OSError as exc:
            self._child = None
            raise ServiceError(f"cannot start {self.name} ({self.binary}): {exc}") from None

    async def _discard(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            await child.stop(grace_s=1.0)

    def _discard_sync(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.stop_sync(grace_s=1.0)

    async def _wait_ready(self) -> None:
        child = self._child
        assert child is not None
        started = time.monotonic()
        deadline = started + self.start_timeout_s
        last_error: BaseException | None = None
        while True:
            if not child.running:
                raise _ExitedEarly(
                    f"{self.name} exited with code {child.returncode} while starting on port {self.port}; "
                    f"log tail: {_one_line(child.log_tail())}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = _one_line(child.log_tail())
                await child.stop(grace_s=1.0)
                raise ServiceError(
                    f"{self.name} did not answer on {self.host}:{self.port} within {self.start_timeout_s:g}s"
                    f" (last error: {last_error!r}); log tail: {tail}")
            if not port_open(self.host, self.port, timeout=min(0.2, remaining)):
                await asyncio.sleep(0.02)
                continue
            try:
                await asyncio.wait_for(self.check(remaining), timeout=remaining)
            except Exception as exc:  # any failure means "not yet" until the deadline
                last_error = exc
                await asyncio.sleep(0.05)
                continue
            log.info("service_ready", service=self.name, pid=child.pid, port=self.port,
                     startup_s=round(time.monotonic() - started, 3))
            return


class _ExitedEarly(ServiceError):
    pass


def _one_line(text: str, limit: int = 1500) -> str:
    text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return text[-limit:] if text else "(empty)"
