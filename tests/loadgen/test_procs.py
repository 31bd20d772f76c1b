"""Child processes of the demo and the benchmarks: a child stopped before it was ready."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fraudactors.settings import Settings
from loadgen.procs import Child

# Never ready; says "armed" once its SIGTERM handler is in, and "cleaned up" when SIGTERM lets it.
_SLOW_STARTER = """
import signal, sys, time
def term(*_):
    print("cleaned up", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("armed", flush=True)
while True:
    time.sleep(0.1)
"""


async def test_a_child_cancelled_while_it_starts_gets_sigterm_before_sigkill(settings: Settings,
                                                                              tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM of the demo while the engine starts: the engine is asked to stop (and can
    remove its multiprocessing temp dir), not SIGKILLed with its process group."""
    child = Child("slow", [sys.executable, "-c", _SLOW_STARTER], settings, tmp_path, ready_line=b"never")
    await child.spawn()
    waiting = asyncio.create_task(child.wait_ready(timeout_s=60))
    async with asyncio.timeout(30):
        while b"armed" not in child.log_path.read_bytes():
            await asyncio.wait({waiting}, timeout=0.05)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()
    assert child.returncode == 0
    assert b"cleaned up" in child.log_path.read_bytes()
