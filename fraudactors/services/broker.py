"""The embedded Kafka-protocol broker: Tansu, memory storage, one loopback listener.

Tansu rejects idempotent and transactional producers (InitProducerId); clients built for it use
``enable_idempotence=False``. See docs/tansu.md for what else it does and does not do.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from fraudactors.services.binaries import resolve_tansu
from fraudactors.services.embedded import EmbeddedService

READY_TOPIC = "__fraudactors_ready"


class EmbeddedBroker(EmbeddedService):
    name = "tansu"

    def __init__(self, binary: str | None = None, *, port: int | None = None, start_timeout_s: float = 30.0,
                 stop_grace_s: float = 5.0) -> None:
        super().__init__(binary or resolve_tansu(), port=port, start_timeout_s=start_timeout_s,
                         stop_grace_s=stop_grace_s)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self, port: int) -> Sequence[str]:
        url = f"tcp://{self.host}:{port}"
        return [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]

    async def check(self, budget_s: float) -> None:
        """Create a topic, produce one record and read that very record back."""
        await round_trip(self.bootstrap_servers, timeout_ms=max(1000, int(budget_s * 1000)))


async def round_trip(bootstrap_servers: str, topic: str = READY_TOPIC, timeout_ms: int = 10000) -> int:
    """Produce a unique record to ``topic`` (created if missing) and consume it back; returns its offset.

    Raises if the record does not come back.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=timeout_ms,
                                client_id="fraudactors-ready")
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        for name, code, *_ in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                raise RuntimeError(f"cannot create {name}: error code {code}")
    finally:
        await admin.close()

    token = uuid.uuid4().hex.encode()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=False, acks="all",
                                request_timeout_ms=timeout_ms, client_id="fraudactors-ready")
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, value=token, key=b"ready", partition=0)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                request_timeout_ms=timeout_ms, client_id="fraudactors-ready")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        batch = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        records = batch.get(tp, [])
        if not records or records[0].value != token:
            raise RuntimeError(f"round trip on {topic}: the produced record did not come back")
        return int(meta.offset)
    finally:
        await consumer.stop()
