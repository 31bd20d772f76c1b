"""Backlog-drain and scale-out benchmarks (see :mod:`loadgen.bench`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import TopicPartition

from fraudactors.settings import Settings
from loadgen.generator import SimSource, make_source
from loadgen.procs import Child, CpuMeter, cpu_seconds, engine_child, null_child


def say(*parts: object) -> None:
    print(*parts, flush=True)


def machine() -> dict[str, Any]:
    """nproc, CPU model, RAM, Python, commit: what a result was measured on."""
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    with contextlib.suppress(Exception):
        import subprocess

        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    info["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with contextlib.suppress(OSError, ValueError):
        info["loadavg"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return info


BACKLOG_SEED = 11


async def fill_backlog(settings: Settings, n: int, seed: int = BACKLOG_SEED) -> float:
    """Produce ``n`` simulator transactions to ``topics.transactions``; returns the rate achieved."""
    from fraudactors.services.kafka import make_producer

    source = make_source(f"bench-{secrets.token_hex(3)}-", seed=seed, run_length=n)
    producer = make_producer(settings, linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    t0 = time.perf_counter()
    try:
        done = 0
        while done < n:
            k = min(5000, n - done)
            batch = source.take(k, np.zeros(k))
            futures = [await producer.send(settings.topics.transactions, value=v, key=key)
                       for key, v in zip(batch.keys, batch.values, strict=True)]
            await asyncio.gather(*futures)
            done += k
    finally:
        await producer.stop()
    return n / (time.perf_counter() - t0)


class OutputCounter:
    """Counts the records on an output topic from its beginning, with the time each batch was read."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.count = 0
        self.first_t: float | None = None
        self.first_batch = 0
        self.last_t: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> OutputCounter:
        from fraudactors.services.kafka import make_consumer

        self._consumer = make_consumer(self.settings, group_id=None, auto_offset_reset="earliest",
                                       max_poll_records=50_000, fetch_max_wait_ms=50)
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self.topic)
        if not parts:
            await self._consumer.topics()
            parts = self._consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=50_000)
            n = sum(len(r) for r in batches.values())
            if n:
                now = time.perf_counter()
                if self.first_t is None:
                    self.first_t = now
                    self.first_batch = n
                self.last_t = now
                self.count += n
                self._changed.set()

    async def wait_for(self, n: int, timeout_s: float, alive: Callable[[], bool]) -> bool:
        deadline = time.perf_counter() + timeout_s
        while self.count < n:
            if self._task is not None and self._task.done():
                self._task.result()
            if not alive() or time.perf_counter() > deadline:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)
        return True

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


