"""``fraudactors demo``: everything on one machine with nothing installed but the package.

1. starts an embedded Kafka-protocol broker (Tansu) and an embedded Redis-protocol server on free
   loopback ports and creates the four topics;
2. makes sure the models exist (the committed ``models/``; otherwise ``fraudactors train --synthetic``);
3. starts the engine as a ``fraudactors run`` child process and waits until ``/readyz`` answers 200;
4. runs the open-loop load generator in this process (``--rate``, ``--duration``, ``--profile`` ...),
   with a live progress line, then prints a summary table and writes the report JSON (SPEC §5),
   a Markdown summary and PNG charts next to ``--report``;
5. stops the engine with SIGTERM (it must exit 0) and stops both services.

Services and engine are stopped on success, on error and on Ctrl-C / SIGTERM alike (exit 130 /
143, one line on stderr, no report); the children also die with us if we are killed (SIGKILL).
Human progress goes to stdout; the structured logs of this process go to stderr (warnings only).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fraudactors.services.stack import EmbeddedStack
    from fraudactors.settings import Settings

HELP = "run the whole system locally: embedded broker and Redis, engine, load generator, report"

# Exit codes: 130 after Ctrl-C (the CLI maps KeyboardInterrupt), 143 after SIGTERM.
EXIT_TERMINATED = 128 + signal.SIGTERM
DEFAULT_REPORT = "reports/demo-report.json"
ENGINE_LOG_SUFFIX = "-engine.log"  # the engine's log, kept next to the report as <stem>-engine.log
# Transactions of history sent (unmeasured) before the run, so users have a past: 300,000 are about
# 21 simulated days of the 5,000 users (~40 s here). The models are calibrated on users with weeks
# of history; measured with the default run (1,000/s, 30 s) on 2026-12-02, the run's false-positive
# rate after 50,000 / 150,000 / 200,000 / 300,000 of history: 10.4 / 4.5 / 3.7 / 2.9 %.
DEFAULT_WARMUP = 300_000


# The embedded Tansu broker stores every record batch as an object and lists all of a partition's
# stored batches on each fetch (docs/tansu.md): its CPU grows with the number of batches produced
# so far, and every fetch waits out fetch_max_wait_ms. On this broker, fewer and bigger batches buy
# more than they cost: measured at 5,000 TPS for 60 s on 2 cores (docs/benchmarks.md), fetch wait /
# send tick 20 / 20 ms gave p99 0.57 s and 30 / 30 ms 0.33 s. Applied only to keys the user's config
# leaves at their defaults (and --send-tick-ms only when not given).
EMBEDDED_BROKER_KAFKA = {"linger_ms": 20, "fetch_max_wait_ms": 30}
EMBEDDED_BROKER_SEND_TICK_MS = 30.0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from loadgen.cli import add_load_arguments, non_negative_int, positive_float

    add_load_arguments(parser, rate=1000.0, duration=30.0, report=DEFAULT_REPORT, warmup=DEFAULT_WARMUP,
                       send_tick_ms=EMBEDDED_BROKER_SEND_TICK_MS)
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="TOML config file (defaults apply to every key it leaves out)")
    parser.add_argument("--engine-timeout", type=positive_float, default=120.0, metavar="S",
                        help="how long the engine may take to become ready (default 120)")
    parser.add_argument("--redis-cluster", type=non_negative_int, default=0, metavar="N",
                        help="run the feature store on an embedded N-master Redis Cluster (default: one instance)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="level of the demo's own structured logs on stderr (default warning)")


def _tuned_for_embedded_broker(settings: Settings) -> Settings:
    from fraudactors.settings import KafkaSettings

    defaults = KafkaSettings()
    kafka = {key: value for key, value in EMBEDDED_BROKER_KAFKA.items()
             if getattr(settings.kafka, key) == getattr(defaults, key)}
    return settings.replace(kafka=kafka) if kafka else settings


def say(*parts: object) -> None:
    """Human progress on stdout (the structured logs go to stderr)."""
    print(*parts, flush=True)


@dataclass
class DemoResult:
    """What the workload did: the report to write, and whether the run counts as a success."""

    report: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    problems: list[str] = field(default_factory=list)


def main(args: argparse.Namespace) -> int:
    from fraudactors.logging import configure_logging
    from fraudactors.settings import load_settings
    from loadgen.cli import load_config_from_args
    from loadgen.procs import SigtermCancels
    from loadgen.report import ensure_report_dir, remove_old_report

    settings = _tuned_for_embedded_broker(load_settings(args.config))  # ConfigError -> one line, exit 2
    load_config_from_args(args)  # so is a bad load profile, before any service starts
    ensure_report_dir(args.report, extra=(ENGINE_LOG_SUFFIX,))  # a bad --report fails now, not after the run
    # An interrupted or failed run leaves no earlier report looking current.
    remove_old_report(args.report, extra=(ENGINE_LOG_SUFFIX,))
    configure_logging(args.log_level, "json", stream=sys.stderr)
    # aiokafka logs every failed connection attempt; the load generator reports a lost broker itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    sigterm = SigtermCancels()

    async def guarded() -> int:
        # Ctrl-C: asyncio.Runner cancels this task and raises KeyboardInterrupt afterwards (exit 130).
        # SIGTERM: the same cancellation, so the engine and services are stopped on the way out (exit 143).
        task = asyncio.current_task()
        assert task is not None

        def quiet_when_interrupted(record: logging.LogRecord) -> bool:
            # Once Ctrl-C or SIGTERM cancels the run, the Kafka clients are torn down mid-request and
            # aiokafka logs the connections it loses; the demo says "interrupted" once instead.
            return not (record.name.startswith("aiokafka") and task.cancelling() > 0)

        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(quiet_when_interrupted)
        try:
            with sigterm:
                return await _main(args, settings)
        finally:
            for handler in handlers:
                handler.removeFilter(quiet_when_interrupted)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            return runner.run(guarded())
        except asyncio.CancelledError:
            if not sigterm.terminated:
                raise
            print("fraudactors demo: terminated", file=sys.stderr)
            return EXIT_TERMINATED


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


async def _main(args: argparse.Namespace, settings: Settings) -> int:
    from fraudactors.services.stack import EmbeddedStack
    from loadgen.models import ensure_models

    models_dir = ensure_models(settings, say=say)
    settings = settings.replace(models={"dir": str(models_dir)})
    say(f"fraudactors demo: starting embedded broker and Redis (rate {args.rate:g}/s, "
        f"duration {args.duration:g}s, models {models_dir})")
    async with EmbeddedStack(settings, redis_cluster=args.redis_cluster) as stack:
        say(f"broker: tansu pid {stack.broker.pid} on {stack.broker.bootstrap_servers}")
        say(f"redis: {stack.describe_redis()}")
        try:
            result = await run_demo(args, stack)
        finally:
            say("stopping embedded services")
    for problem in result.problems:
        print(f"fraudactors demo: {problem}", file=sys.stderr)
    return 0 if result.ok else 1


async def run_demo(args: argparse.Namespace, stack: EmbeddedStack) -> DemoResult:
    """Topics, engine child, load run, report files, engine stop (between the services' start and stop)."""
    from fraudactors.services.kafka import create_topics
    from loadgen.cli import load_config_from_args
    from loadgen.procs import CpuMeter, StageMeter, engine_child
    from loadgen.progress import Progress
    from loadgen.report import build_report, lost_line, write_error, write_report_files
    from loadgen.runner import prepare_load, run_load

    settings = stack.settings
    created = await create_topics(settings)
    say(f"topics: {', '.join(_topics(settings))} ({settings.topics.partitions} partitions each; "
        f"created {len(created)})")
    redis_ok = await _redis_ping(settings)
    with tempfile.TemporaryDirectory(prefix="fraudactors-demo-") as workdir:
        engine = engine_child(settings, Path(workdir))
        t0 = time.perf_counter()
        say("engine: starting fraudactors run")
        try:
            await engine.spawn()
            # The transactions are generated while the engine starts (it is another process).
            config = load_config_from_args(args)
            prepared = prepare_load(config)
            await engine.wait_ready(timeout_s=args.engine_timeout)
            say(f"engine: pid {engine.pid} ready in {time.perf_counter() - t0:.1f}s "
                f"(http://127.0.0.1:{engine.settings.http.port}/metrics)")
            say(f"streaming {config.profile.total:,} transactions into {settings.topics.transactions} "
                f"({config.profile.name}, {args.rate:g}/s"
                + (f" -> {config.profile.segments[-1].rate_to:g}/s" if config.profile.name != "constant" else "")
                + f", {args.duration:g}s), reading decisions from {settings.topics.predictions}")
            # CPU of every process over the send window (engine with its inference workers, broker,
            # Redis, this process) - not over the warm-up, which runs the engine flat out.
            meter = CpuMeter({"engine": engine.pid, **stack.pids, "loadgen": os.getpid()})
            # and the engine's time per batch in each stage over the same window
            stages = StageMeter(f"http://127.0.0.1:{engine.settings.http.port}/metrics")

            def window_start() -> None:
                meter.start()
                stages.start()

            def window_end() -> None:
                meter.stop()
                stages.stop()

            result = await run_load(settings, config, Progress(sys.stdout, enabled=config.progress), prepared,
                                    on_clock_start=window_start, on_send_end=window_end)
            cpu = meter.result
            stage_ms = await stages.result()
        except BaseException as exc:
            engine_log = engine.tail(2000)
            await asyncio.shield(engine.stop())
            # The engine's last words explain its failure; not when the demo itself was interrupted.
            interrupted = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
            if engine.returncode not in (0, None) and engine_log and not interrupted:
                say(f"engine output (last lines):\n{engine_log}")
            raise
        say("engine: stopping (SIGTERM)")
        code = await engine.stop()
        ab_report = await _ab_report(settings)  # after the stop: the engine's last flush is in
        engine_log = engine.tail(2000)
        # The engine's own log (JSON lines) is kept next to the report, for what the numbers do not say.
        engine_log_path = Path(args.report).with_name(Path(args.report).stem + ENGINE_LOG_SUFFIX)
        report = build_report(result)
        # Extra keys: what the demo itself checked.
        report.update({"partitions": settings.topics.partitions, "received": report["decided"],
                       "redis_ok": redis_ok, "engine_exit_code": code, "cpu_cores": cpu,
                       "cpu_wait_cores": meter.waiting, "engine_stages_ms": stage_ms,
                       "loadavg": _loadavg(), "engine_log": str(engine_log_path), "ab": ab_report})
        # The summary first: a report that cannot be written then loses no result.
        _summarize(report, ab_report, cpu, meter.waiting, stage_ms)
        try:
            engine_log_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(engine.log_path, engine_log_path)
        except OSError as exc:
            raise write_error(exc) from exc
        write_report_files(result, report, args.report)
    say(f"report written to {args.report} (+ {report['markdown']}, charts: "
        f"{', '.join(Path(c).name for c in report['charts'])})")
    problems = []
    if code != 0:
        problems.append(f"the engine exited with code {code} after SIGTERM; its last output: "
                        f"{engine_log.strip().splitlines()[-1:] or ['-']}")
    if report["lost"]:
        problems.append(lost_line(report))
    if not redis_ok:
        problems.append("the embedded Redis did not answer PING")
    return DemoResult(report=report, ok=not problems, problems=problems)


def _summarize(report: dict[str, Any], ab_report: dict[str, Any] | None, cpu: dict[str, float],
               waiting: dict[str, float], stage_ms: dict[str, dict[str, float]] | None) -> None:
    """The run's summary on stdout: the report's table, the A/B evidence, CPU and engine stages."""
    from loadgen.report import format_table

    say(format_table(report))
    if ab_report is not None:
        from fraudactors.ab.report import format_report

        warm = (report.get("warmup") or {}).get("labels_sent", 0)
        say(f"labels fed: {warm + report.get('labels_sent', 0):,} (warm-up {warm:,}, run "
            f"{report.get('labels_sent', 0):,}): the simulator's delayed fraud reports")
        say(format_report(ab_report))
    say("cpu over the send window, cores used (waiting for a cpu): "
        + ", ".join(f"{k} {v:.2f} ({waiting.get(k, 0.0):.2f})" for k, v in cpu.items())
        + f"; load average {report['loadavg']}")
    if stage_ms:
        say("engine stages over the send window, mean per batch (batches): "
            + ", ".join(f"{name} {v['mean_ms']:.2f} ms ({v['batches']:,})" for name, v in stage_ms.items()))


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


async def _ab_report(settings: Settings) -> dict[str, Any] | None:
    """The A/B evidence the run left in the embedded Redis (None, with a line, if unreadable)."""
    from fraudactors.ab.cli import fetch
    from fraudactors.features.redis_client import CLIENT_ERRORS

    errors: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, OSError)
    try:
        return await fetch(settings)
    except errors as exc:
        say(f"A/B report: the ledger could not be read ({exc!r})")
        return None


def _topics(settings: Settings) -> list[str]:
    t = settings.topics
    return [t.transactions, t.predictions, t.labels, t.dlq]


async def _redis_ping(settings: Settings) -> bool:
    from fraudactors.features.redis_client import make_client

    client = make_client(settings, 5.0)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()
