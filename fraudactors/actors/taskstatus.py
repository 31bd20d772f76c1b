"""Readiness reporting, the trio way: a task says when it is ready, not when it was created.

A child's start function receives a :class:`TaskStatus` and calls ``task_status.started()`` once
its connections are open and its model is loaded. Code that is run outside a supervisor gets
:data:`IGNORED`, whose ``started()`` does nothing.
"""

from __future__ import annotations

from typing import Any, Protocol


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
