"""start_task: a task reports when it is ready; a failure before that is the caller's."""

from __future__ import annotations

import asyncio

import pytest

from fraudactors.actors import TaskStatus, start_task
from fraudactors.errors import ActorError


async def test_start_task_returns_once_the_task_reported_started() -> None:
    steps: list[str] = []
    release = asyncio.Event()

    async def body(task_status: TaskStatus) -> None:
        await asyncio.sleep(0)
        steps.append("ready")
        task_status.started()
        await release.wait()
        steps.append("done")

    task = await start_task(body, name="body")
    assert steps == ["ready"] and not task.done()
    release.set()
    await task
    assert steps == ["ready", "done"]


async def test_start_task_raises_what_ended_the_task_before_it_was_ready() -> None:
    async def broken(task_status: TaskStatus) -> None:
        raise ValueError("no connection")

    async def returned(task_status: TaskStatus) -> None:
        return None

    with pytest.raises(ValueError, match="no connection"):
        await start_task(broken)
    with pytest.raises(ActorError, match="before it reported started"):
        await start_task(returned)
