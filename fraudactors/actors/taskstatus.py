"""Readiness reporting, the trio way: a task says when it is ready, not when it was created.

A child's start function receives a :class:`TaskStatus` and calls ``task_status.started()`` once
its connections are open and its model is loaded. Code that is run outside a supervisor gets
:data:`IGNORED`, whose ``started()`` does nothing. :func:`start_task` starts a task and waits
for its report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from fraudactors.errors import ActorError


class TaskStatus(Protocol):
    def started(self, value: Any = None) -> None:
        """Report that the task is ready (call exactly once)."""


class _IgnoredStatus:
    __slots__ = ()

    def started(self, value: Any = None) -> None:
        return None

    def __repr__(self) -> str:
        return "TaskStatus.IGNORED"


IGNORED: TaskStatus = _IgnoredStatus()


async def start_task(fn: Callable[[TaskStatus], Coroutine[Any, Any, Any]], *,
                     name: str | None = None) -> asyncio.Task[Any]:
    """Run ``fn(task_status)`` as a new task; return the task once it reported started (trio's
    ``nursery.start``). When it ends before that, its failure is raised here (``ActorError`` if it
    returned); cancelled while waiting, the task is cancelled too."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[Any] = loop.create_future()

    class _Status:
        def started(self, value: Any = None) -> None:
            if not ready.done():
                ready.set_result(value)

    task = loop.create_task(fn(_Status()), name=name)
    try:
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if not ready.done():
        ready.cancel()
        task.result()
        raise ActorError(f"task {name or fn!r} ended before it reported started")
    return task
