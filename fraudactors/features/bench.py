"""Feature benchmarks (not tests): ``python -m fraudactors.features.bench [--n 200000]``.

Prints per-record costs of parsing and of the feature transition, offline throughput, and the
online store's throughput against an embedded Redis (batches per partition, like the workers).
Numbers depend on the machine and its load; nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import replace

import orjson

from fraudactors.features.definition import MerchantState, count_merchant_tx, is_new_customer, transition
from fraudactors.features.offline import offline_features
from fraudactors.features.schema import Label, Transaction, parse_transaction


def _dataset(n: int, seed: int) -> tuple[list[bytes], list[Label]]:
    from fraudactors.sim.simulator import Simulator

    sim = Simulator(seed=seed, n_users=max(1000, n // 40), n_merchants=max(200, n // 200), days=None)
    raws: list[bytes] = []
    labels: list[Label] = []
    for ev in itertools.islice(sim.stream(), n):
        raws.append(orjson.dumps(ev.txn))
        if ev.is_fraud and ev.label_at is not None:
            txn = ev.txn
            labels.append(Label(str(txn["transaction_id"]), str(txn["user_id"]),
                                str(txn.get("merchant_id", "unknown")), True, ev.label_at))
    labels.sort(key=lambda lb: lb.labeled_at)
    return raws, labels


def _per_record_us(seconds: float, n: int) -> str:
    return f"{seconds / n * 1e6:.1f} us/record"


async def _online(txns: Sequence[Transaction], labels: Sequence[Label], batch: int, partitions: int) -> None:
    from fraudactors.features.store import OnlineFeatureStore
    from fraudactors.services.redis import EmbeddedRedis
    from fraudactors.settings import load_settings

    server = EmbeddedRedis()
    await asyncio.to_thread(server.start_sync)
    try:
        settings = load_settings(env={}, overrides={"redis": {"url": server.url,
                                                              "key_prefix": f"bench-{uuid.uuid4().hex[:8]}:",
                                                              "socket_timeout_ms": 5000}})
        store = OnlineFeatureStore(settings)
        await store.open()
        await store._client().config_resetstat()
        queues: dict[int, list[Transaction]] = {}
        for t in txns:
            queues.setdefault(zlib.crc32(t.user_id.encode()) % partitions, []).append(t)
        label_at = 0
        started = time.perf_counter()
        batches = 0
        heads = dict.fromkeys(queues, 0)
        while heads:
            for p in list(heads):
                chunk = queues[p][heads[p]:heads[p] + batch]
                t_max = chunk[-1].event_time
                end = label_at
                while end < len(labels) and labels[end].labeled_at < t_max:
                    end += 1
                if end > label_at:
                    await store.apply_labels(labels[label_at:end])
                    label_at = end
                await store.compute(chunk, p, range(heads[p], heads[p] + len(chunk)))
                batches += 1
                heads[p] += len(chunk)
                if heads[p] >= len(queues[p]):
                    del heads[p]
        elapsed = time.perf_counter() - started
        print(f"online store: {len(txns)} records in {batches} batches of <= {batch} over {partitions} "
              f"partitions: {len(txns) / elapsed:,.0f} records/s, {elapsed / batches * 1e3:.2f} ms/batch "
              f"(Redis on this machine)")
        stats = await store._client().info("commandstats")
        for name, row in sorted(stats.items(), key=lambda kv: -kv[1]["usec"]):
            print(f"  redis {name.removeprefix('cmdstat_')}: {row['calls']} calls, {row['usec'] / 1e3:,.0f} ms, "
                  f"{row['usec'] / len(txns):.1f} us/record")
        await store.close()
    finally:
        await asyncio.to_thread(server.stop_sync)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="transactions (offline and in-process steps)")
    parser.add_argument("--online-n", type=int, default=50_000, help="transactions through Redis")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--live-rate", type=float, default=5000.0)
    parser.add_argument("--live-batch", type=int, default=10)
    args = parser.parse_args(argv)

    raws, labels = _dataset(args.n, args.seed)
    started = time.perf_counter()
    txns = [parse_transaction(raw) for raw in raws]
    print(f"parse_transaction: {_per_record_us(time.perf_counter() - started, len(raws))}")

    users: dict = {}
    merchants: dict[str, MerchantState] = {}
    started = time.perf_counter()
    for txn in txns:
        m = merchants.get(txn.merchant_id)
        if m is None:
            m = merchants[txn.merchant_id] = MerchantState()
        row, users[txn.user_id] = transition(users.get(txn.user_id), m, txn)
        count_merchant_tx(m, txn.event_time, is_new_customer(row))
    print(f"transition (user + merchant features, state update): "
          f"{_per_record_us(time.perf_counter() - started, len(txns))}")

    started = time.perf_counter()
    offline_features(txns, labels)
    elapsed = time.perf_counter() - started
    print(f"offline_features: {len(txns)} rows in {elapsed:.1f} s = {len(txns) / elapsed:,.0f} rows/s "
          f"({_per_record_us(elapsed, len(txns))})")

    asyncio.run(_online(txns[: args.online_n], labels, args.batch, 12))
    # Live-like: the same records restamped 1/rate apart (5,000/s), small batches per partition
    # (what a 2 ms linger gives at that rate): batches span milliseconds of event time.
    start = txns[0].event_time
    live = [replace(t, event_time=start + i / args.live_rate) for i, t in enumerate(txns[: args.online_n])]
    print(f"live-like ({args.live_rate:,.0f}/s of event time, batches of <= {args.live_batch}):", end=" ")
    asyncio.run(_online(live, [], args.live_batch, 12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
