"""``fraudactors run``: the engine against configured Kafka and Redis.

Configuration: the packaged defaults, then ``--config PATH`` (or ``FRAUDACTORS_CONFIG``), then
``FRAUDACTORS_<SECTION>__<KEY>`` environment variables. Logs ``engine_ready`` (JSON lines on stdout
unless a terminal) once /readyz would answer 200. SIGTERM/SIGINT: stop fetching, finish and publish
what is in flight, commit, leave the group, exit 0 within ``engine.shutdown_timeout_s``. A root
supervisor failure: one ``engine_failed`` log line, a one-line message on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

HELP = "run the streaming engine against configured Kafka and Redis"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="TOML config file (default: FRAUDACTORS_CONFIG, then packaged defaults); "
                             "FRAUDACTORS_<SECTION>__<KEY> environment variables override it")


async def serve(settings: object) -> int:
    from fraudactors.engine.engine import Engine
    from fraudactors.logging import get_logger
    from fraudactors.redact import redact
    from fraudactors.settings import Settings, as_dict, secret_values

    assert isinstance(settings, Settings)
    secrets = secret_values(settings)
    log = get_logger(actor="app")
    log.info("engine_starting", settings=as_dict(settings))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = Engine(settings)
    stopper = asyncio.ensure_future(stop.wait())
    starting = asyncio.ensure_future(engine.start())
    await asyncio.wait([stopper, starting], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while starting: stop what has started, then exit cleanly
        log.info("signal_received", while_starting=True)
        await engine.stop()
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return 0
    try:
        starting.result()
    except Exception as exc:
        stopper.cancel()
        cause = _root_cause(exc)
        log.error("engine_failed", error=str(exc), cause=repr(cause), stage="start")
        print(redact(f"fraudactors run: engine failed to start: {cause}", secrets), file=sys.stderr)
        return 1
    task = engine.done
    assert task is not None
    from fraudactors import heap

    heap.settle()  # start-up is over: later collections skip everything it built
    await asyncio.wait([stopper, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        stopper.cancel()
        failure = task.exception() if not task.cancelled() else None
        root = _root_cause(failure) if failure is not None else None
        log.error("engine_failed", error=str(failure), cause=repr(root), stage="run")
        print(redact(f"fraudactors run: engine failed: {root or 'stopped unexpectedly'}", secrets), file=sys.stderr)
        return 1
    log.info("signal_received")
    try:
        await engine.stop()
    except Exception as exc:
        log.error("engine_failed", error=repr(exc), stage="stop")
        print(redact(f"fraudactors run: unclean shutdown: {exc!r}", secrets), file=sys.stderr)
        return 1
    return 0


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause (a supervisor's restart-budget error wraps the real failure)."""
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def main(args: argparse.Namespace) -> int:
    from fraudactors.logging import configure_logging
    from fraudactors.settings import load_settings, secret_values

    settings = load_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.format, secrets=secret_values(settings))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))
