"""A real end-to-end check of a broker and a Redis server: what ``fraudactors demo`` runs until
the engine is plugged in, and a quick way to prove a configured deployment works.

Creates the four topics, streams synthetic SPEC §2 transactions (keyed by ``user_id``, so they
spread over all partitions) into the transactions topic at a fixed arrival rate, reads every one
back, measures produce-to-consume latency from each record's *scheduled* send time, and writes
and reads Redis keys under ``redis.key_prefix``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fraudactors.logging import get_logger
from fraudactors.services.kafka import create_topics, make_consumer, make_producer, topic_names
from fraudactors.settings import Settings

log = get_logger(component="services_check")

_TICK_S = 0.005
_DRAIN_S = 15.0


@dataclass
class CheckResult:
    report: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))], 3)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "p999": at(0.999), "max": round(ordered[-1], 3)}


def _transaction(i: int, run: str) -> bytes:
    return orjson.dumps({
        "transaction_id": f"{run}-{i:08d}", "user_id": f"c-{i % 5000}", "merchant_id": f"m-{i % 300}",
        "amount": round(5.0 + (i * 7919 % 20000) / 100.0, 2), "currency": "USD",
        "merchant_category": ("grocery", "travel", "electronics", "fuel")[i % 4],
        "is_international": i % 17 == 0, "timestamp": time.time(),
    })


async def services_check(settings: Settings, *, rate: float, duration_s: float,
                         say: Callable[..., None] = print) -> CheckResult:
    import redis.asyncio as aioredis
    from aiokafka import TopicPartition

    created = await create_topics(settings)
    names = topic_names(settings)
    say(f"topics: {', '.join(names)} ({settings.topics.partitions} partitions each; created {len(created)})")

    redis = aioredis.Redis.from_url(settings.redis.url, socket_timeout=5.0)
    run = uuid.uuid4().hex[:8]
    probe_key = f"{settings.redis.key_prefix}demo:{run}:probe"
    try:
        await redis.set(probe_key, run, ex=3600)
        redis_ok = (await redis.get(probe_key)) == run.encode()
        say(f"redis: SET/GET {probe_key} {'ok' if redis_ok else 'MISMATCH'}")

        topic = settings.topics.transactions
        total = max(1, int(rate * duration_s))
        producer = make_producer(settings)
        consumer = make_consumer(settings, group_id=None)
        await producer.start()
        try:
            await consumer.start()
            try:
                partitions = sorted(consumer.partitions_for_topic(topic) or ())
                tps = [TopicPartition(topic, p) for p in partitions]
                consumer.assign(tps)
                await consumer.seek_to_end(*tps)  # only this run's records
                say(f"streaming {total} transactions into {topic} at {rate:g}/s over {len(tps)} partitions")
                stream = _Stream(total, rate)
                started = time.perf_counter()
                async with asyncio.TaskGroup() as tasks:  # one failing cancels the other
                    tasks.create_task(stream.send(producer, topic, run))
                    tasks.create_task(stream.receive(consumer, run, say, started))
                elapsed = time.perf_counter() - started
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

        counter_key = f"{settings.redis.key_prefix}demo:{run}:received"
        await redis.incrby(counter_key, len(stream.seen))
        await redis.expire(counter_key, 3600)
        counted = int(await redis.get(counter_key) or 0)
        redis_ok = redis_ok and counted == len(stream.seen)
        say(f"redis: INCRBY/GET {counter_key} = {counted}")
    finally:
        await redis.aclose()

    lost = stream.sent - len(stream.seen)
    report: dict[str, Any] = {
        "stage": "services-check",
        "target_tps": rate, "duration_s": duration_s,
        "sent": stream.sent, "received": len(stream.seen), "lost": lost, "duplicates": stream.duplicates,
        "achieved_tps": round(stream.sent / stream.send_elapsed, 1) if stream.send_elapsed > 0 else 0.0,
        "produce_to_consume_latency_ms": _percentiles(stream.latencies_ms),
        "partitions": settings.topics.partitions, "redis_ok": redis_ok, "elapsed_s": round(elapsed, 3),
    }
    ok = lost == 0 and stream.duplicates == 0 and redis_ok
    say(f"summary: sent {stream.sent}, received {len(stream.seen)}, lost {lost}, duplicates "
        f"{stream.duplicates}, latency p50 {report['produce_to_consume_latency_ms'].get('p50')} ms "
        f"p99 {report['produce_to_consume_latency_ms'].get('p99')} ms -> {'OK' if ok else 'FAILED'}")
    log.info("services_check_done", **{k: v for k, v in report.items() if not isinstance(v, dict)})
    return CheckResult(report=report, ok=ok)


class _Stream:
    """Open-loop sender and the reader that checks every record came back once."""

    def __init__(self, total: int, rate: float) -> None:
        self.total = total
        self.rate = rate
        self.sent = 0
        self.send_elapsed = 0.0
        self.sending = True
        self.seen: set[bytes] = set()
        self.duplicates = 0
        self.latencies_ms: list[float] = []
        self._t0 = 0.0

    async def send(self, producer: Any, topic: str, run: str) -> None:
        self._t0 = t0 = time.perf_counter()
        try:
            pending: list[asyncio.Future[Any]] = []
            while self.sent < self.total:
                due = min(self.total, int((time.perf_counter() - t0) * self.rate) + 1)
                while self.sent < due:
                    i = self.sent
                    value = _transaction(i, run)
                    fut = await producer.send(topic, value=value, key=f"c-{i % 5000}".encode(),
                                              headers=[("n", str(i).encode())])
                    pending.append(fut)
                    self.sent += 1
                if len(pending) > 1000:
                    await asyncio.gather(*pending)
                    pending.clear()
                next_due = t0 + (self.sent / self.rate)
                await asyncio.sleep(max(0.0, min(_TICK_S, next_due - time.perf_counter())))
            await asyncio.gather(*pending)
            self.send_elapsed = time.perf_counter() - t0
        finally:
            self.sending = False

    async def receive(self, consumer: Any, run: str, say: Callable[..., None], started: float) -> None:
        last_progress = started
        drain_deadline: float | None = None
        while True:
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    n = int(dict(record.headers).get("n", b"-1"))
                    tid = orjson.loads(record.value)["transaction_id"].encode()
                    if not tid.startswith(run.encode()):
                        continue
                    if tid in self.seen:
                        self.duplicates += 1
                        continue
                    self.seen.add(tid)
                    scheduled = self._t0 + n / self.rate
                    self.latencies_ms.append((now - scheduled) * 1000.0)
            if now - last_progress >= 1.0:
                last_progress = now
                say(f"  {now - started:5.1f}s  sent {self.sent:>8}  received {len(self.seen):>8}")
            if not self.sending:
                if len(self.seen) >= self.sent:
                    return
                drain_deadline = drain_deadline or now + _DRAIN_S
                if now >= drain_deadline:
                    log.warning("services_check_drain_timeout", sent=self.sent, received=len(self.seen))
                    return
