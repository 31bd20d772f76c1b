"""The null pipeline: consume -> decode -> encode -> produce -> commit, with no features and no model.

It is the engine's skeleton with the work taken out, so the drain benchmark can say how much of the
engine's cost is Kafka plumbing and how much is features and inference (ratio engine / null). The
tests also use it as a stand-in engine ("responder") that can answer late, twice, or not at all.

Run alone (the benchmark does, so it gets its own process like the engine):
``python -m loadgen.nullpipe`` — configured like ``fraudactors run`` (settings + FRAUDACTORS_* env),
stops on SIGTERM/SIGINT after committing what it has produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass
from typing import Any

import orjson

from fraudactors.settings import Settings


@dataclass(frozen=True)
class NullOptions:
    group_id: str | None = None  # default: settings.kafka.group_id + "-null"
    output_topic: str | None = None  # default: settings.topics.predictions
    # Test knobs: hold every fetched batch this long before answering; answer every n-th twice;
    # never answer every n-th; dead-letter every n-th (its bytes to the DLQ topic; 0 = off).
    hold_s: float = 0.0
    duplicate_every: int = 0
    drop_every: int = 0
    dead_letter_every: int = 0
    fetch_max_records: int = 0  # 0: kafka.fetch_max_records, as the engine fetches
    fetch_max_wait_ms: int = 0  # 0: kafka.fetch_max_wait_ms


class NullPipeline:
    def __init__(self, settings: Settings, options: NullOptions | None = None) -> None:
        self.settings = settings
        self.options = options or NullOptions()
        self.processed = 0
        self.produced = 0
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        from fraudactors.services.kafka import make_consumer, make_producer

        s, o = self.settings, self.options
        out_topic = o.output_topic or s.topics.predictions
        fetch = o.fetch_max_records or s.kafka.fetch_max_records
        consumer = make_consumer(s, s.topics.transactions, group_id=o.group_id or f"{s.kafka.group_id}-null",
                                 auto_offset_reset="earliest", max_poll_records=fetch,
                                 fetch_max_wait_ms=o.fetch_max_wait_ms or s.kafka.fetch_max_wait_ms)
        producer = make_producer(s)
        await consumer.start()
        try:
            await producer.start()
            try:
                await self._loop(consumer, producer, out_topic, fetch)
            finally:
                await asyncio.shield(producer.stop())
        finally:
            await asyncio.shield(consumer.stop())

    async def _loop(self, consumer: Any, producer: Any, out_topic: str, fetch_max: int) -> None:
        from fraudactors.engine.publisher import KeyPartitioner

        o = self.options
        partitioner = KeyPartitioner()
        partitions: list[int] | None = None
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                fetch = asyncio.ensure_future(consumer.getmany(timeout_ms=200, max_records=fetch_max))
                await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    break
                batches = fetch.result()
                if consumer.assignment():
                    self.ready.set()
                if not batches:
                    continue
                if o.hold_s > 0:
                    await asyncio.sleep(o.hold_s)
                futures: list[Any] = []
                outs: dict[int, list[tuple[bytes | None, bytes]]] = {}  # output partition -> records
                for records in batches.values():
                    for record in records:
                        self.processed += 1
                        n = self.processed
                        if o.drop_every and n % o.drop_every == 0:
                            continue
                        if o.dead_letter_every and n % o.dead_letter_every == 0:
                            futures.append(await producer.send(self.settings.topics.dlq, value=record.value,
                                                               key=record.key))
                            self.produced += 1
                            continue
                        out = decide(record.value, record.timestamp)
                        if out is None:
                            continue
                        if partitions is None:
                            partitions = sorted(await producer.partitions_for(out_topic))
                        p = partitioner(record.key, partitions, partitions)
                        copies = 2 if o.duplicate_every and n % o.duplicate_every == 0 else 1
                        outs.setdefault(p, []).extend([(record.key, out)] * copies)
                # As the engine's publisher produces: one record batch per output partition, sent
                # without an await per record.
                for p, items in outs.items():
                    batch = producer.create_batch()
                    for key, value in items:
                        if batch.append(key=key, value=value, timestamp=None) is None:  # full
                            futures.append(await producer.send_batch(batch, out_topic, partition=p))
                            batch = producer.create_batch()
                            batch.append(key=key, value=value, timestamp=None)
                    futures.append(await producer.send_batch(batch, out_topic, partition=p))
                    self.produced += len(items)
                await asyncio.gather(*futures)
                # Commit only what is acknowledged (the engine's rule, minus the per-partition tracking).
                await consumer.commit()
        finally:
            stop_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop_wait


def decide(value: bytes | None, arrival_ms: int) -> bytes | None:
    """Decode a transaction and encode a decision-shaped record, with no features and no model."""
    try:
        txn = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(txn, dict) or "transaction_id" not in txn:
        return None
    amount = txn.get("amount")
    prob = 0.9 if isinstance(amount, int | float) and amount > 1000 else 0.01
    now = time.time()
    return orjson.dumps({
        "transaction_id": txn["transaction_id"], "user_id": txn.get("user_id"), "is_fraud": prob > 0.5,
        "fraud_probability": prob, "decision": "decline" if prob > 0.5 else "approve", "model_version": "null",
        "variant": "A", "reasons": [], "degraded": False, "event_time": txn.get("timestamp"),
        "decided_at": now, "latency_ms": max(now * 1000.0 - arrival_ms, 0.0),
    })


async def _main() -> None:
    from fraudactors.settings import load_settings

    settings = load_settings()
    pipeline = NullPipeline(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pipeline.stop)
    task = asyncio.create_task(pipeline.run())
    ready = asyncio.create_task(pipeline.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        print("null_ready", flush=True)
    else:
        ready.cancel()
    await task


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(_main())
    except ImportError:  # pragma: no cover
        asyncio.run(_main())
