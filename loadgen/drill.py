"""``fraudactors drill NAME|all``: a named fault under open-loop load, and how the system took it.

Each drill starts its own embedded broker and Redis (:class:`EmbeddedStack`) and the engine as a
``fraudactors run`` child, sends a warm-up of history, then runs the load generator for
``--duration`` seconds at ``--rate``; at ``--fault-at`` seconds on the run clock the fault is
injected, and cleared after its length (``loadgen/drill_faults.py``); the load keeps going,
drains, and the result is computed from the decisions read (``loadgen/drill_measure.py``):

- time to detect: fault injection -> the engine's first observable reaction (the signal is named
  per drill in the result);
- time to recover: fault cleared -> the start of the first 1 s window (of scheduled send time)
  from which ``--recover-windows`` windows in a row have a p99 end-to-end latency within
  ``--recover-factor`` x the pre-fault p99 (undecided transactions count as infinitely late);
- lost (sent - distinct decided after the drain), duplicates, degraded decisions, DLQ;
- peak RSS of each engine's process tree (engine + inference workers), sampled every 0.5 s.

The result is printed and written as JSON (``--report``) with a Markdown table next to it; the
engines' logs are kept next to it too. Exit 1 when a drill lost transactions, did not recover,
or (poison) a hostile record is missing from the DLQ; 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadgen.drill_faults import DRILLS

if TYPE_CHECKING:
    from fraudactors.settings import Settings
    from loadgen.drill_faults import DrillContext, DrillSpec
    from loadgen.runner import RunResult

HELP = "fault drills under load: control, broker-freeze, redis-freeze, redis-restart, engine-kill, engine-term, " \
       "rebalance, poison (or all): time to detect and recover, lost, duplicates, peak RSS"
DEFAULT_REPORT_DIR = "reports"
# Recovery is judged against the pre-fault p99, so the run's own p99 must stay flat. On the embedded
# Tansu broker every fetch lists all the record batches stored so far in its partition
# (docs/tansu.md): with the demo's batching (30 ms send tick, 20 ms publisher linger) a control run
# with no fault at 1,000 TPS over 12 partitions climbed from p99 80 ms to 400-500 ms within 80 s,
# the engine's own part staying at 15-50 ms; with 100 ms / 100 ms it stayed at 242-257 ms throughout.
# Applied only to keys the config leaves at their defaults (and the tick only without --send-tick-ms).
DRILL_KAFKA = {"linger_ms": 100, "fetch_max_wait_ms": 30}
DRILL_SEND_TICK_MS = 100.0
# Every key a drill result has (the test checks them; docs/operations.md explains them).
RESULT_KEYS = ("drill", "summary", "ok", "problems", "date", "commit", "machine", "rate_tps", "duration_s",
               "partitions", "fault", "detect", "recover", "sent", "decided", "lost", "lost_detail", "duplicates",
               "degraded", "dlq", "send_errors", "peak_rss_mib", "peak_rss_mib_by_engine", "latency_ms", "engines",
               "notes", "windows")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from loadgen.cli import non_negative_int, positive_float

    parser.add_argument("name", choices=[*DRILLS, "all"], metavar="NAME",
                        help=f"the drill: {', '.join(DRILLS)}, or all (one after the other, one table)")
    parser.add_argument("--rate", type=positive_float, default=1000.0, metavar="TPS",
                        help="open-loop arrival rate (default 1000)")
    parser.add_argument("--duration", type=positive_float, default=None, metavar="S",
                        help="seconds of load (default: --fault-at + the fault's length + --after)")
    parser.add_argument("--fault-at", type=positive_float, default=20.0, metavar="S",
                        help="inject the fault this long after the measured load starts (default 20)")
    parser.add_argument("--fault-length", type=float, default=None, metavar="S",
                        help="how long the fault lasts (default per drill: broker-freeze 40 = past the 30 s "
                             "request timeout, redis-freeze 20, redis-restart 5 s down, rebalance 30 s "
                             "with two engines, poison 10 s of hostile records; engine-kill/-term: instant)")
    parser.add_argument("--after", type=positive_float, default=60.0, metavar="S",
                        help="load after the fault is cleared, when --duration is not given (default 60)")
    parser.add_argument("--report", default=None, metavar="PATH",
                        help=f"result JSON (default {DEFAULT_REPORT_DIR}/drill-NAME.json; Markdown table next to it)")
    parser.add_argument("--config", default=None, metavar="PATH", help="TOML settings for the engine")
    parser.add_argument("--partitions", type=int, default=None, help="partitions (default: topics.partitions)")
    parser.add_argument("--warmup", type=non_negative_int, default=5000, metavar="N",
                        help="transactions of history sent and decided before the measured load (default 5000)")
    parser.add_argument("--recover-factor", type=positive_float, default=1.5, metavar="X",
                        help="recovered = windows with p99 within X times the pre-fault p99 (default 1.5)")
    parser.add_argument("--recover-windows", type=int, default=5, metavar="N",
                        help="... for N 1-second windows in a row (default 5)")
    parser.add_argument("--drain-timeout", type=positive_float, default=60.0, metavar="S",
                        help="after sending, wait at most this long for outstanding decisions (default 60)")
    parser.add_argument("--engine-timeout", type=positive_float, default=120.0, metavar="S",
                        help="how long an engine may take to become ready (default 120)")
    parser.add_argument("--send-tick-ms", type=positive_float, default=None, metavar="MS",
                        help="the load generator sends what fell due every MS ms, one batch per partition "
                             f"(default {DRILL_SEND_TICK_MS:g}: see DRILL_KAFKA in loadgen/drill.py)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress lines")


def say(*parts: object) -> None:
    print(*parts, flush=True)


def main(args: argparse.Namespace) -> int:
    import logging

    from fraudactors.demo import _loop_factory
    from fraudactors.logging import configure_logging
    from fraudactors.settings import KafkaSettings, load_settings
    from loadgen.report import ensure_report_dir, write_json

    settings = load_settings(args.config)
    defaults = KafkaSettings()
    kafka = {k: v for k, v in DRILL_KAFKA.items() if getattr(settings.kafka, k) == getattr(defaults, k)}
    settings = settings.replace(kafka=kafka) if kafka else settings
    if args.partitions:
        settings = settings.replace(topics={"partitions": args.partitions})
    names = list(DRILLS) if args.name == "all" else [args.name]
    report = Path(args.report or f"{DEFAULT_REPORT_DIR}/drill-{args.name}.json")
    ensure_report_dir(report)
    configure_logging("warning", "json", stream=sys.stderr)
    # The drill's own Kafka clients log every failed request while the broker is frozen: noise here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    results: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        for name in names:
            base = report if len(names) == 1 else report.with_name(f"{report.stem}-{name}.json")
            say(f"== drill {name}: {DRILLS[name].summary}")
            result = runner.run(run_drill(DRILLS[name], args, settings, base))
            results.append(result)
            if len(names) > 1:  # each drill's own result as soon as it is in
                write_json(result, base)
            say(format_table([result]))

    document: dict[str, Any] = results[0] if len(results) == 1 else {"drills": results}
    write_json(document, report)
    report.with_suffix(".md").write_text(markdown_table(results), encoding="utf-8")
    if len(results) > 1:
        say(format_table(results))
    say(f"result written to {report} (+ {report.with_suffix('.md')})")
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"fraudactors drill: {r['drill']}: {'; '.join(r['problems'])}", file=sys.stderr)
    return 1 if failed else 0


def fault_length(spec: DrillSpec, args: argparse.Namespace) -> float:
    return spec.length_s if args.fault_length is None or spec.length_s == 0 else args.fault_length


async def run_drill(spec: DrillSpec, args: argparse.Namespace, settings: Settings, report: Path) -> dict[str, Any]:
    from fraudactors.services.kafka import create_topics
    from fraudactors.services.stack import EmbeddedStack
    from loadgen.bench_drain import machine
    from loadgen.drill_faults import DrillContext, Fleet
    from loadgen.drill_measure import read_events
    from loadgen.models import ensure_models
    from loadgen.progress import Progress
    from loadgen.runner import LoadConfig, prepare_load, run_load
    from loadgen.schedule import make_profile

    info = machine()
    length = fault_length(spec, args)
    duration = args.duration or args.fault_at + length + args.after
    settings = settings.replace(models={"dir": str(ensure_models(settings, say=say))})
    config = LoadConfig(profile=make_profile("constant", args.rate, duration), drain_timeout_s=args.drain_timeout,
                        warmup=args.warmup,
                        send_tick_s=(args.send_tick_ms or DRILL_SEND_TICK_MS) / 1000, progress=not args.no_progress)
    async with EmbeddedStack(settings) as stack:
        s = stack.settings
        await create_topics(s)
        # The load generator plays the payment system: its requests outlast the fault, so what is
        # lost is the engine's doing, not a send the generator gave up on.
        load_settings = s.replace(kafka={"request_timeout_ms": int(max(s.kafka.request_timeout_ms,
                                                                       (length + 60.0) * 1000))})
        with tempfile.TemporaryDirectory(prefix="fraudactors-drill-") as tmp:
            fleet = Fleet(s, Path(tmp), args.engine_timeout)
            ctx = DrillContext(stack, fleet, s, args.fault_at, length, say=say)
            play: asyncio.Task[None] | None = None
            watch = asyncio.create_task(fleet.watch_rss())

            def clock_start() -> None:
                nonlocal play
                ctx.start_clock()
                play = asyncio.get_running_loop().create_task(_play(spec, ctx), name=f"drill-{spec.name}")

            codes: dict[str, int] = {}
            try:
                engine = await fleet.spawn("engine-0")
                prepared = prepare_load(config, pregenerate=True)
                keys = [k for _, block, _ in prepared.outbox.blocks for k in block]  # to place the lost
                await fleet.wait_ready(engine)
                say(f"broker pid {stack.broker.pid}, redis pid {stack.pids.get('redis')}, engine-0 pid {engine.pid}; "
                    f"{config.profile.total:,} transactions at {args.rate:g}/s over {duration:g}s, "
                    f"fault at {args.fault_at:g}s for {length:g}s")
                result = await run_load(load_settings, config, Progress(sys.stderr, enabled=config.progress),
                                        prepared, on_clock_start=clock_start)
                if play is not None:
                    await play  # a fault that outlasts the load (a slow drain) ends before the result
                if spec.finish is not None:
                    await spec.finish(ctx, result)
            finally:
                for task in [*(t for t in (play,) if t is not None), *ctx.tasks]:
                    if not task.done():
                        task.cancel()
                await asyncio.gather(*ctx.tasks, *(t for t in (play,) if t is not None), return_exceptions=True)
                codes = await fleet.stop_all(timeout_s=s.engine.shutdown_timeout_s + 15.0)
                watch.cancel()
                fleet.sample_rss()
                logs = _keep_logs(fleet, report)
            events = {name: read_events(path) for name, path in logs.items()}
        detail = lost_detail(result, keys, s.topics.partitions)
        if detail:  # still on the broker: were they ever in the topic, were they decided after all?
            say(f"tracing {result.sent - result.collector.distinct:,} undecided transactions in the topics")
            detail.update(await trace_lost(s, result))
    out = summarize(spec, ctx, result, events, args, info, settings, codes, logs, duration)
    out["lost_detail"] = detail
    return out


async def trace_lost(settings: Settings, result: RunResult, idle_s: float = 3.0) -> dict[str, Any]:
    """Read ``transactions`` and ``predictions`` from the beginning with a fresh consumer: how many
    of the undecided transactions are in the input (and where), and how many have a decision there
    that the run's reader never saw."""
    import time

    import numpy as np
    import orjson
    from aiokafka import TopicPartition

    from fraudactors.services.kafka import make_consumer

    lost = set(np.flatnonzero(result.collector.matches.counts[:result.sent] == 0).tolist())
    prefix = result.prefix.encode()
    plen = len(prefix)
    found: dict[str, dict[int, int]] = {"transactions": {}, "predictions": {}}
    first: dict[str, list[tuple[int, int]]] = {"transactions": [], "predictions": []}
    consumer = make_consumer(settings, group_id=None, auto_offset_reset="earliest", max_poll_records=20_000,
                             fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        topics = {settings.topics.transactions: "transactions", settings.topics.predictions: "predictions"}
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            batches = await consumer.getmany(timeout_ms=200, max_records=20_000)
            for tp, records in batches.items():
                last = time.monotonic()
                kind = topics[tp.topic]
                for r in records:
                    if r.value is None or prefix not in r.value:
                        continue
                    tid = orjson.loads(r.value).get("transaction_id", "")
                    if not (isinstance(tid, str) and tid.startswith(result.prefix) and tid[plen:].isdigit()):
                        continue
                    if int(tid[plen:]) in lost:
                        found[kind][tp.partition] = found[kind].get(tp.partition, 0) + 1
                        if len(first[kind]) < 3:
                            first[kind].append((tp.partition, r.offset))
    finally:
        await consumer.stop()
    return {"in_transactions_topic": sum(found["transactions"].values()),
            "in_transactions_by_partition": {str(p): n for p, n in sorted(found["transactions"].items())},
            "first_offsets_in_transactions": first["transactions"],
            "decided_in_predictions_topic": sum(found["predictions"].values()),
            "first_offsets_in_predictions": first["predictions"]}


def lost_detail(result: RunResult, keys: list[bytes], partitions: int) -> dict[str, Any]:
    """Where the undecided transactions were: partition (the producer's default partitioner),
    scheduled time range, a few ids -- what a finding needs to be chased."""
    import numpy as np
    from aiokafka.partitioner import murmur2

    undecided = np.flatnonzero(result.collector.matches.counts[:result.sent] == 0)
    if not undecided.size:
        return {}
    by_partition: dict[int, int] = {}
    for i in undecided.tolist():
        p = (murmur2(keys[i]) & 0x7FFFFFFF) % partitions if i < len(keys) else -1
        by_partition[p] = by_partition.get(p, 0) + 1
    sched = result.scheduled_s[undecided]
    return {"by_partition": {str(p): n for p, n in sorted(by_partition.items())}, "scheduled_from_s": round(float(sched.min()), 3),
            "scheduled_to_s": round(float(sched.max()), 3),
            "sample": [f"{result.prefix}{i}" for i in undecided[:5].tolist()]}


async def _play(spec: DrillSpec, ctx: DrillContext) -> None:
    """The fault; its failure (say, a replacement engine that never became ready) is a result."""
    try:
        await spec.play(ctx)
    except Exception as exc:
        ctx.notes["fault_error"] = repr(exc)[:500]
        ctx.say(f"[drill t={ctx.now():6.1f}s] the fault's script failed: {exc!r}"[:500])


def _keep_logs(fleet: Any, report: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, child in fleet.engines.items():
        target = report.with_name(f"{report.stem}-{name}.log")
        target.parent.mkdir(parents=True, exist_ok=True)
        if child.log_path.exists():
            shutil.copyfile(child.log_path, target)
            out[name] = str(target)
    return out


def summarize(spec: DrillSpec, ctx: DrillContext, result: RunResult, events: dict[str, list[dict[str, Any]]],
              args: argparse.Namespace, info: dict[str, Any], settings: Settings, codes: dict[str, int],
              logs: dict[str, str], duration: float) -> dict[str, Any]:
    from loadgen.drill_measure import baseline_p99, latency_windows, recovery
    from loadgen.report import build_report

    load = build_report(result)
    lat = result.collector.matches.latency_ms
    inject = ctx.marks.get("inject")
    clear = ctx.marks.get("clear", inject)
    windows = latency_windows(result.scheduled_s, lat, duration, engine_ms=result.collector.matches.engine_ms)
    problems: list[str] = []
    detect: dict[str, Any] = {"signal": spec.signal, "seconds": None}
    rec: dict[str, Any] = {"seconds": None, "recovered": False}
    if "fault_error" in ctx.notes:
        problems.append(f"the fault's script failed: {ctx.notes['fault_error']}")
    if inject is None or clear is None:
        problems.append("the fault was not injected and cleared")
    else:
        # The second before the injection is left out: what was in flight when the fault hit is its effect.
        base = baseline_p99(result.scheduled_s, lat, args.fault_at * 0.25, max(inject - 1.0, args.fault_at * 0.5))
        rec = recovery(windows, base, inject, clear, args.recover_factor, args.recover_windows).as_dict()
        detect = {"signal": spec.signal, **spec.detect(ctx, events, result)}
        if not rec["recovered"]:
            problems.append(f"p99 not back within {args.recover_factor:g}x the pre-fault p99 for "
                            f"{args.recover_windows} windows before the load stopped")
        if detect["seconds"] is None and spec.name != "control":
            problems.append("no reaction of the engine seen")
    if load["lost"]:
        problems.append(f"{load['lost']:,} of {load['sent']:,} transactions got no decision")
    poison = ctx.notes.get("poison")
    if poison:
        if poison["missing_from_dlq"] or poison["send_failures"]:
            problems.append(f"{poison['missing_from_dlq']:,} hostile records not in the DLQ "
                            f"(by kind: {poison['missing_by_kind']}; send failures {poison['send_failures']})")
        if poison["decided"]:
            problems.append(f"{poison['decided']:,} hostile records got a decision")
        if load["dlq"]:
            problems.append(f"{load['dlq']:,} valid transactions went to the DLQ")
    rss = {name: round(v / 1024 / 1024, 1) for name, v in ctx.fleet.peak_rss.items()}
    engines = {name: {"exit_code": codes.get(name), "log": logs.get(name),
                      "ready_s": round(ctx.fleet.ready_wall[name] - ctx.t0_wall, 3)
                      if name in ctx.fleet.ready_wall else None}
               for name in ctx.fleet.engines}
    notes = {k: v for k, v in ctx.notes.items() if not k.startswith("_")}
    return {
        "drill": spec.name, "summary": spec.summary, "ok": not problems, "problems": problems,
        "date": info["date"], "commit": info.get("commit"), "machine": info,
        "rate_tps": args.rate, "duration_s": duration, "partitions": settings.topics.partitions,
        "fault": {"inject_s": _r(inject), "clear_s": _r(clear),
                  "length_s": _r(clear - inject) if inject is not None and clear is not None else None,
                  "planned_length_s": ctx.length_s},
        "detect": detect, "recover": rec,
        "sent": load["sent"], "decided": load["decided"], "lost": load["lost"], "duplicates": load["duplicates"],
        "degraded": load["degraded"], "dlq": load["dlq"], "send_errors": load["send_errors"],
        "peak_rss_mib": max(rss.values(), default=None), "peak_rss_mib_by_engine": rss,
        "latency_ms": load["latency_ms"], "engine_latency_ms": load["engine_latency_ms"], "drained": load["drained"],
        "engines": engines, "notes": notes, "windows": [w.as_dict() for w in windows],
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _secs(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.1f}"


TABLE_HEADER = ("drill", "rate", "fault", "detect s", "recover s", "lost", "dup", "degraded", "peak RSS MiB",
                "pre-fault p99 ms", "ok")


def table_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for r in results:
        fault = r["fault"]
        rows.append((r["drill"], f"{r['rate_tps']:g}", f"{_secs(fault['length_s'])} s", _secs(r["detect"]["seconds"]),
                     _secs(r["recover"]["seconds"]), f"{r['lost']:,}", f"{r['duplicates']:,}", f"{r['degraded']:,}",
                     _secs(r["peak_rss_mib"]), _secs(r["recover"].get("baseline_p99_ms")),
                     "yes" if r["ok"] else "NO"))
    return rows


def format_table(results: list[dict[str, Any]]) -> str:
    rows = [TABLE_HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for r in results:
        lines.append(f"  {r['drill']}: detect = {r['detect']['signal']}; "
                     + ("; ".join(r["problems"]) if r["problems"] else "ok"))
    return "\n".join(lines)


def markdown_table(results: list[dict[str, Any]]) -> str:
    first = results[0]
    lines = [f"Fault drills, {first['date']}, commit {first['commit']}, {first['machine'].get('cpu', '?')} "
             f"x{first['machine'].get('nproc')}, {first['partitions']} partitions", "",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += ["", *(f"- `{r['drill']}`: detect = {r['detect']['signal']}"
                    + (f"; **{'; '.join(r['problems'])}**" if r["problems"] else "") for r in results)]
    return "\n".join(lines) + "\n"
