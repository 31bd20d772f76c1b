"""``fraudactors bench state``: does the online state stay bounded as decisions pile up?

Streams the simulator's transactions (and their delayed fraud labels) over a fixed population
through the real state path -- ``OnlineFeatureStore.compute`` per micro-batch with a partition
and offset per record, the fencing claim per partition, commits trailing one batch behind (the
replay log is trimmed to them), ``apply_labels`` as labels come due, and the ``OutcomeRecorder``
remembering what each variant said -- into an embedded Redis. After N and after 2N transactions
it prints Redis ``used_memory``, the number of keys and the bytes and keys per active user and
merchant. Once the population is warm (N covers more than the 30-day history), going from N to
2N must grow memory by well under 10 %: state grows with users, merchants and labels, not with
decisions. A benchmark, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

_BATCH = 256


async def state_bench(records: int, users: int, merchants: int, partitions: int, seed: int,
                      redis_cluster: int = 0) -> dict[str, Any]:
    from fraudactors.engine.inference import Scored, ShadowScore
    from fraudactors.engine.labels import OutcomeRecorder
    from fraudactors.engine.metrics import EngineMetrics
    from fraudactors.features.schema import label_from_obj, transaction_from_obj
    from fraudactors.features.store import OnlineFeatureStore
    from fraudactors.services.redis import EmbeddedRedis
    from fraudactors.services.redis_cluster import EmbeddedRedisCluster
    from fraudactors.settings import load_settings
    from fraudactors.sim.simulator import LabelEvent, Simulator

    server: EmbeddedRedis | EmbeddedRedisCluster = (EmbeddedRedisCluster(redis_cluster) if redis_cluster
                                                    else EmbeddedRedis())
    async with server:
        redis_settings: dict[str, Any] = {"url": server.url, "key_prefix": "fa:"}
        if isinstance(server, EmbeddedRedisCluster):
            redis_settings.update(cluster=True, cluster_nodes=server.startup_nodes)
        settings = load_settings(env={}, overrides={"redis": redis_settings})
        store = OnlineFeatureStore(settings)
        await store.open()
        recorder = OutcomeRecorder(settings, EngineMetrics())
        outcomes_client = recorder.connect()
        nodes = ([n.url for n in server.nodes] if isinstance(server, EmbeddedRedisCluster) else [server.url])

        async def memory_and_keys() -> tuple[int, int]:
            """used_memory and keys summed over every node."""
            import redis.asyncio as aioredis

            used = keys = 0
            for url in nodes:
                node = aioredis.Redis.from_url(url)
                try:
                    used += int((await node.info("memory"))["used_memory"])
                    keys += int(await node.dbsize())
                finally:
                    await node.aclose()
            return used, keys

        baseline, _ = await memory_and_keys()
        for p in range(partitions):
            await store.claim(p)
        sim = Simulator(seed=seed, n_users=users, n_merchants=merchants, days=None)
        next_offset = dict.fromkeys(range(partitions), 0)
        seen_users: set[str] = set()
        seen_merchants: set[str] = set()
        batch: list[Any] = []
        parts: list[int] = []
        offsets: list[int] = []
        labels: list[Any] = []
        done = 0
        checkpoints = (records, 2 * records)
        rows: list[dict[str, Any]] = []
        started = time.perf_counter()
        first_time = last_time = 0.0

        async def flush() -> None:
            if labels:
                await store.apply_labels(labels)
                labels.clear()
            if batch:
                await store.compute(batch, parts, offsets)
                recorder.record(batch, [Scored("A", "v1", 0.1, "approve", False, [],
                                              (ShadowScore("S", "v2", 0.2, "approve", False),))] * len(batch))
                await recorder.flush()
                for p in set(parts):  # the commit trails one batch behind
                    store.note_committed(p, min(o for q, o in zip(parts, offsets, strict=True) if q == p))
                batch.clear()
                parts.clear()
                offsets.clear()

        for event in sim.events():
            if isinstance(event, LabelEvent):
                labels.append(label_from_obj(event.label))
                continue
            txn = transaction_from_obj(event.txn)
            p = zlib.crc32(txn.user_id.encode()) % partitions
            batch.append(txn)
            parts.append(p)
            offsets.append(next_offset[p])
            next_offset[p] += 1
            seen_users.add(txn.user_id)
            seen_merchants.add(txn.merchant_id)
            if not first_time:
                first_time = txn.event_time
            last_time = txn.event_time
            done += 1
            if len(batch) >= _BATCH or done in checkpoints:
                await flush()
            if done in checkpoints:
                used, keys = await memory_and_keys()
                used -= baseline
                rows.append({"transactions": done, "event_days": round((last_time - first_time) / 86400, 1),
                             "used_memory": used, "keys": keys, "active_users": len(seen_users),
                             "active_merchants": len(seen_merchants),
                             "bytes_per_entity": round(used / (len(seen_users) + len(seen_merchants)), 1),
                             "keys_per_entity": round(keys / (len(seen_users) + len(seen_merchants)), 3)})
                if done == checkpoints[-1]:
                    break
        await store.close()
        await outcomes_client.aclose()
    first, second = rows
    growth = (second["used_memory"] - first["used_memory"]) / first["used_memory"]
    return {"records": records, "users": users, "merchants": merchants, "partitions": partitions,
            "seed": seed, "redis_cluster": redis_cluster, "checkpoints": rows, "memory_growth_n_to_2n": round(growth, 4),
            "seconds": round(time.perf_counter() - started, 1)}


def print_state(result: dict[str, Any]) -> None:
    where = f"{result['redis_cluster']}-master cluster" if result["redis_cluster"] else "one Redis"
    print(f"state bench: {result['users']} users, {result['merchants']} merchants, "
          f"{result['partitions']} partitions, seed {result['seed']}, {where} ({result['seconds']} s)")
    print(f"{'transactions':>12} {'event days':>10} {'used_memory':>12} {'keys':>7} {'users':>6} "
          f"{'merchants':>9} {'bytes/entity':>12} {'keys/entity':>11}")
    for r in result["checkpoints"]:
        print(f"{r['transactions']:>12,} {r['event_days']:>10} {r['used_memory']:>12,} {r['keys']:>7,} "
              f"{r['active_users']:>6,} {r['active_merchants']:>9,} {r['bytes_per_entity']:>12,} "
              f"{r['keys_per_entity']:>11}")
    print(f"memory growth from N to 2N: {100 * result['memory_growth_n_to_2n']:+.1f} %")
