"""An outcome recorder's flush across a frozen Redis: the fault the recorder's resends are for."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from fraudactors.features.redis_client import CLIENT_ERRORS


async def flush_failing_while_frozen(recorder: Any, pid: int | None) -> None:
    """Freeze the Redis process ``pid`` (SIGSTOP) while ``recorder`` flushes: the flush must fail
    (its request is held by the frozen server, which runs it when it thaws); then thaw it."""
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises((*CLIENT_ERRORS, OSError)):
            await recorder.flush()
    finally:
        os.kill(pid, signal.SIGCONT)


async def flush_until_through(recorder: Any, timeout_s: float = 20.0) -> None:
    """Flush until a flush goes through (the server may still be coming back)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await recorder.flush()
                return
            except (*CLIENT_ERRORS, OSError):
                await asyncio.sleep(0.1)
