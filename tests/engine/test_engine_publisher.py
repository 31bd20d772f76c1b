"""The publisher against the real broker: one future per batch, resolved on acknowledgement."""

from __future__ import annotations

import asyncio

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
