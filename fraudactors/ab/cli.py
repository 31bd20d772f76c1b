"""``fraudactors ab report``: the champion/challenger evidence from the shared A/B ledger.

Reads the ledger the engines write in the configured Redis (``--config`` / env, as ``run``), and
prints one row per model (deciding, shadow, degraded fallback) with detection, precision and the
false-positive rate over the window, each with its 95 % interval and label maturity, then one line
per challenger with the test, its p-value and a plain verdict. ``--json PATH`` (``-`` for stdout)
writes the same as JSON. Window settings: ``[ab]`` (``--window-days`` and ``--label-delay-days``
override them for this report).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

HELP = "A/B evidence per model variant from delayed labels: `ab report` (table + JSON, verdicts)"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ab_command", metavar="SUBCOMMAND", required=True)
    report = sub.add_parser("report", help="print the per-variant evidence and the verdicts",
                            description=__doc__)
    report.add_argument("--config", metavar="PATH", default=None,
                        help="TOML config file (default: FRAUDACTORS_CONFIG, then packaged defaults)")
    report.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON ('-': stdout)")
    report.add_argument("--window-days", type=float, default=None, help="the window of event time (ab.window_s)")
    report.add_argument("--label-delay-days", type=float, default=None,
                        help="decisions older than this count as label-mature (ab.label_delay_s)")


async def fetch(settings: Any) -> dict[str, Any]:
    from fraudactors.engine.ab import ledger_report
    from fraudactors.features.redis_client import make_client

    client = make_client(settings, max(settings.redis.socket_timeout_ms / 1000.0, 2.0), retry=True)
    try:
        return await ledger_report(client, settings)
    finally:
        await client.aclose()


def main(args: argparse.Namespace) -> int:
    import orjson

    from fraudactors.ab.report import format_report
    from fraudactors.errors import FraudActorsError
    from fraudactors.features.redis_client import CLIENT_ERRORS
    from fraudactors.settings import load_settings

    settings = load_settings(args.config)
    overrides: dict[str, float] = {}
    if args.window_days is not None:
        kept = settings.ab.window_s
        if args.window_days * 86400.0 > kept:
            # the engines delete the ledger's buckets older than that: a longer window would be
            # headed with dates it holds nothing for
            raise FraudActorsError(f"--window-days {args.window_days:g}: the ledger keeps ab.window_s = "
                                   f"{kept / 86400:g} days of event time; ask for at most that")
        overrides["window_s"] = args.window_days * 86400.0
    if args.label_delay_days is not None:
        overrides["label_delay_s"] = args.label_delay_days * 86400.0
    if overrides:
        settings = settings.replace(ab=overrides)
    errors: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, OSError)
    try:
        report = asyncio.run(fetch(settings))
    except errors as exc:
        raise FraudActorsError(f"cannot read the A/B ledger from Redis: {exc}") from exc
    if args.json == "-":
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(format_report(report))
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0
