"""Flow control of one partition (``engine/partition.py``) against a real consumer.

The ingestor routes each fetch into the partition's mailbox; what does not fit waits in the overflow
and the partition is paused at the consumer until the mailbox is half empty. These tests hold the
parts that the engine-level tests cannot tell apart: a consumer that kept fetching, or a fetch that
arrived behind an overflow, would still decide every record -- but out of order, or after holding
an unbounded buffer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from fraudactors.actors import Mailbox
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.offsets import OffsetTracker
from fraudactors.engine.partition import Partition
from fraudactors.engine.worker import Item
from fraudactors.services.kafka import make_consumer
from fraudactors.settings import Settings


def items(topic: str, start: int, end: int) -> list[Item]:
    """Records of partition 0 at offsets [start, end), as the ingestor routes them."""
    now = time.monotonic()
    return [(ConsumerRecord(topic, 0, offset, 0, 0, b"k", b"v", None, 1, 1, ()), now)
            for offset in range(start, end)]


@pytest.fixture
async def consumer(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(settings.topics.transactions, 0)])
        yield consumer
    finally:
        await consumer.stop()


def partition(consumer: AIOKafkaConsumer, topic: str, size: int) -> Partition:
    tp = TopicPartition(topic, 0)
    return Partition(tp, consumer, EngineMetrics(), Mailbox(size, "features-0"), OffsetTracker(0))


async def drain(p: Partition, n: int) -> list[int]:
    return [record.offset for record, _ in await p.mailbox.get_batch(n, 0.0)]


def paused(p: Partition) -> float | None:
    return p.metrics.registry.get_sample_value("fraudactors_partition_paused", {"partition": "0"})


async def test_a_full_mailbox_pauses_the_consumer_and_every_record_goes_in_once_in_order(
        settings: Settings, consumer: AIOKafkaConsumer) -> None:
    topic = settings.topics.transactions
    p = partition(consumer, topic, size=4)
    tp = p.tp

    assert p.route(items(topic, 0, 6)) is True, "the fetch that filled the mailbox paused the partition"
    assert consumer.paused() == {tp}, "paused at the consumer: no more fetching"
    assert paused(p) == 1
    assert [r.offset for r, _ in p.overflow] == [4, 5]
    # A fetch already under way when the pause came waits behind the overflow, even with room in
    # the mailbox: the partition's records stay in offset order.
    assert await drain(p, 3) == [0, 1, 2]
    assert p.route(items(topic, 6, 9)) is False, "paused already"
    assert [r.offset for r, _ in p.overflow] == [4, 5, 6, 7, 8]
    assert p.mailbox.depth == 1

    p.resume_if_drained()  # half empty: the overflow goes in first; what does not fit stays
    assert [r.offset for r, _ in p.overflow] == [7, 8]
    assert consumer.paused() == {tp}, "still paused while records wait outside the mailbox"
    p.resume_if_drained()
    assert consumer.paused() == {tp}, "a full mailbox does not resume"

    assert await drain(p, 1) == [3]
    p.resume_if_drained()
    assert [r.offset for r, _ in p.overflow] == [7, 8], "3 of 4: not half empty yet"
    assert await drain(p, 3) == [4, 5, 6]
    p.resume_if_drained()
    assert p.overflow == []
    assert consumer.paused() == set(), "resumed once the overflow went in"
    assert paused(p) == 0
    assert await drain(p, 4) == [7, 8]
    assert p.route(items(topic, 9, 11)) is False
    assert await drain(p, 4) == [9, 10]


async def test_a_halted_or_closing_partition_takes_nothing_and_a_rewind_resumes_where_handed_off(
        settings: Settings, consumer: AIOKafkaConsumer) -> None:
    topic = settings.topics.transactions
    p = partition(consumer, topic, size=4)
    tp = p.tp
    assert p.route(items(topic, 10, 12)) is False
    assert consumer.paused() == set()
    p.halt()  # the worker crashed
    assert consumer.paused() == {tp}, "no fetching while the worker restarts"
    assert p.route(items(topic, 12, 18)) is False
    assert p.mailbox.depth == 2 and p.overflow == [], \
        "nothing routed to a halted partition (the rewind fetches it again)"

    # Nothing handed off yet: the rewind goes back to the first record routed.
    old = p.mailbox
    assert p.rewind() == 10
    assert old.closed and p.mailbox is not old and p.mailbox.depth == 0
    assert await consumer.position(tp) == 10
    assert consumer.paused() == set() and not p.paused and not p.halted

    # After batches were handed off, a rewind goes back to the end of the last one.
    p.tracker.register(13, None)
    assert p.route(items(topic, 13, 15)) is False
    assert p.rewind() == 13
    assert await consumer.position(tp) == 13
    assert p.fetched_end == 13

    p.closing = True  # revoked: the next owner fetches the rest
    assert p.route(items(topic, 13, 15)) is False
    assert p.mailbox.depth == 0


async def test_a_rewind_of_a_partition_stopped_at_an_unreadable_batch_resumes_the_re_read_before_it(
        settings: Settings, consumer: AIOKafkaConsumer) -> None:
    """A partition stopped at a batch that does not decode, whose worker then crashes, is re-read
    from the end of the last batch handed off. Before, the rewind left it stopped: a re-read that
    filled the mailbox before the batch paused it, and draining the mailbox never resumed it -- the
    records between the pause and the batch were never decided nor committed."""
    topic = settings.topics.transactions
    p = partition(consumer, topic, size=4)
    tp = p.tp
    assert p.route(items(topic, 0, 4)) is False
    p.tracker.register(2, None)  # [0, 2) handed off
    consumer.pause(tp)
    p.unreadable = 9  # the ingestor stopped it there: [4, 9) lie between the mailbox and the batch
    p.halt()

    assert p.rewind() == 2
    assert p.unreadable is None, "not stopped while re-read: the ingestor stops it at the batch again"
    assert consumer.paused() == set()
    assert p.route(items(topic, 2, 8)) is True, "the re-read fills the mailbox before the batch"
    assert consumer.paused() == {tp}
    assert await drain(p, 4) == [2, 3, 4, 5]
    p.resume_if_drained()
    assert consumer.paused() == set(), "resumed: the re-read goes on to the batch"
    assert not p.paused and paused(p) == 0
    assert await drain(p, 4) == [6, 7]


async def test_too_many_unacknowledged_records_pause_the_partition_until_half_are_acknowledged(
        settings: Settings, consumer: AIOKafkaConsumer) -> None:
    """A batch the broker does not acknowledge holds back the commits of every batch after it:
    past the limit the partition is paused (what a publish retried for long holds stays bounded),
    and fetches again once at most half the limit waits -- unless its mailbox keeps it paused."""
    import asyncio

    loop = asyncio.get_running_loop()
    topic = settings.topics.transactions
    p = partition(consumer, topic, size=4)
    tp = p.tp
    refused: asyncio.Future[None] = loop.create_future()  # retried by the publisher, for now
    p.tracker.register(10, refused, records=10)
    later = [loop.create_future() for _ in range(3)]
    for i, ack in enumerate(later):
        ack.set_result(None)  # acknowledged, but behind the refused one: not committable
        p.tracker.register(15 + 5 * i, ack, records=5)
    assert p.tracker.outstanding == 25 and p.tracker.oldest_ack is refused
    assert p.hold_if_unacknowledged(limit=25) is False and consumer.paused() == set()
    p.tracker.register(30, None, records=5)
    assert p.hold_if_unacknowledged(limit=25) is True
    assert p.held and consumer.paused() == {tp} and paused(p) == 1
    assert p.hold_if_unacknowledged(limit=25) is False, "paused once"

    # its mailbox fills meanwhile, then drains: still held
    assert p.route(items(topic, 30, 36)) is True
    await drain(p, 4)
    p.resume_if_drained()
    await drain(p, 2)
    p.resume_if_drained()
    assert not p.paused and p.held and consumer.paused() == {tp} and paused(p) == 1

    refused.set_result(None)  # acknowledged at last: everything is committable
    await asyncio.sleep(0)
    assert p.tracker.outstanding == 0 and p.tracker.done_end == 30 and p.tracker.oldest_ack is None
    assert p.hold_if_unacknowledged(limit=25) is False
    assert not p.held and consumer.paused() == set() and paused(p) == 0

    # held and paused by its mailbox: the release does not resume it, the drain does
    stuck: asyncio.Future[None] = loop.create_future()
    p.tracker.register(60, stuck, records=30)
    assert p.hold_if_unacknowledged(limit=25) is True
    assert p.route(items(topic, 36, 42)) is True
    stuck.set_result(None)
    await asyncio.sleep(0)
    assert p.hold_if_unacknowledged(limit=25) is False and not p.held
    assert consumer.paused() == {tp} and paused(p) == 1
    await drain(p, 6)
    p.resume_if_drained()
    assert consumer.paused() == set() and paused(p) == 0


async def test_a_partition_whose_oldest_batch_is_unacknowledged_waits_on_the_broker(
        settings: Settings, consumer: AIOKafkaConsumer) -> None:
    """While the batch its commits wait for is unacknowledged -- still in the producer's first
    attempt (the publisher hears of a failure only after the request timeout), or held past
    ``max_unacknowledged`` for it -- the partition waits on the broker, and the watchdog excuses it.
    Before, only a batch already being sent again was excused: in a broker outage (or a held
    partition) a new consumer was started every ``watchdog_s`` before the first attempt failed,
    deciding its records again and resetting the age the alert waits on."""
    import asyncio

    from fraudactors.engine.publisher import Publisher

    loop = asyncio.get_running_loop()
    publisher = Publisher(settings, EngineMetrics())
    p = partition(consumer, settings.topics.transactions, size=4)
    assert not p.waits_on(), "nothing unacknowledged"
    first: asyncio.Future[None] = loop.create_future()  # in the producer's first attempt
    p.tracker.register(10, first, records=10)
    assert not publisher.retrying(first)
    assert p.waits_on(), "its oldest batch waits for the broker's acknowledgement"
    p.tracker.register(30, None, records=20)
    assert p.hold_if_unacknowledged(limit=25) is True
    assert p.waits_on(), "held for the acknowledgement: waiting on the broker"
    first.set_result(None)
    await asyncio.sleep(0)
    assert p.hold_if_unacknowledged(limit=25) is False and not p.held
    assert not p.waits_on()


class _FetchlessConsumer:
    """The consumer of a frozen broker: records wait at the high watermark, none are fetched."""

    def __init__(self, high: int) -> None:
        self.high = high
        self.paused_tps: set[TopicPartition] = set()

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_tps.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_tps.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    def highwater(self, tp: TopicPartition) -> int:
        return self.high


async def test_the_watchdog_excuses_a_partition_with_nothing_in_flight_while_the_broker_acknowledges_nothing(
        settings: Settings) -> None:
    """A broker frozen: partition 1 has nothing unacknowledged (its last batch was acknowledged
    before the freeze) and cannot fetch the records waiting for it, while partition 0's batch waits
    for an acknowledgement. A new consumer would not fetch either: no stall. Before (flaky in the
    frozen-broker test), partition 1 was taken for a stalled consumer after ``watchdog_s``. Once the
    broker acknowledges again, a partition that still makes no progress is a stall."""
    import asyncio
    from types import SimpleNamespace

    from fraudactors.engine.ingestor import ConsumerStalled, Ingestor
    from fraudactors.engine.publisher import Publisher

    loop = asyncio.get_running_loop()
    metrics = EngineMetrics()
    publisher = Publisher(settings, metrics)
    ingestor = Ingestor(settings, metrics, SimpleNamespace(features=SimpleNamespace(holding=False),
                                                           publisher=publisher))
    consumer = _FetchlessConsumer(high=500)
    ingestor._consumer = consumer  # type: ignore[assignment]
    parts = {}
    for n in (0, 1):
        tp = TopicPartition(settings.topics.transactions, n)
        part = Partition(tp, consumer, metrics, Mailbox(8, f"features-{n}"), OffsetTracker(0))  # type: ignore[arg-type]
        part.position = part.fetched_end = 100
        parts[n] = ingestor._parts[n] = part
    waiting: asyncio.Future[None] = loop.create_future()  # partition 0's batch, in the producer's hands
    parts[0].tracker.register(100, waiting, records=100)
    done: asyncio.Future[None] = loop.create_future()
    done.set_result(None)
    parts[1].tracker.register(100, done, records=100)  # acknowledged before the freeze
    publisher.pending = 100  # records the producer holds, none acknowledged since
    limit = settings.engine.watchdog_s
    now = time.monotonic()
    ingestor.last_poll = now + 10 * limit
    ingestor._watchdog(now)
    later = now + 2 * limit
    ingestor.last_poll = later
    ingestor._watchdog(later)  # partition 1 made no progress for twice watchdog_s: excused
    assert ingestor.stalls == 0

    publisher._last_ack = later  # the broker acknowledges again; partition 1 still fetches nothing
    publisher.pending = 0
    latest = later + 2 * limit
    ingestor.last_poll = latest
    with pytest.raises(ConsumerStalled, match="partition 1"):
        ingestor._watchdog(latest)
