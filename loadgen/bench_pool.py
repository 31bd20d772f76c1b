"""ONNX inference through the engine's :class:`ProcessPool` vs a session in a thread of this process.

For each batch size: ``calls`` sequential calls (one in flight: per-call latency p50/p99) and the same
number with ``concurrency`` calls in flight (throughput, rows/s). While each mode runs, a ticker
measures how late this event loop wakes up (``loop_lag``): that is what the engine's other actors
would feel — a thread that holds the GIL delays them, a process does not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from fraudactors.settings import Settings
from loadgen.bench_drain import machine, say

_SCORER: Any = None


def init_scorer(models_dir: str, versions: tuple[str, ...]) -> None:
    """Pool worker initializer: load the sessions once, keep them in a module global."""
    global _SCORER
    from fraudactors.modeling.registry import load_model_info
    from fraudactors.modeling.scorer import Scorer

    _SCORER = Scorer([load_model_info(models_dir, v) for v in versions])


def score(version: str, X: np.ndarray) -> Any:
    """Runs in a pool worker: probabilities and reasons, as the engine asks -- the same payload the
    thread mode returns (``Scorer.score``), so both carry the same result back."""
    return _SCORER.score(version, X)


async def _loop_lag(stop: asyncio.Event, samples: list[float], tick_s: float = 0.001) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(tick_s)
        samples.append((time.perf_counter() - t - tick_s) * 1000.0)


async def _measure(call: Callable[[np.ndarray], Awaitable[Any]], X: np.ndarray, calls: int,
                   concurrency: int) -> dict[str, Any]:
    rows = X.shape[0]
    for _ in range(min(20, calls)):  # warm-up
        await call(X)
    stop = asyncio.Event()
    lag: list[float] = []
    ticker = asyncio.create_task(_loop_lag(stop, lag))
    latencies = np.empty(calls)
    t0 = time.perf_counter()
    for i in range(calls):
        t = time.perf_counter()
        await call(X)
        latencies[i] = (time.perf_counter() - t) * 1000.0
    sequential_s = time.perf_counter() - t0

    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await call(X)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    concurrent_s = time.perf_counter() - t0
    stop.set()
    await ticker
    lag_arr = np.array(lag) if lag else np.zeros(1)
    return {
        "rows": rows, "calls": calls,
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 3),
        "latency_ms_p99": round(float(np.percentile(latencies, 99)), 3),
        "rows_per_s_sequential": round(rows * calls / sequential_s, 1),
        "rows_per_s_concurrent": round(rows * calls / concurrent_s, 1),
        "loop_lag_ms_p99": round(float(np.percentile(lag_arr, 99)), 3),
        "loop_lag_ms_max": round(float(lag_arr.max()), 3),
    }


async def pool_bench(settings: Settings, sizes: list[int], calls: int, concurrency: int) -> dict[str, Any]:
    from fraudactors.actors.pool import ProcessPool
    from fraudactors.modeling.registry import load_model_info
    from fraudactors.modeling.scorer import Scorer
    from loadgen.models import ensure_models

    info = machine()
    say(f"machine: {info.get('cpu', '?')} x{info['nproc']}, {info.get('ram_gib', '?')} GiB, "
        f"commit {info.get('commit')}, {info['date']}")
    models_dir = ensure_models(settings, say=say)
    version = next(v.version for v in settings.models.variants.values() if not v.shadow)
    versions = (version,)
    model = load_model_info(models_dir, version)
    rng = np.random.default_rng(0)
    n_features = len(model.feature_names)
    say(f"model {version} ({n_features} features) from {models_dir}; {calls} calls per size, "
        f"{concurrency} in flight for throughput")

    # the same rows for both modes
    inputs = {rows: np.abs(rng.normal(1.0, 2.0, size=(rows, n_features))).astype(np.float32) for rows in sizes}
    results: dict[str, list[dict[str, Any]]] = {"process": [], "thread": []}
    pool = ProcessPool(1, init_scorer, (str(models_dir), versions), max_inflight=max(concurrency, 1))
    await pool.start()
    try:
        for rows in sizes:
            X = inputs[rows]

            def via_pool(x: np.ndarray) -> Awaitable[Any]:
                return pool.call(score, version, x)

            r = await _measure(via_pool, X, calls, concurrency)
            results["process"].append(r)
            _print("process", r)
    finally:
        await pool.close()

    scorer = Scorer([load_model_info(models_dir, v) for v in versions])
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="onnx")
    loop = asyncio.get_running_loop()
    try:
        for rows in sizes:
            X = inputs[rows]

            def via_thread(x: np.ndarray) -> Awaitable[Any]:
                return loop.run_in_executor(executor, scorer.score, version, x)

            r = await _measure(via_thread, X, calls, concurrency)
            results["thread"].append(r)
            _print("thread", r)
    finally:
        executor.shutdown(wait=True)
    return {"bench": "pool", "machine": info, "model": version, "models_dir": str(Path(models_dir)),
            "concurrency": concurrency, **results}


def _print(mode: str, r: dict[str, Any]) -> None:
    say(f"  {mode:7s} rows {r['rows']:>4}: p50 {r['latency_ms_p50']:.3f} ms, p99 {r['latency_ms_p99']:.3f} ms | "
        f"{r['rows_per_s_sequential']:,.0f} rows/s sequential, {r['rows_per_s_concurrent']:,.0f} rows/s "
        f"concurrent | loop lag p99 {r['loop_lag_ms_p99']:.2f} ms, max {r['loop_lag_ms_max']:.2f} ms")

