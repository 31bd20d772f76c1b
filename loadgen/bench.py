"""``fraudactors bench drain|scaleout|pool|state``: benchmarks (not tests). They print numbers.

Each starts its own embedded broker and Redis, is bounded in time, and prints a table; ``--json PATH``
also writes the numbers. Nothing here asserts on a wall-clock time.

- ``drain``: fill ``transactions`` with N records, start the engine, measure how fast it drains them
  (its maximum throughput); then the null pipeline (consume -> decode -> encode -> produce -> commit,
  no features, no model) on the same backlog and broker; print both rates and engine / null. With
  ``--peer seedref.py`` also the per-message peer design on the same backlog, broker and Redis.
- ``scaleout``: the same backlog drained by 1 and then by 2 engine processes in one consumer group.
- ``pool``: ONNX inference through the engine's ProcessPool vs a session in a thread of this process,
  for batches of 1, 32 and 256 rows: rows/s and per-call latency.
- ``state``: N then 2N simulated transactions over a fixed population through the state path into
  an embedded Redis: ``used_memory`` and keys per active user and merchant (``bench_state.py``).

Rates are measured from the moment every process of a trial is ready (partitions assigned) to the
last decision read, over the decisions read in that window, so start-up is not counted. CPU is
sampled from /proc for every process (engine with its inference workers, broker, Redis, this one).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "benchmarks (not tests): drain | scaleout | pool | state; print numbers (see docs/benchmarks.md)"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from loadgen.cli import non_negative_int, positive_float, positive_int, positive_int_list

    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, text in (("drain", "engine drain rate on a backlog vs the null pipeline"),
                       ("scaleout", "1 vs 2 engine processes in one group on the same backlog")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--records", type=positive_int, default=100_000, metavar="N", help="backlog size (default 100000)")
        p.add_argument("--partitions", type=positive_int, default=None, help="partitions (default: topics.partitions)")
        p.add_argument("--timeout", type=positive_float, default=300.0, metavar="S",
                       help="give up a trial after this long (default 300)")
        p.add_argument("--config", default=None, metavar="PATH", help="TOML settings for the engine")
        p.add_argument("--redis-cluster", type=non_negative_int, default=0, metavar="N",
                       help="the feature store on an embedded N-master Redis Cluster (default: one instance)")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
        if name == "drain":
            p.add_argument("--peer", default=None, metavar="PATH",
                           help="also drain the backlog with this per-message peer script (seedref.py: "
                                "kafka-python, make_rf.py beside it) on the same broker and Redis")
            p.add_argument("--peer-records", type=positive_int, default=10_000, metavar="N",
                           help="records the peer drains (default 10000; it is slow)")
            p.add_argument("--history-days", type=float, default=0.0, metavar="D",
                           help="first drain about D simulated days of the same users' transactions, unmeasured, "
                                "so the window sees users with a past (30: a steady state; default 0: a "
                                "population as old as the backlog)")
    p = sub.add_parser("pool", help="ProcessPool vs thread for ONNX inference",
                       description="ONNX inference through the ProcessPool vs a session in a thread")
    p.add_argument("--rows", type=positive_int_list, default="1,32,256", help="rows per call, comma-separated (default 1,32,256)")
    p.add_argument("--calls", type=positive_int, default=2000, help="calls per batch size and mode (default 2000)")
    p.add_argument("--concurrency", type=positive_int, default=8,
                   help="calls in flight for the throughput run (default 8)")
    p.add_argument("--config", default=None, metavar="PATH", help="TOML settings (models.dir, variants)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    text = "Redis memory after N and 2N transactions over a fixed population (bounded state)"
    p = sub.add_parser("state", help=text, description=text)
    p.add_argument("--records", type=positive_int, default=120_000, metavar="N",
                   help="transactions at the first checkpoint; the second is 2N (default 120000)")
    p.add_argument("--users", type=positive_int, default=1000, help="simulated users (default 1000)")
    p.add_argument("--merchants", type=positive_int, default=200, help="simulated merchants (default 200)")
    p.add_argument("--partitions", type=positive_int, default=12, help="partitions (default 12)")
    p.add_argument("--seed", type=non_negative_int, default=7, help="simulator seed (default 7)")
    p.add_argument("--redis-cluster", type=non_negative_int, default=0, metavar="N",
                   help="an embedded N-master Redis Cluster instead of one Redis")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def main(args: argparse.Namespace) -> int:
    import asyncio

    import orjson

    from fraudactors.logging import configure_logging
    from fraudactors.settings import load_settings

    configure_logging("warning", "json", stream=sys.stderr)
    if args.bench == "state":
        from loadgen.bench_state import print_state, state_bench

        result_state = asyncio.run(state_bench(args.records, args.users, args.merchants, args.partitions, args.seed,
                                               args.redis_cluster))
        print_state(result_state)
        if args.json:
            from pathlib import Path

            Path(args.json).write_bytes(orjson.dumps(result_state, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    settings = load_settings(args.config)
    if args.bench == "pool":
        from loadgen.bench_pool import pool_bench

        result: dict[str, Any] = asyncio.run(pool_bench(settings, args.rows, args.calls, args.concurrency))
    else:
        from loadgen.bench_drain import drain_bench, scaleout_bench

        if args.partitions:
            settings = settings.replace(topics={"partitions": args.partitions})
        if args.bench == "drain":
            result = asyncio.run(drain_bench(settings, args.records, args.timeout, args.redis_cluster,
                                             peer=args.peer, peer_records=args.peer_records,
                                             history_days=args.history_days))
        else:
            result = asyncio.run(scaleout_bench(settings, args.records, args.timeout, args.redis_cluster))
    if args.json:
        from pathlib import Path

        Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0