async def run_trial(name: str, settings: Settings, children: Sequence[Child], n: int, timeout_s: float,
                    service_pids: dict[str, int | None], history: int = 0) -> dict[str, Any]:
    """Start ``children`` (they drain the backlog into ``settings.topics.predictions``) and measure.

    With ``history``, the backlog's first ``history`` records are drained first, unmeasured (they
    give the users their past), and the window starts once they are decided."""
    from fraudactors.services.kafka import create_topics

    await create_topics(settings)
    async with OutputCounter(settings, settings.topics.predictions) as counter:
        t_start = time.perf_counter()

        def alive() -> bool:
            return all(c.proc is not None and c.proc.returncode is None for c in children)

        try:
            await asyncio.gather(*(c.start() for c in children))
            t_started = time.perf_counter()
            complete = await counter.wait_for(history, timeout_s, alive) if history else True
            t_ready = time.perf_counter()
            at_ready = counter.count
            meter = CpuMeter({**{c.name: c.pid for c in children}, **service_pids, "bench": os.getpid()})
            meter.start()
            complete = complete and await counter.wait_for(history + n, timeout_s, alive)
            cpu = meter.stop()
            waiting = meter.waiting
        finally:
            codes = await asyncio.gather(*(c.stop() for c in children))
    last = counter.last_t or t_ready
    first = counter.first_t or t_ready
    window = max(last - t_ready, 1e-9)
    in_window = counter.count - at_ready
    tps_after_ready = in_window / window if last > t_ready else 0.0
    # From the first decision batch read to the last one (the first batch itself is not counted).
    tps_from_first = (counter.count - counter.first_batch) / max(last - first, 1e-9) if last > first else 0.0
    if history:  # the records after the history only: the window from its end is the measure
        tps_from_first = tps_after_ready
    # Headline: the window after every process is ready, when it holds most of the backlog; with a
    # backlog so small that it drains during start-up, the first-to-last decision window.
    use_ready = in_window >= max(1000, n // 4)
    result = {
        "trial": name, "processes": len(children), "records": n, "history_records": history,
        "decided": counter.count - history, "complete": complete,
        "startup_s": round(t_started - t_start, 2), "history_s": round(t_ready - t_started, 2),
        "decided_before_ready": at_ready - history,
        "tps": round(tps_after_ready if use_ready else tps_from_first, 1),
        "basis": "after_ready" if use_ready else "first_to_last_decision",
        "tps_after_ready": round(tps_after_ready, 1), "window_s": round(window, 3),
        "tps_first_to_last": round(tps_from_first, 1), "first_to_last_s": round(last - first, 3),
        "cpu_cores": cpu, "cpu_wait_cores": waiting, "exit_codes": list(codes),
    }
    redis_cores = sum(v for k, v in cpu.items() if k.startswith("redis"))
    if in_window and redis_cores:
        # Redis CPU per decided transaction over the measured window (all nodes of a cluster)
        result["redis_us_per_tx"] = round(redis_cores * window / in_window * 1e6, 1)
    own_cores = sum(cpu.get(c.name, 0.0) for c in children)
    if in_window and own_cores:
        # CPU of the trial's own processes (with their children: the inference worker) per transaction
        result["cpu_us_per_tx"] = round(own_cores * window / in_window * 1e6, 1)
    say(f"  {name}: {result['tps']:,.0f} TPS ({result['basis']}) "
        + (f"(after {history:,} records of history, drained in {t_ready - t_started:.1f}s) " if history else "")
        + f"({counter.count - history:,}/{n:,} decided{'' if complete else ', INCOMPLETE'}; "
        f"cpu used (waiting) {', '.join(f'{k} {v:.2f} ({waiting.get(k, 0.0):.2f})' for k, v in cpu.items())}; "
        f"exit {list(codes)}; {result.get('cpu_us_per_tx', 0):.1f} us of CPU per transaction)")
    return result


def trial_settings(base: Settings, tag: str) -> Settings:
    """The shared backlog topic; a private output topic, consumer group and Redis key prefix."""
    return base.replace(
        kafka={"group_id": f"bench-{tag}"},
        topics={"predictions": f"{base.topics.predictions}-{tag}", "dlq": f"{base.topics.dlq}-{tag}"},
        redis={"key_prefix": f"bench-{tag}:"},
    )


async def _with_backlog(settings: Settings, n: int, body: Callable[[Settings, dict[str, int | None], Path],
                                                                      Any], redis_cluster: int = 0,
                        history: int = 0) -> dict[str, Any]:
    from fraudactors.services.kafka import create_topics
    from fraudactors.services.stack import EmbeddedStack
    from loadgen.models import ensure_models

    info = machine()
    say(f"machine: {info.get('cpu', '?')} x{info['nproc']}, {info.get('ram_gib', '?')} GiB, "
        f"commit {info.get('commit')}, {info['date']}, load average {info.get('loadavg')}")
    models_dir = ensure_models(settings)
    settings = settings.replace(models={"dir": str(models_dir)})
    async with EmbeddedStack(settings, redis_cluster=redis_cluster) as stack:
        s = stack.settings
        say(f"redis: {stack.describe_redis()}")
        await create_topics(s)
        say(f"filling {s.topics.transactions} with {history + n:,} transactions over {s.topics.partitions} partitions"
            + (f" (the first {history:,} are the users' history, not measured)" if history else ""))
        fill_tps = await fill_backlog(s, history + n)
        say(f"  filled at {fill_tps:,.0f} records/s")
        with tempfile.TemporaryDirectory(prefix="fraudactors-bench-") as tmp:
            result: dict[str, Any] = await body(s, stack.pids, Path(tmp))
    result["machine"] = info
    result["redis_cluster"] = redis_cluster
    result["records"] = n
    result["history_records"] = history
    result["partitions"] = settings.topics.partitions
    return result


async def run_peer(s: Settings, script: Path, n: int, timeout_s: float, service_pids: dict[str, int | None],
                   tmp: Path) -> dict[str, Any]:
    """The per-message peer (``seedref.py``) draining ``n`` records of the same backlog through the
    same broker and Redis: its own msg/s line, and its CPU per message from /proc."""
    import re
    import sys
    from urllib.parse import urlparse

    model = tmp / "peer-rf.onnx"
    make = await asyncio.create_subprocess_exec(sys.executable, str(script.parent / "make_rf.py"), str(model))
    if await make.wait() != 0:
        raise RuntimeError(f"{script.parent / 'make_rf.py'} failed")
    port = urlparse(s.redis.url).port or 6379
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--bootstrap", s.kafka.bootstrap_servers, "--redis-port", str(port),
        "--model", str(model), "--topic", s.topics.transactions, "--out-topic", f"{s.topics.predictions}-peer",
        "--n", str(n), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    meter = CpuMeter({**service_pids, "bench": os.getpid()})
    meter.start()
    t0 = time.perf_counter()
    used = [0.0]  # the peer's CPU seconds, sampled while it runs (its /proc entry goes when it exits)

    async def sample() -> None:
        while True:
            used[0] = cpu_seconds(proc.pid) or used[0]
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    finally:
        sampler.cancel()
    cpu = {"peer": round(used[0] / (time.perf_counter() - t0), 3), **meter.stop()}
    text = out.decode(errors="replace")
    found = re.search(r"= (\d+) msg/s", text)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"the peer failed (exit {proc.returncode}): {text[-500:]}")
    tps = float(found.group(1))
    result = {"trial": "peer", "script": str(script), "records": n, "tps": tps, "cpu_cores": cpu,
              "cpu_wait_cores": meter.waiting,
              "cpu_us_per_tx": round(used[0] / n * 1e6, 1)}
    say(f"  peer: {tps:,.0f} msg/s ({n:,} messages, its own clock from the first message; cpu used (waiting) "
        f"{', '.join(f'{k} {v:.2f} ({meter.waiting.get(k, 0.0):.2f})' for k, v in cpu.items())}; "
        f"{result['cpu_us_per_tx']:.1f} us of CPU per message, start-up included)")
    return result


