"""The control topic: the routing document's home, and the actor that makes every replica follow it.

``topics.control`` has one partition and ``cleanup.policy=compact``; the routing document is
written under the key ``routing`` (:mod:`fraudactors.engine.routing`). Every replica reads it with
no consumer group (assign, seek to the beginning), so each one sees every document.

:class:`RoutingFollower` is a supervised child started after the inference actor and before the
ingestor: it reads the topic up to its end and applies the newest document before it reports
started (so no transaction is decided before the replica routes as the others do), then applies
each new one as it arrives. **The newest document on the topic is the routing**, whatever its
revision: that is the one a compacted topic keeps, so it is what a replica that starts later, and
``fraudactors models list``, find. Two changes written at the same time (each built on the same
revision) could otherwise leave the running replicas on the first and every later one on the
second under one revision number; a writer refuses to write when the topic moved since it read it,
and a document that does not raise the revision is applied with a ``routing_conflict`` warning.
Applying is the inference actor's job
(:meth:`~fraudactors.engine.inference.InferenceActor.apply_routing`): every version is loaded and
sha256-checked in every scorer first, and a failure refuses the whole document -- logged with the
reason, counted in ``fraudactors_routing_changes_total{result="refused"}`` -- while the routing in
force keeps serving. A replica that cannot apply the newest document at start-up applies the
routing it replaced (its ``previous``), which is what the running replicas kept serving.

A record batch on the topic that does not decode (:mod:`fraudactors.engine.unreadable`) stops the
follower there: the routing in force keeps serving (at start-up: the newest document before the
batch), the stop is logged once as ``partition_unreadable`` and shown by
``fraudactors_partition_unreadable``, and the documents at and after it wait for the operator.
``fraudactors models`` refuses to build a change on a topic it cannot read to the end.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from fraudactors.engine.inference import InferenceActor
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.routing import ROUTING_KEY, Routing
from fraudactors.engine.unreadable import Stopped, Unreadable, fetch
from fraudactors.errors import RoutingRefused, ServiceError, TopicUnreadable
from fraudactors.logging import get_logger
from fraudactors.redact import redact_url
from fraudactors.services.kafka import make_admin, make_consumer, make_producer
from fraudactors.settings import Settings

_POLL_MS = 500


async def ensure_control_topic(settings: Settings) -> bool:
    """Create ``topics.control`` (one partition, compacted) unless it exists; True if created."""
    admin = make_admin(settings)
    try:
        await admin.start()
    except Exception as exc:
        where = redact_url(settings.kafka.bootstrap_servers)
        raise ServiceError(f"cannot reach Kafka at {where} for the control topic: {redact_url(repr(exc))}") from exc
    try:
        name = settings.topics.control
        if name in set(await admin.list_topics()):
            return False
        response = await admin.create_topics([NewTopic(
            name, num_partitions=1, replication_factor=settings.topics.replication_factor,
            topic_configs={"cleanup.policy": "compact"})])
        for topic, code, *message in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                detail = message[0] if message and message[0] else f"error code {code}"
                raise ServiceError(f"cannot create the control topic {topic!r}: {detail}")
        return True
    finally:
        await admin.close()


async def read_documents(settings: Settings) -> tuple[list[bytes], int]:
    """Every routing document on the control topic up to its current end, oldest first
    (tombstones left out), and that end offset. A batch on the way that does not decode raises
    :class:`TopicUnreadable`: the routing in force is not known."""
    tp = TopicPartition(settings.topics.control, 0)
    consumer = make_consumer(settings, group_id=None, client_id=f"{settings.kafka.client_id}-control",
                             auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        documents, end, found = await read_to_end(consumer, tp)
    finally:
        await consumer.stop()
    if found is not None:
        raise TopicUnreadable(
            f"the control topic {tp.topic} cannot be read past offset {found.offset}: a record batch there "
            f"does not decode ({found.error}); the routing in force is not known and nothing is changed "
            '(docs/operations.md, "A partition stopped at an unreadable batch")')
    return documents, end


async def read_to_end(consumer: AIOKafkaConsumer, tp: TopicPartition) -> tuple[list[bytes], int, Unreadable | None]:
    """The routing documents from ``consumer``'s position on ``tp`` to the current end, that end,
    and the batch that does not decode if one stopped the read short (None: read to the end)."""
    end = (await consumer.end_offsets([tp]))[tp]
    out: list[bytes] = []
    while await consumer.position(tp) < end:
        batch, found = await fetch(consumer, tp, timeout_ms=_POLL_MS)
        out.extend(_documents(batch.get(tp, [])))
        if found is not None:
            return out, end, found
    return out, end, None


def _documents(records: list[Any]) -> list[bytes]:
    return [r.value for r in records if r.key == ROUTING_KEY and r.value is not None]


async def current_routing(settings: Settings) -> Routing:
    """The newest valid routing document, or the configuration's variants (revision 0) when there
    is none. An invalid one (every replica refused it) is passed over, so a change can replace it."""
    return (await routing_and_end(settings))[0]


async def routing_and_end(settings: Settings) -> tuple[Routing, int]:
    """:func:`current_routing` and the control topic's end offset it was read at."""
    await ensure_control_topic(settings)
    documents, end = await read_documents(settings)
    for document in reversed(documents):
        try:
            return Routing.from_json(document), end
        except RoutingRefused:
            continue
    return Routing.from_settings(settings.models), end


