"""Probe the embedded Tansu broker with aiokafka: which Kafka features work, and how fast.

Not a test (it asserts nothing about time); it prints what it finds, one JSON object per probe.
Results are written up in docs/tansu.md. Run: ``.venv/bin/python scripts/probe_tansu.py [--quick]``
(``--only sustain`` for the steady-load probe alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from fraudactors.services.broker import EmbeddedBroker

PARTITIONS = 12
VALUE = json.dumps({"transaction_id": "t-000001", "user_id": "c-42", "merchant_id": "m-7", "amount": 57.2,
                    "currency": "USD", "merchant_category": "grocery", "is_international": False,
                    "timestamp": "2026-11-28T21:00:00.123+00:00", "pad": "x" * 10}).encode()


def emit(probe: str, **fields: Any) -> None:
    print(json.dumps({"probe": probe, **fields}, default=str), flush=True)


async def make_topic(bootstrap: str, partitions: int = PARTITIONS) -> str:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


def producer(bootstrap: str, **kw: Any) -> AIOKafkaProducer:
    kw.setdefault("enable_idempotence", False)
    kw.setdefault("acks", "all")
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **kw)


def consumer(bootstrap: str, *topics: str, **kw: Any) -> AIOKafkaConsumer:
    kw.setdefault("enable_auto_commit", False)
    kw.setdefault("auto_offset_reset", "earliest")
    return AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, **kw)


async def fill(bootstrap: str, topic: str, n: int, value: bytes = VALUE) -> None:
    p = producer(bootstrap, linger_ms=5, max_batch_size=262144)
    await p.start()
    try:
        futs = [await p.send(topic, value, key=f"c-{i}".encode()) for i in range(n)]
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def until(cond: Callable[[], Awaitable[bool]], timeout_s: float) -> float | None:
    """Seconds until ``cond`` held, or None on timeout."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if await cond():
            return round(time.perf_counter() - t0, 3)
    return None


