"""The publisher against the real broker: one future per batch, resolved on acknowledgement."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from fraudactors.actors import IGNORED
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.publisher import Publisher
from fraudactors.services.kafka import make_consumer
from fraudactors.settings import Settings


async def test_batch_future_resolves_after_every_record_is_acknowledged(settings: Settings) -> None:
    publisher = Publisher(settings, EngineMetrics())
    task = asyncio.create_task(publisher.run(IGNORED))
    try:
        topic = settings.topics.predictions
        messages = [(topic, f"u{i}".encode(), f"v{i}".encode(), None) for i in range(300)]
        ack = await publisher.send_many(messages)
        async with asyncio.timeout(30):
            await ack
        empty = await publisher.send_many([])
        assert empty.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.topics.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = set()
        async with asyncio.timeout(30):
            while len(seen) < 300:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    seen.update(r.value for r in records)
        assert seen == {f"v{i}".encode() for i in range(300)}
    finally:
        await consumer.stop()


@pytest.mark.parametrize("linger_ms", [0, 2, 50])
async def test_records_land_on_the_keyed_partition_and_oversized_ones_still_go(settings: Settings,
                                                                               linger_ms: int) -> None:
    """Batches per partition put each record where a keyed send() would; a record larger than a
    whole batch takes the producer's own path; headers survive; a partition's order is kept."""
    from aiokafka.partitioner import DefaultPartitioner

    settings = settings.replace(kafka={"linger_ms": linger_ms})
    publisher = Publisher(settings, EngineMetrics())
    task = asyncio.create_task(publisher.run(IGNORED))
    topic = settings.topics.predictions
    big = b"x" * (settings.kafka.max_batch_size + 1000)
    messages = [(topic, f"user-{i}".encode(), f"v{i}".encode(), [("h", str(i).encode())]) for i in range(200)]
    messages.insert(50, (topic, b"user-big", big, None))
    try:
        ack = await publisher.send_many(messages)
        async with asyncio.timeout(30):
            await ack
        assert publisher.pending == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    partitions = list(range(settings.topics.partitions))
    expected = {key: DefaultPartitioner()(key, partitions, partitions) for _, key, _, _ in messages}
    consumer = make_consumer(settings, group_id=None, max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen: dict[bytes, tuple[int, bytes, list[tuple[str, bytes]]]] = {}
        offsets: dict[bytes, int] = {}
        async with asyncio.timeout(30):
            while len(seen) < len(messages):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        assert r.key is not None and r.value is not None
                        seen[r.key] = (r.partition, r.value, list(r.headers))
                        offsets[r.key] = r.offset
    finally:
        await consumer.stop()
    assert {key: part for key, (part, _, _) in seen.items()} == expected
    assert seen[b"user-big"][1] == big
    assert seen[b"user-7"][1:] == (b"v7", [("h", b"7")])
    # a partition's records keep the order they were given in
    by_partition: dict[int, list[bytes]] = {}
    for _, key, _, _ in messages:
        by_partition.setdefault(expected[key], []).append(key)
    for keys in by_partition.values():
        assert [offsets[k] for k in keys] == sorted(offsets[k] for k in keys)


async def test_micro_batches_within_the_linger_share_one_batch_per_partition(settings: Settings) -> None:
    """Records handed over within linger_ms of a partition's first one go out as one batch: the
    number of batches a partition gets per second is bounded whatever the load."""
    settings = settings.replace(kafka={"linger_ms": 200})
    publisher = Publisher(settings, EngineMetrics())
    task = asyncio.create_task(publisher.run(IGNORED))
    topic = settings.topics.predictions
    try:
        acks = [await publisher.send_many([(topic, b"same-user", f"v{i}".encode(), None)]) for i in range(5)]
        assert len(publisher._open) == 1
        (batch,) = publisher._open.values()
        assert batch.builder.record_count() == 5
        assert not any(ack.done() for ack in acks)
        async with asyncio.timeout(30):
            await asyncio.gather(*acks)
        assert publisher._open == {}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_open_batches_are_sent_when_the_publisher_stops(settings: Settings) -> None:
    settings = settings.replace(kafka={"linger_ms": 60_000})
    publisher = Publisher(settings, EngineMetrics())
    task = asyncio.create_task(publisher.run(IGNORED))
    topic = settings.topics.predictions
    ack = await publisher.send_many([(topic, f"u{i}".encode(), b"v", None) for i in range(20)])
    assert not ack.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    async with asyncio.timeout(30):
        await ack
