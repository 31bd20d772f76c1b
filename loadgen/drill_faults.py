"""The faults of ``fraudactors drill``: what each one does to the running system, and which signal
says the engine noticed (see :mod:`loadgen.drill` for the run around them).

Each drill is a :class:`DrillSpec`: ``play`` waits until the fault time on the run clock, injects
the fault (``ctx.mark("inject")``), clears it (``ctx.mark("clear")``) and returns; ``detect`` finds
the engine's first observable reaction afterwards. Engines are ``fraudactors run`` children
(:class:`Fleet`); the broker and Redis are the drill's own :class:`EmbeddedStack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from fraudactors.services.stack import EmbeddedStack
    from fraudactors.settings import Settings
    from loadgen.procs import Child
    from loadgen.runner import RunResult

MIB = 1024 * 1024
Events = dict[str, list[dict[str, Any]]]  # engine name -> its log events (drill_measure.read_events)


class Fleet:
    """The drill's engine processes: spawn, readiness, peak RSS of each one's process tree."""

    def __init__(self, settings: Settings, workdir: Path, ready_timeout_s: float) -> None:
        self.settings = settings
        self.workdir = workdir
        self.ready_timeout_s = ready_timeout_s
        self.engines: dict[str, Child] = {}
        self.ready_wall: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}

    async def spawn(self, name: str) -> Child:
        from loadgen.procs import engine_child

        child = engine_child(self.settings, self.workdir, name)
        self.engines[name] = child
        await child.spawn()
        return child

    async def wait_ready(self, child: Child) -> None:
        """Ready = /readyz 200; a child that is not is killed and ``ChildFailed`` raised."""
        await child.wait_ready(self.ready_timeout_s)
        self.ready_wall[child.name] = time.time()

    def live(self) -> list[Child]:
        return [c for c in self.engines.values() if c.proc is not None and c.proc.returncode is None]

    @staticmethod
    def tree(pid: int) -> list[psutil.Process]:
        """The process and its descendants (the engine and its inference workers)."""
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample_rss(self) -> None:
        for child in self.live():
            assert child.pid is not None
            rss = 0
            for proc in self.tree(child.pid):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    rss += proc.memory_info().rss
            self.peak_rss[child.name] = max(self.peak_rss.get(child.name, 0), rss)

    async def watch_rss(self, interval_s: float = 0.5) -> None:
        while True:
            self.sample_rss()
            await asyncio.sleep(interval_s)

    async def stop_all(self, timeout_s: float) -> dict[str, int]:
        """SIGTERM every engine still running (SIGKILL after ``timeout_s``); exit code per engine."""
        live = self.live()
        await asyncio.gather(*(c.stop(timeout_s) for c in live))
        return {name: c.returncode if c.returncode is not None else -1 for name, c in self.engines.items()}


@dataclass
class DrillContext:
    stack: EmbeddedStack
    fleet: Fleet
    settings: Settings
    fault_at_s: float
    length_s: float
    say: Callable[[str], None] = print
    t0_perf: float = 0.0
    t0_wall: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)  # run-clock seconds
    notes: dict[str, Any] = field(default_factory=dict)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)  # to await or cancel after the run

    def start_clock(self) -> None:
        self.t0_perf, self.t0_wall = time.perf_counter(), time.time()

    def now(self) -> float:
        return time.perf_counter() - self.t0_perf

    def wall(self, t_run: float) -> float:
        return self.t0_wall + t_run

    def mark(self, name: str, what: str = "") -> float:
        t = self.marks[name] = self.now()
        self.say(f"[drill t={t:6.1f}s] {name}" + (f": {what}" if what else ""))
        return t

    async def sleep_until(self, t_run: float) -> None:
        delay = t_run - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(frozen=True)
class DrillSpec:
    name: str
    summary: str
    length_s: float  # default fault length (0: an instant fault)
    signal: str  # what counts as the engine's first observable reaction
    play: Callable[[DrillContext], Awaitable[None]]
    detect: Callable[[DrillContext, Events, RunResult], dict[str, Any]]
    finish: Callable[[DrillContext, RunResult], Awaitable[None]] | None = None


def _found(ctx: DrillContext, t_wall: float | None, what: str) -> dict[str, Any]:
    inject = ctx.marks.get("inject")
    if t_wall is None or inject is None:
        return {"seconds": None, "at_s": None, "event": None}
    at = t_wall - ctx.t0_wall
    return {"seconds": round(at - inject, 3), "at_s": round(at, 3), "event": what}


def _log_detect(engine: str, names: tuple[str, ...]) -> Callable[[DrillContext, Events, RunResult], dict[str, Any]]:
    def detect(ctx: DrillContext, events: Events, result: RunResult) -> dict[str, Any]:
        from loadgen.drill_measure import first_event

        inject = ctx.marks.get("inject")
        hit = None if inject is None else first_event(events.get(engine, []), names, ctx.wall(inject))
        return _found(ctx, hit["_t"] if hit else None, f"{engine}: {hit['event']}" if hit else "")
    return detect


# -- broker and Redis -------------------------------------------------------------------------------

async def _freeze(ctx: DrillContext, pid: int | None, what: str) -> None:
    assert pid is not None
    await ctx.sleep_until(ctx.fault_at_s)
    os.kill(pid, signal.SIGSTOP)
    inject = ctx.mark("inject", f"SIGSTOP {what} pid {pid}")
    try:
        await ctx.sleep_until(inject + ctx.length_s)
    finally:
        os.kill(pid, signal.SIGCONT)  # also when the run is cancelled: never leave it stopped
        ctx.mark("clear", f"SIGCONT {what} pid {pid}")


async def _broker_freeze(ctx: DrillContext) -> None:
    await _freeze(ctx, ctx.stack.broker.pid, "broker")


async def _redis_freeze(ctx: DrillContext) -> None:
    await _freeze(ctx, ctx.stack.pids.get("redis"), "redis")


async def _redis_restart(ctx: DrillContext) -> None:
    redis = ctx.stack.redis
    await ctx.sleep_until(ctx.fault_at_s)
    inject = ctx.mark("inject", f"stopping redis pid {ctx.stack.pids.get('redis')} (memory only: the state is lost)")
    await redis.stop()
    try:
        await ctx.sleep_until(inject + ctx.length_s)
    finally:
        await redis.start()  # the same port; empty
        ctx.mark("clear", f"redis answering again, pid {ctx.stack.pids.get('redis')}")


def _redis_detect(ctx: DrillContext, events: Events, result: RunResult) -> dict[str, Any]:
    import numpy as np

    out = _log_detect("engine-0", ("feature_store_down",))(ctx, events, result)
    m = result.collector.matches
    inject = ctx.marks.get("inject")
    degraded_at = m.decided_at_s[m.degraded & np.isfinite(m.decided_at_s)]
    if inject is not None and degraded_at.size:
        first = float(degraded_at.min())
        out["first_degraded_decision_read_s"] = round(first - inject, 3)
    return out


# -- engines ----------------------------------------------------------------------------------------

def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _orphans(ctx: DrillContext, old: Child, workers: list[psutil.Process], after_s: float) -> None:
    """Are the killed engine's inference workers still running ``after_s`` later? Then clean up."""
    await asyncio.sleep(after_s)
    left = [p.pid for p in workers if _alive(p)]
    ctx.notes["orphaned_workers_after_s"] = {"after_s": after_s, "pids": left}
    await old.kill()  # SIGKILL to what is left of its process group