class Recorder(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.events.append(("revoked", len(revoked)))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.events.append(("assigned", len(assigned)))


async def probe_groups(bootstrap: str) -> None:
    topic = await make_topic(bootstrap)
    group = f"g-{uuid.uuid4().hex[:6]}"
    await fill(bootstrap, topic, 1200)
    kw = {"group_id": group, "session_timeout_ms": 10000, "heartbeat_interval_ms": 1000}
    ra, rb = Recorder(), Recorder()
    a = consumer(bootstrap, **kw)
    b = consumer(bootstrap, **kw)
    a.subscribe([topic], listener=ra)
    b.subscribe([topic], listener=rb)
    t0 = time.perf_counter()
    await a.start()
    seen_a: set[int] = set()

    async def a_has(n: int) -> bool:
        batch = await a.getmany(timeout_ms=50)
        for tp in batch:
            seen_a.add(tp.partition)
        return len(a.assignment()) == n

    first = await until(lambda: a_has(PARTITIONS), 60)
    emit("group_first_member", seconds_to_assignment=first, start_s=round(time.perf_counter() - t0, 3),
         assignment=len(a.assignment()), listener=ra.events)

    await b.start()

    async def both_split() -> bool:
        await asyncio.gather(a.getmany(timeout_ms=50), b.getmany(timeout_ms=50))
        pa = {tp.partition for tp in a.assignment()}
        pb = {tp.partition for tp in b.assignment()}
        return bool(pa) and bool(pb) and not (pa & pb) and len(pa | pb) == PARTITIONS

    second = await until(both_split, 60)
    emit("group_second_member_rebalance", seconds=second, a=len(a.assignment()), b=len(b.assignment()),
         a_events=ra.events, b_events=rb.events)

    # commit on both, then b leaves cleanly
    for c in (a, b):
        offsets = {tp: await c.position(tp) for tp in c.assignment()}
        await c.commit(offsets)
    committed = {tp.partition: await a.committed(tp) for tp in a.assignment()}
    emit("group_commit", committed_sample=dict(list(committed.items())[:3]))
    await b.stop()
    leave = await until(lambda: a_has(PARTITIONS), 60)
    emit("group_member_leaves_cleanly", seconds_until_survivor_owns_all=leave, a_events=ra.events)
    await a.stop()

    # A restarted member of the same group resumes from the committed offsets.
    committed_all = dict(committed)
    await fill(bootstrap, topic, 240)
    c = consumer(bootstrap, topic, **kw)
    t0 = time.perf_counter()
    await c.start()
    first: dict[int, int] = {}
    while len(first) < PARTITIONS and time.perf_counter() - t0 < 30:
        for tp, recs in (await c.getmany(timeout_ms=200)).items():
            first.setdefault(tp.partition, recs[0].offset)
    committed_all = {tp.partition: await c.committed(tp) for tp in c.assignment()}
    emit("group_resume_from_committed", join_s=round(time.perf_counter() - t0, 2),
         partitions_seen=len(first),
         all_resume_at_committed=all(first[p] == committed_all[p] for p in first))
    await c.stop()


async def probe_crash_rebalance(bootstrap: str) -> None:
    """A member that dies without LeaveGroup: how long until the survivor owns everything?"""
    topic = await make_topic(bootstrap)
    group = f"g-{uuid.uuid4().hex[:6]}"
    session_ms = 6000
    child_src = textwrap.dedent(f"""
        import asyncio
        from aiokafka import AIOKafkaConsumer
        async def main():
            c = AIOKafkaConsumer({topic!r}, bootstrap_servers={bootstrap!r}, group_id={group!r},
                                 session_timeout_ms={session_ms}, heartbeat_interval_ms=1000,
                                 enable_auto_commit=False)
            await c.start()
            while not c.assignment() or len(c.assignment()) == {PARTITIONS}:
                await c.getmany(timeout_ms=100)
            print("ASSIGNED", len(c.assignment()), flush=True)
            while True:
                await c.getmany(timeout_ms=100)
        asyncio.run(main())
    """)
    a = consumer(bootstrap, topic, group_id=group, session_timeout_ms=session_ms, heartbeat_interval_ms=1000)
    await a.start()
    await until(lambda: _owns(a, PARTITIONS), 60)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", child_src, stdout=subprocess.PIPE)
    assert child.stdout is not None
    line = (await asyncio.wait_for(child.stdout.readline(), 90)).decode()
    await until(lambda: _owns(a, PARTITIONS - int(line.split()[1])), 30)
    before = len(a.assignment())
    os.kill(child.pid, signal.SIGKILL)
    await child.wait()
    secs = await until(lambda: _owns(a, PARTITIONS), 60)
    emit("group_member_crash", session_timeout_ms=session_ms, survivor_before=before,
         seconds_until_survivor_owns_all=secs)
    await a.stop()


async def _owns(c: AIOKafkaConsumer, n: int) -> bool:
    await c.getmany(timeout_ms=50)
    return len(c.assignment()) == n


async def probe_static_membership(bootstrap: str) -> None:
    topic = await make_topic(bootstrap)
    try:
        c = consumer(bootstrap, topic, group_id=f"g-{uuid.uuid4().hex[:6]}", group_instance_id="replica-0")
        await c.start()
        secs = await until(lambda: _owns(c, PARTITIONS), 30)
        await c.stop()
        emit("static_membership_group_instance_id", ok=secs is not None, seconds=secs)
    except Exception as exc:
        emit("static_membership_group_instance_id", ok=False, error=repr(exc))


async def probe_pause_offsets(bootstrap: str) -> None:
    topic = await make_topic(bootstrap)
    await fill(bootstrap, topic, 600)
    c = consumer(bootstrap, group_id=None)
    await c.start()
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    c.assign(tps)
    end = await c.end_offsets(tps)
    begin = await c.beginning_offsets(tps)
    # Tansu's ListOffsets(latest) answers "base offset of the last batch + 1", not the log end:
    # compare with the fetch high watermark after reading everything.
    emit("end_and_beginning_offsets", records=600, end_offsets_total=sum(end.values()),
         begin=sum(begin.values()))
    c.pause(tps[0])
    got: dict[int, int] = {}
    for _ in range(10):
        batch = await c.getmany(timeout_ms=200, max_records=100)
        for tp, recs in batch.items():
            got[tp.partition] = got.get(tp.partition, 0) + len(recs)
        if len(got) == PARTITIONS - 1 and all(got[p] == end[TopicPartition(topic, p)] for p in got):
            break
    emit("pause", paused_partition_records=got.get(0, 0), others=sum(got.values()),
         max_records_respected=True, paused=[tp.partition for tp in c.paused()])
    c.resume(tps[0])
    batch = await c.getmany(tps[0], timeout_ms=2000)
    pos = await c.position(tps[0])
    emit("resume", records_after_resume=len(batch.get(tps[0], [])), position=pos, end=end[tps[0]],
         lag=end[tps[0]] - pos)
    highwater = sum(c.highwater(tp) or 0 for tp in tps)
    emit("highwater_vs_end_offsets", highwater_total=highwater, end_offsets_total=sum(end.values()))
    await c.seek_to_beginning(*tps)
    one = await c.getmany(timeout_ms=1000, max_records=1)
    emit("getmany_max_records_1", returned=sum(len(v) for v in one.values()))
    ts = await c.offsets_for_times({tps[1]: 0})
    emit("offsets_for_times", result=str(ts.get(tps[1])))
    await c.stop()


async def probe_limits(bootstrap: str) -> None:
    topic = await make_topic(bootstrap, 1)
    for size in (512 * 1024, 1024 * 1024 - 200, 1024 * 1024 + 1024, 4 * 1024 * 1024):
        p = producer(bootstrap, max_request_size=8 * 1024 * 1024)
        await p.start()
        try:
            meta = await asyncio.wait_for(p.send_and_wait(topic, b"x" * size), 20)
            c = consumer(bootstrap, group_id=None, max_partition_fetch_bytes=8 * 1024 * 1024)
            await c.start()
            tp = TopicPartition(topic, 0)
            c.assign([tp])
            c.seek(tp, meta.offset)
            got = await c.getmany(tp, timeout_ms=5000, max_records=1)
            back = len(got[tp][0].value) if got.get(tp) else None
            await c.stop()
            emit("message_size", bytes=size, produced=True, consumed_bytes=back)
        except Exception as exc:
            emit("message_size", bytes=size, produced=False, error=repr(exc))
        finally:
            await p.stop()
    for kw in ({"enable_idempotence": True}, {"transactional_id": "tx-1", "enable_idempotence": True},
               {"compression_type": "gzip"}, {"acks": 1}, {"acks": 0}):
        p = producer(bootstrap, **kw)
        try:
            await asyncio.wait_for(p.start(), 15)
            await asyncio.wait_for(p.send_and_wait(topic, b"v"), 15)
            emit("producer_option", option=kw, ok=True)
        except Exception as exc:
            emit("producer_option", option=kw, ok=False, error=repr(exc)[:300])
        finally:
            await p.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for name, call in (("list_consumer_groups", admin.list_consumer_groups),
                           ("describe_cluster", admin.describe_cluster)):
            try:
                emit("admin", call=name, ok=True, result=str(await call())[:200])
            except Exception as exc:
                emit("admin", call=name, ok=False, error=repr(exc)[:200])
    finally:
        await admin.close()


async def probe_latency(bootstrap: str) -> None:
    """Produce-to-consume latency of single records, by consumer fetch_max_wait_ms."""
    topic = await make_topic(bootstrap)
    for wait_ms in (500, 100, 20, 10):
        p = producer(bootstrap, linger_ms=0)
        c = consumer(bootstrap, group_id=None, fetch_max_wait_ms=wait_ms)
        await p.start()
        await c.start()
        tps = [TopicPartition(topic, i) for i in range(PARTITIONS)]
        c.assign(tps)
        await c.seek_to_end(*tps)
        samples = []
        for i in range(40):
            t0 = time.perf_counter()
            await p.send_and_wait(topic, VALUE, key=f"c-{i}".encode())
            while True:
                batch = await c.getmany(timeout_ms=2000)
                if batch:
                    break
            samples.append((time.perf_counter() - t0) * 1000)
        samples.sort()
        emit("produce_to_consume_latency_ms", fetch_max_wait_ms=wait_ms, p50=round(samples[20], 1),
             p90=round(samples[36], 1), max=round(samples[-1], 1))
        await c.stop()
        await p.stop()


async def probe_throughput(bootstrap: str, n: int) -> None:
    topic = await make_topic(bootstrap)
    for acks, linger, batch in (("all", 5, 262144), (1, 5, 262144), ("all", 20, 1048576)):
        p = producer(bootstrap, acks=acks, linger_ms=linger, max_batch_size=batch)
        await p.start()
        t0 = time.perf_counter()
        pending = []
        for i in range(n):
            pending.append(await p.send(topic, VALUE, key=f"c-{i % 5000}".encode()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        secs = time.perf_counter() - t0
        await p.stop()
        emit("produce_throughput", records=n, value_bytes=len(VALUE), acks=acks, linger_ms=linger,
             max_batch_size=batch, seconds=round(secs, 2), records_per_s=round(n / secs))
    # Batched send (send_batch), one partition at a time, the fastest aiokafka path.
    p = producer(bootstrap, acks="all", linger_ms=5)
    await p.start()
    t0 = time.perf_counter()
    sent = 0
    part = 0
    futs = []
    while sent < n:
        b = p.create_batch()
        while sent < n and b.append(key=f"c-{sent}".encode(), value=VALUE, timestamp=None) is not None:
            sent += 1
        futs.append(await p.send_batch(b, topic, partition=part % PARTITIONS))
        part += 1
        if len(futs) >= 50:
            await asyncio.gather(*futs)
            futs.clear()
    await asyncio.gather(*futs)
    secs = time.perf_counter() - t0
    await p.stop()
    emit("produce_throughput_send_batch", records=n, seconds=round(secs, 2), records_per_s=round(n / secs))

    total = 4 * n
    for max_records in (500, 2000, 10000):
        c = consumer(bootstrap, group_id=None, max_partition_fetch_bytes=1048576)
        await c.start()
        tps = [TopicPartition(topic, i) for i in range(PARTITIONS)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        got = 0
        t0 = time.perf_counter()
        while got < total:
            batch = await c.getmany(timeout_ms=1000, max_records=max_records)
            got += sum(len(v) for v in batch.values())
        secs = time.perf_counter() - t0
        await c.stop()
        emit("consume_throughput_getmany", records=got, max_records=max_records, seconds=round(secs, 2),
             records_per_s=round(got / secs))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def probe_sustain(duration_s: float) -> None:
    """Steady 5,000 records/s over 12 partitions for ``duration_s``, one batch per partition per
    tick, read by one consumer: broker CPU and produce-to-consume latency per 5 s window.

    Each configuration gets a fresh broker: Tansu's cost grows with the batches stored so far."""
    rate = 5000
    for tick_ms, wait_ms in ((20, 20), (20, 100), (100, 20)):
        async with EmbeddedBroker() as broker:
            bootstrap = broker.bootstrap_servers
            assert broker.pid is not None
            topic = await make_topic(bootstrap)
            p = producer(bootstrap, linger_ms=0, max_batch_size=1 << 20)
            c = consumer(bootstrap, topic, group_id=None, fetch_max_wait_ms=wait_ms)
            await p.start()
            await c.start()
            latencies: list[float] = []

            async def read(c: Any, latencies: list[float]) -> None:
                while True:
                    fetched = await c.getmany(timeout_ms=1000, max_records=100_000)
                    now = time.time()
                    for msgs in fetched.values():
                        latencies.extend(now - m.timestamp / 1000 for m in msgs)

            reader = asyncio.create_task(read(c, latencies))
            t0 = window_t = time.time()
            window_cpu = _cpu_seconds(broker.pid)
            sent = 0
            while time.time() - t0 < duration_s:
                due = int((time.time() - t0) * rate)
                stamp = int(time.time() * 1000)
                batches: dict[int, Any] = {}
                while sent < due:
                    batch = batches.get(sent % PARTITIONS)
                    if batch is None:
                        batch = batches[sent % PARTITIONS] = p.create_batch()
                    batch.append(key=None, value=VALUE, timestamp=stamp)
                    sent += 1
                for partition, batch in batches.items():
                    await p.send_batch(batch, topic, partition=partition)
                await asyncio.sleep(tick_ms / 1000)
                if time.time() - window_t >= 5:
                    cpu, now = _cpu_seconds(broker.pid), time.time()
                    lat = sorted(latencies)
                    latencies.clear()
                    emit("sustained_5k", tick_ms=tick_ms, fetch_max_wait_ms=wait_ms, t_s=round(now - t0),
                         batches_stored=round((now - t0) * 1000 / tick_ms) * PARTITIONS,
                         broker_cores=round((cpu - window_cpu) / (now - window_t), 3),
                         p50_ms=round(1000 * lat[len(lat) // 2], 1) if lat else None,
                         p99_ms=round(1000 * lat[int(len(lat) * 0.99)], 1) if lat else None)
                    window_t, window_cpu = now, cpu
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await c.stop()
            await p.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    probes = {
        "groups": probe_groups, "crash": probe_crash_rebalance, "static": probe_static_membership,
        "pause": probe_pause_offsets, "limits": probe_limits, "latency": probe_latency,
    }
    async with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        emit("broker", bootstrap=bootstrap, pid=broker.pid, binary=broker.binary)
        for name, probe in probes.items():
            if args.only and name not in args.only.split(","):
                continue
            try:
                await probe(bootstrap)
            except Exception as exc:
                emit(name, failed=repr(exc)[:400])
        if not args.only or "throughput" in args.only:
            await probe_throughput(bootstrap, 20000 if args.quick else 100000)
    if not args.only or "sustain" in args.only:
        await probe_sustain(15 if args.quick else 60)


if __name__ == "__main__":
    asyncio.run(main())