async def publish_routing(settings: Settings, routing: Routing, read_at: int | None = None) -> int:
    """Write ``routing`` under the routing key; returns its offset once the broker has it.

    ``read_at``: the topic's end offset when the routing this change was built on was read. The
    change is refused (RoutingRefused, nothing written) if the topic has moved since: another change
    was written meanwhile, and this one would silently replace it."""
    producer = make_producer(settings, client_id=f"{settings.kafka.client_id}-control")
    await producer.start()
    try:
        if read_at is not None:
            end = await _end_offset(settings)
            if end != read_at:
                raise RoutingRefused(
                    f"not written: the routing changed while this change was made (the control topic "
                    f"{settings.topics.control} moved from offset {read_at} to {end}); run the command again "
                    "to build on the change written meanwhile")
        meta = await producer.send_and_wait(settings.topics.control, routing.to_json(), key=ROUTING_KEY,
                                            partition=0)
        return int(meta.offset)
    finally:
        await producer.stop()


async def _end_offset(settings: Settings) -> int:
    tp = TopicPartition(settings.topics.control, 0)
    consumer = make_consumer(settings, group_id=None, client_id=f"{settings.kafka.client_id}-control")
    await consumer.start()
    try:
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


class RoutingFollower:
    """Keeps the inference actor's routing on the control topic's newest document."""

    def __init__(self, settings: Settings, metrics: EngineMetrics, inference: InferenceActor) -> None:
        self._settings = settings
        self._metrics = metrics
        self._inference = inference
        self.applied = Routing.from_settings(settings.models)
        self._refused: set[bytes] = set()  # documents refused here: not tried again after a restart
        self._log = get_logger(actor="routing")
        self._stopped = Stopped(metrics.partition_unreadable, self._log)
        metrics.routing_revision.set(0)

    async def run(self, task_status: Any) -> None:
        """Supervised child: catch up (apply the newest), report started, then follow."""
        s = self._settings
        await ensure_control_topic(s)
        # An idle topic: a long fetch wait (the broker answers sooner when a document arrives;
        # Tansu answers after the wait) instead of kafka.fetch_max_wait_ms's busy polling.
        consumer = make_consumer(s, group_id=None, client_id=f"{s.kafka.client_id}-control",
                                 auto_offset_reset="earliest", fetch_max_wait_ms=_POLL_MS)
        await consumer.start()
        try:
            tp = TopicPartition(s.topics.control, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            documents, _, found = await read_to_end(consumer, tp)
            if documents:
                await self._catch_up(documents[-1])
            if found is not None:
                self._stop(consumer, found)
            self._log.info("routing_following", revision=self.applied.revision, topic=s.topics.control)
            task_status.started()
            while True:
                batch, found = await fetch(consumer, tp, timeout_ms=_POLL_MS)
                values = _documents(batch.get(tp, []))
                if values:
                    await self._apply(values[-1])  # the newest wins; older ones in the same fetch are superseded
                if found is not None:
                    self._stop(consumer, found)
        finally:
            await consumer.stop()

    def _stop(self, consumer: AIOKafkaConsumer, found: Unreadable) -> None:
        """A batch that does not decode: read no further, keep the routing in force (module docstring)."""
        self._stopped.stop(consumer, found, serving=self.applied.revision)

    async def _catch_up(self, document: bytes) -> None:
        routing = await self._apply(document)
        if routing is None or routing.previous is None or self.applied.revision >= routing.revision \
                or routing.previous.revision <= self.applied.revision:
            return
        # The newest document is refused here: serve what it replaced, as the running replicas do.
        self._log.warning("routing_previous_applied", refused=routing.revision, previous=routing.previous.revision)
        await self._try(routing.previous)

    async def _apply(self, document: bytes) -> Routing | None:
        """Apply one document unless it is the routing in force or was refused here; returns it
        parsed (None: unreadable). A document newer on the topic wins even when its revision is not
        higher (module docstring): every replica, and every later one, ends on the same routing."""
        try:
            routing = Routing.from_json(document)
        except RoutingRefused as exc:
            self._refuse(None, str(exc))
            return None
        if routing == self.applied or routing.to_json() in self._refused:
            return routing
        if routing.revision <= self.applied.revision:
            self._log.warning("routing_conflict", revision=routing.revision, reason=routing.reason,
                              serving=self.applied.revision, serving_reason=self.applied.reason,
                              detail="a newer document on the control topic does not raise the revision: "
                                     "two changes were written at the same time; the newer one is applied")
        await self._try(routing)
        return routing

    async def _try(self, routing: Routing) -> None:
        try:
            await self._inference.apply_routing(routing)
        except RoutingRefused as exc:
            self._refuse(routing, str(exc))
            return
        self.applied = routing
        self._metrics.routing_changes.labels("applied").inc()
        self._metrics.routing_revision.set(routing.revision)
        self._log.info("routing_applied", revision=routing.revision, reason=routing.reason,
                       variants={n: {"version": v.version, "weight": v.weight, "shadow": v.shadow}
                                 for n, v in routing.variants.items()})

    def _refuse(self, routing: Routing | None, reason: str) -> None:
        if routing is not None:
            self._refused.add(routing.to_json())
        self._metrics.routing_changes.labels("refused").inc()
        self._log.error("routing_refused", revision=None if routing is None else routing.revision,
                        error=reason, serving=self.applied.revision)
