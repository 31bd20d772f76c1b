"""Fixtures of the load generator's tests: a stand-in engine (the null pipeline answering on
``predictions``). Models for the real engine: ``models_dir`` in tests/conftest.py, the committed ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fraudactors.settings import Settings
from loadgen.nullpipe import NullOptions, NullPipeline


@contextlib.asynccontextmanager
async def responding(settings: Settings, **options: Any) -> AsyncIterator[NullPipeline]:
    """Run a responder (real consumer -> producer loop) until the block exits; ready = partitions assigned."""
    pipeline = NullPipeline(settings, NullOptions(**options))
    task = asyncio.create_task(pipeline.run())
    ready = asyncio.create_task(pipeline.ready.wait())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert ready in done, "responder got no partitions within 30 s"
        yield pipeline
    finally:
        ready.cancel()
        pipeline.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def responder() -> Callable[..., contextlib.AbstractAsyncContextManager[NullPipeline]]:
    return responding
