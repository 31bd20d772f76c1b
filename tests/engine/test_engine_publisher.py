"""The publisher against the real broker: one future per batch, resolved on acknowledgement."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from fraudactors.actors import IGNORED
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.publisher import KeyPartitioner, Publisher
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


def _key_on_another_partition(settings: Settings, key: bytes) -> bytes:
    from aiokafka.partitioner import DefaultPartitioner

    partitions = list(range(settings.topics.partitions))
    partitioner = DefaultPartitioner()
    home = partitioner(key, partitions, partitions)
    return next(k for k in (f"other-{i}".encode() for i in range(1000))
                if partitioner(k, partitions, partitions) != home)


async def test_a_full_window_makes_the_sender_wait_until_acknowledgements_free_it(settings: Settings) -> None:
    """At most engine.publish_window records per output partition are unacknowledged: a sender
    that would exceed it waits (the worker is held back), other partitions are not held back,
    and the acknowledgements let it in."""
    settings = settings.replace(kafka={"linger_ms": 60_000}, engine={"batch_max": 4, "publish_window": 8})
    metrics = EngineMetrics()
    publisher = Publisher(settings, metrics)
    task = asyncio.create_task(publisher.run(IGNORED))
    topic = settings.topics.predictions

    def records(key: bytes, n: int) -> list[tuple[str, bytes, bytes, None]]:
        return [(topic, key, f"v{i}".encode(), None) for i in range(n)]

    try:
        first = await publisher.send_many(records(b"same-user", 8))
        ((tp, depth),) = publisher.window().items()
        assert depth == 8
        assert metrics.registry.get_sample_value(
            "fraudactors_publish_window", {"topic": topic, "partition": str(tp[1])}) == 8
        held = asyncio.create_task(publisher.send_many(records(b"same-user", 1)))
        async with asyncio.timeout(10):
            while publisher.waiting == 0:  # noqa: ASYNC110 (the sender's state, no event to wait on)
                await asyncio.sleep(0.001)
        other = await asyncio.wait_for(
            publisher.send_many(records(_key_on_another_partition(settings, b"same-user"), 1)), 5)
        assert not held.done() and not first.done()
        publisher._seal(tp)  # send the open batch now rather than after the linger
        async with asyncio.timeout(30):
            await first
            second = await held
        assert publisher.window()[tp] == 1 and publisher.waiting == 0
        assert publisher.window_peak == 8
        publisher._seal(tp)
        publisher._seal(("", -1))  # unknown partitions: a no-op
        for key in list(publisher._open):
            publisher._seal(key)
        async with asyncio.timeout(30):
            await asyncio.gather(second, other)
        assert publisher.window() == {} and publisher.pending == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _refuse_batches_over(monkeypatch: pytest.MonkeyPatch, limit: int) -> int:
    """The producer's batches over ``limit`` bytes fail as Kafka fails them past a topic's
    max.message.bytes (MESSAGE_SIZE_TOO_LARGE); the embedded broker has no such limit."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import MessageSizeTooLargeError

    real_send_batch = AIOKafkaProducer.send_batch

    async def send_batch(self: AIOKafkaProducer, batch: Any, topic: str, *, partition: int) -> Any:
        if batch.size() > limit:
            refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            refused.set_exception(MessageSizeTooLargeError())
            return refused
        return await real_send_batch(self, batch, topic, partition=partition)

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", send_batch)
    return limit