async def _engine_kill(ctx: DrillContext) -> None:
    old = ctx.fleet.engines["engine-0"]
    assert old.pid is not None and old.proc is not None
    workers = Fleet.tree(old.pid)[1:]
    await ctx.sleep_until(ctx.fault_at_s)
    os.kill(old.pid, signal.SIGKILL)  # the main process only, as a crash would
    ctx.mark("inject", f"SIGKILL engine-0 pid {old.pid} (its {len(workers)} child process(es) left alone)")
    await old.proc.wait()
    ctx.tasks.append(asyncio.create_task(_orphans(ctx, old, workers, 5.0)))
    new = await ctx.fleet.spawn("engine-1")
    ctx.mark("clear", f"engine-1 started, pid {new.pid}")
    await ctx.fleet.wait_ready(new)
    ctx.say(f"[drill t={ctx.now():6.1f}s] engine-1 ready")


async def _engine_term(ctx: DrillContext) -> None:
    old = ctx.fleet.engines["engine-0"]
    await ctx.sleep_until(ctx.fault_at_s)
    inject = ctx.mark("inject", f"SIGTERM engine-0 pid {old.pid}")
    code = await old.stop(timeout_s=ctx.settings.engine.shutdown_timeout_s + 15.0)
    ctx.notes["old_engine"] = {"exit_code": code, "exit_s": round(ctx.now() - inject, 3)}
    ctx.say(f"[drill t={ctx.now():6.1f}s] engine-0 exited with code {code}")
    new = await ctx.fleet.spawn("engine-1")
    ctx.mark("clear", f"engine-1 started, pid {new.pid}")
    await ctx.fleet.wait_ready(new)
    ctx.say(f"[drill t={ctx.now():6.1f}s] engine-1 ready")


