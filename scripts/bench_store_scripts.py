"""Where the feature store's Redis time goes at live-like batches (a benchmark, not a test).

    python scripts/bench_store_scripts.py [--warm 150000] [--measure 40000] [--batch 115]
        [--cut-before MARKER] [--drop LINE ...] [--redis-bin PATH] [--outcomes-flush N]

The simulator's population of the demo (5,000 users, 1,000 merchants) is first written through
``OnlineFeatureStore.compute`` in batches of 1,000 (unmeasured: a steady state, ~30 days of
history at 150,000); then ``--measure`` records go through in batches of ``--batch`` mixed over 12
partitions, committed three batches behind, as the engine's coalesced calls are at 5,000/s. Printed
per record: the client's wall time and CPU, Redis's ``EVALSHA`` time (both scripts: ``INFO
commandstats``), each script's round trip, and every command the scripts ran.

``--cut-before MARKER`` returns from the write script just before the line that starts with MARKER
(measurement only: from then on nothing is written, so the batches after see a fixed state);
``--drop LINE`` removes an exact line from it. Both measure what a part of the script costs.

Then the A/B outcome memory: the measured records' decisions go through ``OutcomeRecorder`` in
flushes of ``--outcomes-flush`` entries (1,000: 0.2 s at 5,000/s), as the engine flushes them;
printed: Redis's time per flush and per entry, script calls per flush and the longest one (a
script holds every other client's command until it ends).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import time
import zlib
from collections.abc import Sequence
from typing import Any

import orjson

from fraudactors.features import scripts
from fraudactors.features.schema import Transaction, parse_transaction
from fraudactors.features.store import OnlineFeatureStore
from fraudactors.services.redis import EmbeddedRedis
from fraudactors.settings import load_settings
from fraudactors.sim.simulator import Simulator

PARTITIONS = 12


def _write_script(cut: str | None, drops: Sequence[str]) -> str:
    text = scripts.WRITE_BATCH
    for line in drops:
        if text.count(line + "\n") != 1:
            raise SystemExit(f"--drop: {line!r} is not exactly one line of the write script")
        text = text.replace(line + "\n", "")
    if cut is not None:
        if text.count("\n" + cut) != 1:
            raise SystemExit(f"--cut-before: no single line of the write script starts with {cut!r}")
        text = text.replace("\n" + cut, "\ndo return {0, 0, 0, 0} end\n" + cut)
    return text


async def _run(txns: list[Transaction], args: argparse.Namespace) -> None:
    server = EmbeddedRedis(args.redis_bin)
    await asyncio.to_thread(server.start_sync)
    try:
        settings = load_settings(env={}, overrides={"redis": {"url": server.url, "key_prefix": "bench:",
                                                              "socket_timeout_ms": 5000}})
        store = OnlineFeatureStore(settings)
        await store.open()
        for p in range(PARTITIONS):
            await store.claim(p)
        wall: dict[str, float] = collections.defaultdict(float)
        calls: collections.Counter[str] = collections.Counter()
        run_script = store._run

        async def timed(script: str, batch: list[tuple[list[str], list[Any]]], what: str) -> list[Any]:
            t0 = time.perf_counter()
            try:
                return await run_script(script, batch, what)
            finally:
                wall[what] += time.perf_counter() - t0
                calls[what] += 1

        store._run = timed  # type: ignore[method-assign]
        next_offset = [0] * PARTITIONS
        behind: collections.deque[dict[int, int]] = collections.deque()

        async def compute(batch: list[Transaction]) -> None:
            parts = [zlib.crc32(t.user_id.encode()) % PARTITIONS for t in batch]
            offsets = []
            for p in parts:
                offsets.append(next_offset[p])
                next_offset[p] += 1
            await store.compute(batch, parts, offsets)
            behind.append(dict(zip(parts, offsets, strict=True)))
            if len(behind) > 3:
                for p, offset in behind.popleft().items():
                    store.note_committed(p, offset + 1)

        for i in range(0, args.warm, 1000):
            await compute(txns[i:min(i + 1000, args.warm)])
        client = store._client()
        if args.cut_before or args.drop:
            store._scripts._registered["write"] = client.register_script(_write_script(args.cut_before, args.drop))
        await client.config_resetstat()
        wall.clear()
        calls.clear()
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(args.warm, len(txns), args.batch):
            await compute(txns[i:i + args.batch])
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        n = len(txns) - args.warm
        stats = await client.info("commandstats")
        evalsha = stats.get("cmdstat_evalsha", {"usec": 0})["usec"]
        print(f"{n:,} records in batches of {args.batch} over {PARTITIONS} partitions, after {args.warm:,} of history:")
        print(f"  client: {elapsed / n * 1e6:.1f} us wall, {cpu / n * 1e6:.1f} us CPU per record")
        print(f"  redis EVALSHA (read + write scripts): {evalsha / n:.1f} us per record")
        for what in ("read", "write"):
            print(f"  {what} round trip: {wall[what] / calls[what] * 1e3:.2f} ms per call, "
                  f"{wall[what] / n * 1e6:.1f} us per record")
        for name, row in sorted(stats.items(), key=lambda kv: -kv[1]["usec"]):
            if name != "cmdstat_evalsha":
                print(f"  {name.removeprefix('cmdstat_')}: {row['calls'] / n:.2f} per record, "
                      f"{row['usec'] / n:.2f} us per record")
        await store.close()
        await _outcomes(txns[args.warm:], settings, args.outcomes_flush)
    finally:
        await asyncio.to_thread(server.stop_sync)


async def _outcomes(txns: list[Transaction], settings: Any, per_flush: int) -> None:
    from fraudactors.engine.inference import Scored
    from fraudactors.engine.labels import OutcomeRecorder
    from fraudactors.engine.metrics import EngineMetrics

    recorder = OutcomeRecorder(settings, EngineMetrics())
    client = recorder.connect()
    await client.config_set("slowlog-log-slower-than", 0)
    await client.config_set("slowlog-max-len", 100_000)
    await client.slowlog_reset()
    await client.config_resetstat()
    flushes = 0
    for i in range(0, len(txns), per_flush):
        batch = txns[i:i + per_flush]
        recorder.record(batch, [Scored("A", "v1", 0.1, "approve", False, []) for _ in batch])
        await recorder.flush()
        flushes += 1
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    longest = max((entry["duration"] for entry in await client.slowlog_get(100_000)
                    if entry["command"].startswith(b"EVALSHA")), default=0)
    print(f"outcome memory, {flushes:,} flushes of {per_flush:,} entries:")
    print(f"  redis: {stats['usec'] / flushes / 1e3:.2f} ms per flush, {stats['usec'] / len(txns):.2f} us per entry, "
          f"{stats['calls'] / flushes:.1f} script calls per flush, the longest {longest / 1e3:.2f} ms")
    await recorder._final_flush(client, ())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", type=int, default=150_000, help="records of history first (unmeasured)")
    parser.add_argument("--measure", type=int, default=40_000, help="records measured")
    parser.add_argument("--batch", type=int, default=115, help="records per measured call (5,000/s live: ~115)")
    parser.add_argument("--cut-before", metavar="MARKER", help="return from the write script before this line")
    parser.add_argument("--drop", metavar="LINE", action="append", default=[], help="remove this line of it")
    parser.add_argument("--outcomes-flush", type=int, default=1000, metavar="N",
                        help="decisions per outcome flush (5,000/s live: 1,000 every 0.2 s)")
    parser.add_argument("--redis-bin", help="valkey-server / redis-server (default: as the engine resolves it)")
    args = parser.parse_args(argv)
    sim = Simulator(seed=7, n_users=5000, n_merchants=1000, days=None)
    txns = [parse_transaction(orjson.dumps(ev.txn)) for ev in itertools.islice(sim.stream(), args.warm + args.measure)]
    asyncio.run(_run(txns, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