async def test_a_dead_letter_the_broker_refuses_as_too_large_is_sent_without_its_value(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead letter the broker can never accept as is (over its message.max.bytes) goes again
    without its value, saying so in a header, so one poison record cannot stall its partition;
    the records around it are delivered as they are.

    The embedded broker has no size limit, so its refusal is the one stand-in here: batches over
    1 MiB fail as Kafka's default message.max.bytes would fail them (MESSAGE_SIZE_TOO_LARGE)."""
    limit = _refuse_batches_over(monkeypatch, 1024 * 1024)
    settings = settings.replace(kafka={"linger_ms": 0})
    metrics = EngineMetrics()
    publisher = Publisher(settings, metrics)
    task = asyncio.create_task(publisher.run(IGNORED))
    dlq, predictions = settings.topics.dlq, settings.topics.predictions
    huge = b"x" * (limit + 100)
    headers = [("error", b"value too large"), ("stage", b"parse")]
    try:
        ack = await publisher.send_many([(dlq, b"u-huge", huge, headers), (dlq, b"u-huge", b"small", None),
                                         (predictions, b"u-1", b"decided", None)])
        async with asyncio.timeout(30):
            await ack
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert metrics.registry.get_sample_value("fraudactors_publish_retries_total", {"topic": dlq}) == 1

    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in (dlq, predictions) for p in range(settings.topics.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        found: dict[str, list[Any]] = {dlq: [], predictions: []}
        async with asyncio.timeout(30):
            while len(found[dlq]) < 2 or not found[predictions]:
                for tp, recs in (await consumer.getmany(timeout_ms=500)).items():
                    found[tp.topic].extend(recs)
    finally:
        await consumer.stop()
    (small,) = [r for r in found[dlq] if r.value == b"small"]
    (dead,) = [r for r in found[dlq] if r is not small]
    assert dead.key == b"u-huge" and dead.value is None
    assert small.value == b"small" and "value_omitted" not in dict(small.headers)
    got = dict(dead.headers)
    assert got["error"] == b"value too large" and got["stage"] == b"parse", "the original headers stay"
    assert got["value_omitted"].startswith(str(len(huge)).encode() + b" bytes not accepted")
    assert [r.value for r in found[predictions]] == [b"decided"]


def test_the_partitioner_places_keys_as_kafka_does_and_remembers_only_short_ones() -> None:
    """The records' partitions are Kafka's default (murmur2) whether a key is remembered or not;
    dead letters keep any key their producer sent, and long ones are not held in memory."""
    from aiokafka.partitioner import DefaultPartitioner

    partitioner, reference = KeyPartitioner(), DefaultPartitioner()
    partitions = list(range(12))
    keys = [f"c-{i}".encode() for i in range(500)] + [bytes([i % 251]) * 2048 for i in range(200)]
    for key in keys * 2:
        assert partitioner(key, partitions, partitions) == reference(key, partitions, partitions)
    assert partitioner.cached_bytes == sum(len(f"c-{i}") for i in range(500))


def test_only_a_size_refusal_cuts_a_dead_letter_down_and_the_key_goes_only_after_the_value(
        settings: Settings) -> None:
    """A timeout (aiokafka: not retriable), an authorization or a policy refusal leaves the dead
    letter as it is: it is sent again with its bytes. MESSAGE_TOO_LARGE / RECORD_LIST_TOO_LARGE
    (the broker's) or MessageSizeTooLargeError (the producer's own max_request_size) drop its
    value, then, still too large, its key -- each with its length and sha256 in headers. Decisions
    are never changed."""
    import hashlib

    from aiokafka.errors import (
        KafkaTimeoutError,
        MessageSizeTooLargeError,
        PolicyViolationError,
        RecordListTooLargeError,
        TopicAuthorizationFailedError,
    )

    publisher = Publisher(settings, EngineMetrics())
    dlq, predictions = settings.topics.dlq, settings.topics.predictions
    key, value = b"k" * 3000, b"v" * 5000
    headers = [("error", b"not JSON"), ("stage", b"parse"), ("source_partition", b"3"), ("source_offset", b"42")]
    dead = (dlq, key, value, headers)
    for exc in (KafkaTimeoutError(), TopicAuthorizationFailedError(), PolicyViolationError(), KafkaError("x")):
        assert publisher._fallback(dead, exc) is dead, exc
    for exc in (MessageSizeTooLargeError(), RecordListTooLargeError()):
        assert publisher._fallback((predictions, key, value, None), exc) == (predictions, key, value, None)

    topic, k, v, h = no_value = publisher._fallback(dead, MessageSizeTooLargeError())
    assert (topic, k, v) == (dlq, key, None)
    got = dict(h or [])
    assert got["value_omitted"].startswith(b"5000 bytes not accepted by the broker")
    assert got["value_sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert publisher._fallback(no_value, KafkaTimeoutError()) is no_value

    topic, k, v, h = publisher._fallback(no_value, RecordListTooLargeError())
    assert (topic, k, v) == (dlq, None, None)
    got = dict(h or [])
    assert got["key_omitted"].startswith(b"3000 bytes not accepted by the broker")
    assert got["key_sha256"] == hashlib.sha256(key).hexdigest().encode()
    assert got["value_sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert (got["source_partition"], got["source_offset"], got["stage"]) == (b"3", b"42", b"parse")


async def test_a_dead_letter_whose_key_alone_is_too_large_is_delivered_without_it(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead letter whose key alone is over the broker's limit (value dropped, still refused) goes
    without its key too, instead of being retried for ever with its partition's commits frozen."""
    limit = _refuse_batches_over(monkeypatch, 1024 * 1024)
    settings = settings.replace(kafka={"linger_ms": 0})
    metrics = EngineMetrics()
    publisher = Publisher(settings, metrics)
    task = asyncio.create_task(publisher.run(IGNORED))
    dlq = settings.topics.dlq
    huge_key = b"K" * (2 * limit)
    headers = [("error", b"not JSON"), ("stage", b"parse"), ("source_offset", b"7")]
    try:
        ack = await publisher.send_many([(dlq, huge_key, b"not json", headers)])
        async with asyncio.timeout(30):
            await ack
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert metrics.registry.get_sample_value("fraudactors_publish_retries_total", {"topic": dlq}) == 2
    assert publisher.pending == 0 and publisher.window() == {} and not publisher.retrying(ack)

    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(dlq, p) for p in range(settings.topics.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        found: list[Any] = []
        async with asyncio.timeout(30):
            while not found:
                for recs in (await consumer.getmany(timeout_ms=500)).values():
                    found.extend(recs)
    finally:
        await consumer.stop()
    (dead,) = found
    got = dict(dead.headers)
    assert dead.key is None and dead.value is None
    assert got["key_omitted"].startswith(str(len(huge_key)).encode() + b" bytes not accepted")
    assert got["source_offset"] == b"7" and "value_sha256" in got


async def test_a_batch_the_producer_fails_with_any_error_is_retried_and_the_sender_lives_on(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """send_batch asserts its partition is in the metadata (an output topic recreated with fewer
    partitions): that AssertionError fails the batch, whose confirmation retries it -- it does
    not end the partition's sender with the batch's future never resolved."""
    from aiokafka import AIOKafkaProducer

    real_send_batch = AIOKafkaProducer.send_batch
    failures = [AssertionError()]

    async def send_batch(self: AIOKafkaProducer, batch: Any, topic: str, *, partition: int) -> Any:
        if failures:
            raise failures.pop()
        return await real_send_batch(self, batch, topic, partition=partition)

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", send_batch)
    settings = settings.replace(kafka={"linger_ms": 0})
    metrics = EngineMetrics()
    publisher = Publisher(settings, metrics)
    task = asyncio.create_task(publisher.run(IGNORED))
    topic = settings.topics.predictions
    try:
        ack = await publisher.send_many([(topic, b"u-1", b"decided", None)])
        async with asyncio.timeout(20):
            await ack
        assert metrics.registry.get_sample_value("fraudactors_publish_retries_total", {"topic": topic}) == 1
        again = await publisher.send_many([(topic, b"u-1", b"decided again", None)])  # same partition's sender
        async with asyncio.timeout(20):
            await again
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
