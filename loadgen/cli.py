"""``fraudactors loadgen``: open-loop load against a running engine, with a report."""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
from typing import Any

# The committed models are trained on the simulator with seed 7; the load comes from another world.
DEFAULT_SEED = 2026

HELP = "open-loop load at a scheduled arrival rate against a running engine; measures end-to-end latency"


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (a seed, a count, 0 for none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of records, calls, partitions)."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers >= 1 ("1,32,256")."""
    values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"give at least one number: {text!r}")
    return values


def add_load_arguments(parser: argparse.ArgumentParser, *, rate: float, duration: float, report: str | None,
                       warmup: int = 0, send_tick_ms: float = 20.0) -> None:
    """The options shared by ``loadgen`` and ``demo``."""
    parser.add_argument("--rate", type=positive_float, default=rate, metavar="TPS",
                        help=f"arrival rate in transactions per second (start rate for step/ramp; default {rate:g})")
    parser.add_argument("--duration", type=positive_float, default=duration, metavar="S",
                        help=f"how long to send, seconds (default {duration:g})")
    parser.add_argument("--report", default=report, metavar="PATH",
                        help="write the report JSON here, the Markdown next to it (.md) and PNG charts "
                             + (f"(default {report})" if report else "(default: no files, summary only)"))
    parser.add_argument("--profile", choices=("constant", "step", "ramp"), default="constant",
                        help="arrival-rate profile (default constant)")
    parser.add_argument("--rate-to", type=positive_float, default=None, metavar="TPS",
                        help="final rate for step/ramp (default: --rate)")
    parser.add_argument("--steps", type=positive_int, default=4, help="number of steps for --profile step (default 4)")
    parser.add_argument("--drain-timeout", type=positive_float, default=30.0, metavar="S",
                        help="after sending, wait at most this long for outstanding decisions (default 30)")
    parser.add_argument("--event-time", choices=("sim", "send"), default="sim",
                        help="sim: keep the simulator's event times (accuracy is meaningful; default); "
                             "send: restamp with the scheduled send time")
    parser.add_argument("--warmup", type=non_negative_int, default=warmup, metavar="N",
                        help=f"first send N transactions of history as fast as possible and wait for their "
                             f"decisions, unmeasured, so users have a past (default {warmup})")
    parser.add_argument("--send-tick-ms", type=positive_float, default=send_tick_ms, metavar="MS",
                        help="the sender sends what fell due every MS milliseconds, one batch per partition "
                             f"(counted in the latency; longer = fewer broker requests; default {send_tick_ms:g})")
    parser.add_argument("--no-labels", action="store_true", help="do not send the delayed fraud labels")
    parser.add_argument("--seed", type=non_negative_int, default=DEFAULT_SEED,
                        help=f"simulator seed (default {DEFAULT_SEED}: a world the default models never trained on)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress line (loadgen writes it on stderr, demo on stdout)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="TOML settings (Kafka bootstrap, topic names); env FRAUDACTORS_* overrides apply")
    parser.add_argument("--bootstrap-servers", default=None, help="override kafka.bootstrap_servers")
    add_load_arguments(parser, rate=1000.0, duration=30.0, report=None)


def load_config_from_args(args: argparse.Namespace) -> Any:
    from loadgen.runner import LoadConfig
    from loadgen.schedule import make_profile

    profile = make_profile(args.profile, args.rate, args.duration, args.rate_to, args.steps)
    return LoadConfig(profile=profile, drain_timeout_s=args.drain_timeout, seed=args.seed, warmup=args.warmup,
                      event_time=args.event_time, send_tick_s=args.send_tick_ms / 1000.0,
                      send_labels=not args.no_labels, progress=not args.no_progress)


def finish(result: Any, report_path: str | None) -> dict[str, Any]:
    """Print the summary table on stdout, then write the files (when asked); returns the report.
    The table comes first, so a report that cannot be written (``LoadgenError``) loses no result."""
    from loadgen.report import build_report, format_table, remove_old_report, write_report_files
    from loadgen.runner import LoadgenError

    report = build_report(result)
    print(format_table(report), flush=True)
    if report_path:
        try:
            write_report_files(result, report, report_path)
        except BaseException:  # failed, or stopped (Ctrl-C, SIGTERM): no half-written report left
            with contextlib.suppress(LoadgenError):
                remove_old_report(report_path)
            raise
        print(f"report: {report_path} (+ {report['markdown']}, {len(report['charts'])} charts)")
    return report


# Exit code after SIGTERM (Ctrl-C is 130, from the CLI's KeyboardInterrupt).
EXIT_TERMINATED = 128 + signal.SIGTERM


def main(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from fraudactors.logging import configure_logging
    from fraudactors.settings import load_settings
    from loadgen.procs import SigtermCancels, SigtermRaises, Terminated
    from loadgen.report import ensure_report_dir, lost_line, remove_old_report
    from loadgen.runner import RunResult, prepare_load, run_load

    configure_logging("warning", "json", stream=sys.stderr)
    # aiokafka logs every failed connection attempt; the load generator reports failures itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    overrides: dict[str, Any] = {}
    if args.bootstrap_servers:
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap_servers}
    settings = load_settings(args.config, overrides=overrides)
    config = load_config_from_args(args)
    if args.report:
        ensure_report_dir(args.report)
        remove_old_report(args.report)  # an interrupted or failed run leaves no report looking current
    sigterm = SigtermCancels()

    async def guarded() -> RunResult:
        # SIGTERM cancels the run as Ctrl-C does (asyncio.run cancels it and raises KeyboardInterrupt).
        with sigterm:
            if not args.no_progress:
                print(f"fraudactors loadgen: generating {config.profile.total:,} transactions", file=sys.stderr)
            prepared = prepare_load(config)
            return await run_load(settings, config, prepared=prepared)

    try:
        # SIGTERM outside the run's task (the report being written) raises as Ctrl-C does there
        with SigtermRaises():
            result = asyncio.run(guarded())
            report = finish(result, args.report)
    except (asyncio.CancelledError, Terminated) as exc:
        if isinstance(exc, asyncio.CancelledError) and not sigterm.terminated:
            raise
        print("fraudactors loadgen: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    if report["lost"]:
        print(f"fraudactors loadgen: {lost_line(report)}", file=sys.stderr)
        return 1
    return 0