def history_records(days: float, seed: int = BACKLOG_SEED) -> int:
    """About ``days`` of the backlog population's transactions (its users' expected legitimate rate)."""
    if days <= 0:
        return 0
    source = make_source("history-", seed=seed)
    assert isinstance(source, SimSource)
    return round(days * 86400.0 * source.simulator.expected_tps())


async def drain_bench(settings: Settings, n: int, timeout_s: float, redis_cluster: int = 0, *,
                      peer: str | None = None, peer_records: int = 10_000, history_days: float = 0.0
                      ) -> dict[str, Any]:
    """``history_days``: the backlog first holds about that many simulated days of the same users'
    transactions, drained by each trial before its window starts, so the engine is measured on users
    with a past (30 days is a steady state) rather than on a population days old."""
    history = history_records(history_days)

    async def body(s: Settings, pids: dict[str, int | None], tmp: Path) -> dict[str, Any]:
        se = trial_settings(s, "engine")
        engine = await run_trial("engine", se, [engine_child(se, tmp, "engine")], n, timeout_s, pids, history)
        sn = trial_settings(s, "null")
        null = await run_trial("null", sn, [null_child(sn, tmp, "null")], n, timeout_s, pids, history)
        ratio = engine["tps"] / null["tps"] if null["tps"] else 0.0
        say(f"engine {engine['tps']:,.0f} TPS | null pipeline {null['tps']:,.0f} TPS | "
            f"engine/null {ratio:.2f} | redis {engine.get('redis_us_per_tx', 0):.1f} us of CPU per transaction")
        result: dict[str, Any] = {"bench": "drain", "engine": engine, "null": null, "ratio": round(ratio, 3)}
        if peer:
            sp = trial_settings(s, "peer")
            peer_result = result["peer"] = await run_peer(sp, Path(peer), min(n, peer_records), timeout_s, pids, tmp)
            peer_tps = peer_result["tps"]
            result["ratio_peer"] = round(engine["tps"] / peer_tps, 2) if peer_tps else 0.0
            say(f"engine / per-message peer: {result['ratio_peer']:.1f}x")
        return result

    result = await _with_backlog(settings, n, body, redis_cluster, history)
    result["history_days"] = history_days
    return result


async def scaleout_bench(settings: Settings, n: int, timeout_s: float, redis_cluster: int = 0) -> dict[str, Any]:
    async def body(s: Settings, pids: dict[str, int | None], tmp: Path) -> dict[str, Any]:
        s1 = trial_settings(s, "one")
        one = await run_trial("1 engine", s1, [engine_child(s1, tmp, "one-0")], n, timeout_s, pids)
        s2 = trial_settings(s, "two")
        two = await run_trial("2 engines", s2, [engine_child(s2, tmp, "two-0"), engine_child(s2, tmp, "two-1")],
                              n, timeout_s, pids)
        speedup = two["tps"] / one["tps"] if one["tps"] else 0.0
        say(f"1 engine {one['tps']:,.0f} TPS | 2 engines {two['tps']:,.0f} TPS | speed-up {speedup:.2f}x")
        return {"bench": "scaleout", "one": one, "two": two, "speedup": round(speedup, 3)}

    return await _with_backlog(settings, n, body, redis_cluster)
