"""Round-trip rate of :class:`ProcessPool` for engine-shaped micro-batches (a benchmark, not a test).

    python -m fraudactors.actors.roundtrip [--rows 256] [--cols 40] [--seconds 2] [--uvloop]

Each call sends a float32 (rows x cols) array to a worker, which returns its row means (rows,);
prints calls/s for a few worker counts, pipeline depths and caller concurrencies, next to
``concurrent.futures.ProcessPoolExecutor`` through ``run_in_executor`` as a baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from fraudactors.actors.pool import ProcessPool


async def _rate(call: Callable[[], Awaitable[Any]], concurrency: int, seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def run(rows: int, cols: int, seconds: float) -> None:
    batch = np.random.default_rng(0).random((rows, cols), dtype=np.float32)
    loop = asyncio.get_running_loop()
    print(f"loop={type(loop).__module__}.{type(loop).__name__} batch={rows}x{cols} float32 cpus={os.cpu_count()}")
    for workers, depth in ((1, 1), (1, 2), (2, 2)):
        async with ProcessPool(workers, int, (), max_inflight=16, pipeline_depth=depth) as pool:
            await pool.call(np.mean, batch, 1)
            rates = [await _rate(lambda: pool.call(np.mean, batch, 1), c, seconds) for c in (1, 4)]
        print(f"ProcessPool workers={workers} depth={depth}: "
              f"1 caller {rates[0]:,.0f} calls/s, 4 callers {rates[1]:,.0f} calls/s")
    ctx = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as executor:
        await loop.run_in_executor(executor, np.mean, batch, 1)
        rate = await _rate(lambda: loop.run_in_executor(executor, np.mean, batch, 1), 1, seconds)
    print(f"concurrent.futures ProcessPoolExecutor workers=1: 1 caller {rate:,.0f} calls/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    coro = run(args.rows, args.cols, args.seconds)
    if args.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
