"""``fraudactors demo``: everything on one machine with nothing installed but the package.

Starts an embedded Kafka-protocol broker (Tansu) and an embedded Redis-protocol server on free
loopback ports, runs the workload in :func:`run_demo` against them, prints a summary, writes the
report and stops both services — on success, on error and on Ctrl-C / SIGTERM alike.

The workload today is the services check: create the topics (``topics.partitions`` partitions),
stream synthetic transactions through the broker at ``--rate`` for ``--duration`` seconds and read
every one back, and write and read Redis. The engine plugs in by replacing :func:`run_demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fraudactors.services.stack import EmbeddedStack
    from fraudactors.settings import Settings

HELP = "run the whole system locally: embedded broker and Redis, engine, load generator, report"

# Exit codes: 130 after Ctrl-C (the CLI maps KeyboardInterrupt), 143 after SIGTERM.
EXIT_TERMINATED = 128 + signal.SIGTERM


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=_positive(float), default=1000.0, metavar="TPS",
                        help="transactions per second to send (default: %(default)s)")
    parser.add_argument("--duration", type=_positive(float), default=30.0, metavar="S",
                        help="seconds to send for (default: %(default)s)")
    parser.add_argument("--report", default="demo-report.json", metavar="PATH",
                        help="where to write the JSON report (default: %(default)s)")
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="TOML config file (defaults apply to every key it leaves out)")


def _positive(kind: type[float]) -> Any:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text!r}")
        return value

    return parse


def say(*parts: object) -> None:
    """Human progress on stdout (the structured logs go to stderr)."""
    print(*parts, flush=True)


@dataclass
class DemoResult:
    """What the workload did: the report to write, and whether the run counts as a success."""

    report: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


def main(args: argparse.Namespace) -> int:
    from fraudactors.logging import configure_logging
    from fraudactors.settings import load_settings

    settings = load_settings(args.config)  # ConfigError -> one line on stderr, exit 2 (cli.py)
    configure_logging(os.environ.get("FRAUDACTORS_DEMO_LOG_LEVEL", "warning"), "json", stream=sys.stderr)
    terminated = False

    async def guarded() -> int:
        # Ctrl-C: asyncio.Runner cancels this task and raises KeyboardInterrupt afterwards (exit 130).
        # SIGTERM: the same cancellation, so the services are stopped on the way out (exit 143).
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            return await _main(args, settings)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            return runner.run(guarded())
        except asyncio.CancelledError:
            if not terminated:
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

    say(f"fraudactors demo: starting embedded broker and Redis (rate {args.rate:g}/s, "
        f"duration {args.duration:g}s)")
    async with EmbeddedStack(settings) as stack:
        say(f"broker: tansu pid {stack.broker.pid} on {stack.broker.bootstrap_servers}")
        say(f"redis: pid {stack.redis.pid} on {stack.redis.url}")
        result = await run_demo(args, stack)
        say("stopping embedded services")
    path = write_report(args.report, result.report)
    say(f"report written to {path}")
    return 0 if result.ok else 1


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    import orjson

    target = Path(path)
    if target.parent != Path(""):
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    tmp.replace(target)
    return target


async def run_demo(args: argparse.Namespace, stack: EmbeddedStack) -> DemoResult:
    """The workload between start and stop of the embedded services (the engine replaces this)."""
    from fraudactors.services.check import services_check

    check = await services_check(stack.settings, rate=args.rate, duration_s=args.duration, say=say)
    return DemoResult(report=check.report, ok=check.ok)
