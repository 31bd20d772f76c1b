"""A record batch the consumer cannot decode stops its partition, and only its partition.

The fault is real: a record batch whose CRC does not match its bytes is written to the broker
with a raw Produce request (Tansu stores it as sent; Apache Kafka would refuse it at the door, but a
bad disk or a broker bug puts such a batch in the log all the same), and aiokafka fetches it.
"""

from __future__ import annotations

import orjson
from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from fraudactors.engine.unreadable import salvage
from fraudactors.services.kafka import make_consumer, make_producer
from fraudactors.settings import Settings


async def produce_corrupt(settings: Settings, partition: int, records: list[tuple[bytes, bytes, str]]) -> int:
    """Write ``records`` to ``partition`` as one record batch whose CRC does not match (a byte of
    the last value flipped after the CRC was computed); returns the batch's base offset."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i, (key, value, _) in enumerate(records):
        builder.append(i, timestamp=None, key=key, value=value, headers=[])
    data = bytearray(builder.build())
    data[-2] ^= 0xFF
    topic = settings.topics.transactions
    client = AIOKafkaClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await client.bootstrap()
    try:
        await client.fetch_all_metadata()
        leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        response = await client.send(leader, ProduceRequest(
            transactional_id=None, required_acks=-1, timeout=10000, topics=[(topic, [(partition, bytes(data))])]))
    finally:
        await client.close()
    [(_, [(_, error, offset, *_)])] = response.topics
    assert error == 0, f"the broker refused the corrupt batch: error {error}"
    return int(offset)


async def test_salvage_gives_back_what_a_getmany_failing_on_a_corrupt_batch_dropped(settings: Settings) -> None:
    """aiokafka's getmany drops the records it drained before the bad batch (other partitions', and
    the bad partition's own before it) and moves their positions on; salvage gives them back, and
    names the partition and offset. Stopping there as the ingestor does, nothing is read twice or
    lost -- and a consumer that merely retried getmany would have lost them."""
    s = settings
    bad = 1
    good = {p: [(b"k", orjson.dumps({"p": p, "i": i}), f"{p}-{i}") for i in range(3)] for p in (0, 1)}
    producer = make_producer(s, linger_ms=0)
    await producer.start()
    try:
        for p, records in good.items():
            for key, value, _ in records:
                await producer.send_and_wait(s.topics.transactions, value, key=key, partition=p)
    finally:
        await producer.stop()
    offset = await produce_corrupt(s, bad, [(b"k", b"lost?", "x")])
    assert offset == 3
    consumer = make_consumer(s, group_id=None, client_id="salvage-test")
    await consumer.start()
    seen: list[tuple[int, int]] = []
    found = []
    try:
        tps = [TopicPartition(s.topics.transactions, p) for p in (0, 1)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for _ in range(20):
            try:
                data = await consumer.getmany(timeout_ms=200)
            except Exception as exc:
                unreadable = salvage(exc)
                assert unreadable is not None, f"not pinned to a partition: {exc!r}"
                found.append(unreadable)
                data = unreadable.taken
                consumer.seek(unreadable.tp, unreadable.offset)
                consumer.pause(unreadable.tp)
            seen.extend((r.partition, r.offset) for recs in data.values() for r in recs)
            if len(seen) >= 6 and found:
                break
    finally:
        await consumer.stop()
    assert sorted(seen) == [(p, i) for p in (0, 1) for i in range(3)], "every good record once, none lost"
    assert [(f.tp.partition, f.offset, f.batch_end) for f in found] == [(bad, 3, 4)]
    assert [r.offset for r in found[0].taken[found[0].tp]] == [0, 1, 2], "the bad partition's own, before it"
    assert "CRC" in repr(found[0].error)