def _replacement_ready(ctx: DrillContext, events: Events, result: RunResult) -> dict[str, Any]:
    out = _log_detect("engine-1", ("engine_ready",))(ctx, events, result)
    if out["seconds"] is None and "engine-1" in ctx.fleet.ready_wall:  # no log line: the drill's own probe
        out = _found(ctx, ctx.fleet.ready_wall["engine-1"], "engine-1: /readyz 200")
    return out


async def _rebalance(ctx: DrillContext) -> None:
    await ctx.sleep_until(ctx.fault_at_s)
    second = await ctx.fleet.spawn("engine-1")
    inject = ctx.mark("inject", f"engine-1 started in the same group, pid {second.pid}")
    ready = asyncio.create_task(ctx.fleet.wait_ready(second))
    try:
        await ctx.sleep_until(inject + ctx.length_s)
    finally:
        if not ready.done():
            ready.cancel()
        (outcome,) = await asyncio.gather(ready, return_exceptions=True)
    if outcome is None:
        ctx.notes["joined_ready_s"] = round(ctx.fleet.ready_wall["engine-1"] - ctx.wall(inject), 3)
    else:
        ctx.notes["joined_not_ready"] = repr(outcome)[:300]
    ctx.mark("clear", f"SIGTERM engine-1 pid {second.pid}")
    code = await second.stop(timeout_s=ctx.settings.engine.shutdown_timeout_s + 15.0)
    ctx.notes["left_engine"] = {"exit_code": code, "exit_s": round(ctx.now() - ctx.marks["clear"], 3)}
    ctx.say(f"[drill t={ctx.now():6.1f}s] engine-1 exited with code {code}")


# -- poison -----------------------------------------------------------------------------------------

POISON_RECORDS = 10_000


@dataclass
class _PoisonState:
    offsets: dict[tuple[int, int], str] = field(default_factory=dict)  # (partition, offset) -> kind
    send_failures: Counter[str] = field(default_factory=Counter)
    dead: dict[tuple[int, int], tuple[float, str]] = field(default_factory=dict)  # source -> (read at, stage)
    other_dead: int = 0
    last_read: float = 0.0


async def _read_dlq(ctx: DrillContext, state: _PoisonState) -> None:
    """Every record of the DLQ from its beginning (the drill's topics are its own), by source."""
    from aiokafka import TopicPartition

    from fraudactors.services.kafka import make_consumer

    topic = ctx.settings.topics.dlq
    consumer = make_consumer(ctx.settings, group_id=None, auto_offset_reset="earliest",
                             max_partition_fetch_bytes=8 * MIB, fetch_max_bytes=64 * MIB)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            now = ctx.now()
            for records in batches.values():
                for r in records:
                    headers = {k: v for k, v in (r.headers or ())}
                    try:
                        source = (int(headers["source_partition"]), int(headers["source_offset"]))
                    except (KeyError, ValueError):
                        state.other_dead += 1
                        continue
                    state.dead.setdefault(source, (now, headers.get("stage", b"?").decode(errors="replace")))
                    state.last_read = now
    finally:
        await consumer.stop()


async def _poison(ctx: DrillContext) -> None:
    from fraudactors.services.kafka import make_producer
    from loadgen.poison import hostile_records

    state = ctx.notes.setdefault("_poison", _PoisonState())
    ctx.tasks.append(asyncio.create_task(_read_dlq(ctx, state), name="drill-dlq"))
    records = hostile_records(POISON_RECORDS, time.time())
    producer = make_producer(ctx.settings, max_request_size=4 * MIB, linger_ms=5, client_id="drill-poison")
    await producer.start()
    try:
        await ctx.sleep_until(ctx.fault_at_s)
        inject = ctx.mark("inject", f"{len(records):,} hostile records over {ctx.length_s:g}s, mixed into the stream")
        ticks = max(int(ctx.length_s / 0.1), 1)
        per_tick = -(-len(records) // ticks)
        pending: list[tuple[asyncio.Future[Any], str]] = []
        for k in range(ticks):
            await ctx.sleep_until(inject + k * 0.1)
            for key, value, kind in records[k * per_tick:(k + 1) * per_tick]:
                pending.append((await producer.send(ctx.settings.topics.transactions, value=value, key=key), kind))
        results = await asyncio.gather(*(f for f, _ in pending), return_exceptions=True)
        ctx.mark("clear", "every hostile record handed to the broker")
    finally:
        await producer.stop()
    for (_, kind), meta in zip(pending, results, strict=True):
        if isinstance(meta, BaseException):
            state.send_failures[f"{kind}: {type(meta).__name__}"] += 1
        else:
            state.offsets[(meta.partition, meta.offset)] = kind


async def _poison_finish(ctx: DrillContext, result: RunResult) -> None:
    """Wait (at most 30 s, or 5 s without a new dead letter) for the last hostile records in the
    DLQ, then summarize: every one must be there, none decided."""
    state: _PoisonState = ctx.notes.pop("_poison")
    deadline = ctx.now() + 30.0
    while ctx.now() < deadline:
        if all(src in state.dead for src in state.offsets) or ctx.now() - state.last_read > 5.0:
            break
        await asyncio.sleep(0.2)
    missing = Counter(kind for src, kind in state.offsets.items() if src not in state.dead)
    stages = Counter(state.dead[src][1] for src in state.offsets if src in state.dead)
    read_at = [state.dead[src][0] for src in state.offsets if src in state.dead]
    ctx.notes["poison"] = {
        "records": POISON_RECORDS, "acknowledged": len(state.offsets), "send_failures": dict(state.send_failures),
        "in_dlq": sum(stages.values()), "missing_from_dlq": sum(missing.values()),
        "missing_by_kind": dict(missing), "dlq_by_stage": dict(stages),
        # decisions for ids that are not the load's: only the hostile records can be those here
        "decided": result.collector.foreign,
        "kinds": dict(Counter(state.offsets.values())),
    }
    ctx.notes["_poison_first_read_s"] = min(read_at) if read_at else None


def _poison_detect(ctx: DrillContext, events: Events, result: RunResult) -> dict[str, Any]:
    first = ctx.notes.pop("_poison_first_read_s", None)
    inject = ctx.marks.get("inject")
    if first is None or inject is None:
        return {"seconds": None, "at_s": None, "event": None}
    return {"seconds": round(first - inject, 3), "at_s": round(first, 3),
            "event": "first hostile record read back from the DLQ"}


async def _control(ctx: DrillContext) -> None:
    await ctx.sleep_until(ctx.fault_at_s)
    ctx.mark("inject", "nothing (control run)")
    ctx.mark("clear", "nothing")


def _no_detect(ctx: DrillContext, events: Events, result: RunResult) -> dict[str, Any]:
    return {"seconds": None, "at_s": None, "event": None}


BROKER_EVENTS = ("commit_timed_out", "commit_failed", "publish_retry", "consumer_stalled", "engine_not_ready")

DRILLS: dict[str, DrillSpec] = {spec.name: spec for spec in (
    DrillSpec("control", "no fault: the same load and timeline, for the p99 drift of the run itself", 0.0,
              "none (no fault)", _control, _no_detect),
    DrillSpec("broker-freeze", "SIGSTOP the broker past the producer's request timeout, then SIGCONT", 40.0,
              "engine-0 logs its first " + " / ".join(BROKER_EVENTS), _broker_freeze,
              _log_detect("engine-0", BROKER_EVENTS)),
    DrillSpec("redis-freeze", "SIGSTOP Redis, then SIGCONT", 20.0,
              "engine-0 logs feature_store_down (fraudactors_feature_store_up 0)", _redis_freeze, _redis_detect),
    DrillSpec("redis-restart", "stop Redis, start it again on the same port (memory only: state lost)", 5.0,
              "engine-0 logs feature_store_down (fraudactors_feature_store_up 0)", _redis_restart,
              _redis_detect),
    DrillSpec("engine-kill", "SIGKILL the engine's main process, start a new engine", 0.0,
              "the new engine logs engine_ready (/readyz 200: partitions assigned)", _engine_kill,
              _replacement_ready),
    DrillSpec("engine-term", "SIGTERM the engine (graceful drain), start a new engine after it exits", 0.0,
              "the new engine logs engine_ready (/readyz 200: partitions assigned)", _engine_term,
              _replacement_ready),
    DrillSpec("rebalance", "a second engine joins the group, and leaves again (SIGTERM)", 30.0,
              "engine-0 logs partitions_revoked (the group's rebalance)", _rebalance,
              _log_detect("engine-0", ("partitions_revoked",))),
    DrillSpec("poison", f"{POISON_RECORDS:,} hostile records mixed into the stream", 10.0,
              "the first hostile record read back from the DLQ", _poison, _poison_detect, _poison_finish),
)}
