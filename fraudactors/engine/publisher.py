"""The publisher actor: one aiokafka producer for decisions and dead letters.

``send_many`` hands a micro-batch to the producer (no per-record wait for the broker) and returns
one future that resolves when the broker acknowledged every record of the batch. A record whose
send fails is sent again with backoff until it is acknowledged or the engine stops: a decision is
never dropped silently. The feature worker gives that future to its :class:`OffsetTracker`.

Records are batched per (topic, partition) by the publisher itself, with ``create_batch()`` /
``send_batch()`` (about a tenth of the client CPU of one ``send()`` per record): a partition's
open batch collects the records of every micro-batch handed over within ``kafka.linger_ms`` of
its first record (or until it is full), then is sealed and sent; sealed batches of a partition
are sent strictly in order by one sender task per partition. ``linger_ms = 0`` seals at the end
of each ``send_many``. The linger bounds how many batches a partition gets per second whatever
the load -- brokers pay per batch (Tansu far more than Kafka, docs/tansu.md). The partition is the
producer's default partitioner on the key, so a record lands where a keyed ``send()`` would put
it. A record too large for an empty batch falls back to ``send()``.

In flight is bounded: at most ``engine.publish_window`` records per output partition are handed
to the producer and not yet acknowledged (retries included: a record keeps its slot until it is
acknowledged). ``send_many`` waits while a partition it writes to has no room -- the worker waits,
its mailbox fills and the ingestor pauses its input partition, so a broker that refuses or does
not answer writes holds the pipeline back at the Kafka edge instead of growing memory at the
ingest rate. The depth per partition is ``fraudactors_publish_window``. Waiting senders are let in
in order, each as soon as every partition it writes to has room.

Stopping (the publisher child shut down, after the ingestor committed): the open batches are sealed
and sent, :meth:`Publisher.flush` waits up to a quarter of ``engine.shutdown_timeout_s`` for the
acknowledgements, then :meth:`Publisher.stop` ends the retries and what is still unacknowledged
fails (its offsets stay uncommitted: the next owner reads those records again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from fraudactors.actors import last_step
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import ActorDied
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

# (topic, key, value, headers)
Message = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]

_BACKOFF_START_S = 0.05
_MAX_REQUEST_BYTES = 4 * 1024 * 1024
_BACKOFF_MAX_S = 2.0
# The errors that say a record is too large, from the broker (its max.message.bytes) or from the
# producer itself (over max_request_size): the only ones a dead letter is cut down for.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


def build_producer(settings: Settings) -> AIOKafkaProducer:
    from fraudactors.services.kafka import make_producer

    # A dead letter carries the original value, which may be up to the input limit (1 MiB) plus
    # headers; the broker's own limit still applies (see Publisher._fallback).
    return make_producer(settings, client_id=f"{settings.kafka.client_id}-producer",
                         max_request_size=_MAX_REQUEST_BYTES)


_TP = tuple[str, int]


class KeyPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, pure Python: ~2 % of the engine's CPU)
    with the hash of each key remembered; the memory is dropped when it holds 65,536 keys.

    Only keys of up to ``MAX_CACHED_KEY`` bytes are remembered: a ``user_id`` is at most 64
    characters (256 bytes of UTF-8), and a dead letter keeps whatever key its producer sent, so
    65,536 remembered keys of 2 KiB would be 134 MB held for nothing."""

    MAX_CACHED_KEY = 256
    MAX_KEYS = 65_536

    def __init__(self) -> None:
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return DefaultPartitioner()(key, all_partitions, available)
        h = self._hashes.get(key)
        if h is None:
            h = murmur2(key) & 0x7FFFFFFF
            if len(key) <= self.MAX_CACHED_KEY:
                if len(self._hashes) >= self.MAX_KEYS:
                    self._hashes.clear()
                self._hashes[key] = h
        return all_partitions[h % len(all_partitions)]

    @property
    def cached_bytes(self) -> int:
        return sum(len(key) for key in self._hashes)


class _Batch:
    """An open, then sealed, record batch of one partition and the future of its delivery."""

    __slots__ = ("builder", "delivered", "timer")

    def __init__(self, builder: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.builder = builder
        self.delivered: asyncio.Future[Any] = loop.create_future()
        self.timer: asyncio.TimerHandle | None = None


def _settle(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.set_exception(KafkaError("batch delivery cancelled"))
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


class Publisher:
    """Sends decisions and dead letters; survives restarts of its producer."""

    def __init__(self, settings: Settings, metrics: EngineMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._producer: AIOKafkaProducer | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._confirmations: set[asyncio.Task[None]] = set()
        self.pending = 0  # records handed to the producer, not yet acknowledged
        # The window: records in flight per output partition, and the senders waiting for room.
        self._window_limit = settings.engine.publish_window
        self._in_flight: dict[_TP, int] = {}
        self._waiters: deque[tuple[asyncio.Future[None], dict[_TP, int]]] = deque()
        self.window_peak = 0  # the most records ever in flight on one partition
        self._retrying: set[asyncio.Future[None]] = set()  # confirmations whose sends failed, being retried
        self._last_ack = time.monotonic()  # a record acknowledged by the broker, the last time
        self._partitioner = KeyPartitioner()
        self._linger_s = settings.kafka.linger_ms / 1000.0
        self._open: dict[_TP, _Batch] = {}  # per partition: the batch records are added to
        self._sealed: dict[_TP, deque[_Batch]] = {}  # per partition: sealed, waiting to be sent
        self._senders: dict[_TP, asyncio.Task[None]] = {}
        self._log = get_logger(actor="publisher")

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def waiting(self) -> int:
        """Senders waiting for room in the window (the workers held back right now)."""
        return len(self._waiters)

    def silent_s(self, now: float) -> float:
        """How long the broker has acknowledged none of the records that wait for it (0 while none
        wait): the whole broker holds the pipeline back, its fetches too (a freeze, an outage)."""
        return now - self._last_ack if self.pending else 0.0

    def retrying(self, ack: asyncio.Future[None]) -> bool:
        """True while sends of the batch ``ack`` (from :meth:`send_many`) failed and are retried."""
        return ack in self._retrying

    def window(self) -> dict[_TP, int]:
        """Records in flight per output (topic, partition)."""
        return {tp: n for tp, n in self._in_flight.items() if n}

    async def run(self, task_status: Any) -> None:
        """Supervised child: start the producer, report ready, serve until cancelled."""
        self._stopping = False
        producer = build_producer(self._settings)
        await producer.start()
        self._producer = producer
        self._ready.set()
        self._log.info("publisher_started")
        task_status.started()
        try:
            await asyncio.Event().wait()
        finally:
            self._ready.clear()
            # its flush (a quarter of the stop's budget), then the producer's stop
            await last_step(self._close(producer), wait_s=0.3 * self._settings.engine.shutdown_timeout_s)

    async def _close(self, producer: AIOKafkaProducer) -> None:
        """Send what is open, wait (bounded) for the acknowledgements, then stop retrying."""
        try:
            for tp in list(self._open):
                self._seal(tp)
            drained = await self.flush(timeout_s=self._settings.engine.shutdown_timeout_s / 4)
            if not drained:
                self._log.warning("publisher_unacknowledged", records=self.pending)
            self.stop()
            for task in [*self._senders.values(), *self._confirmations]:
                task.cancel()
            await asyncio.gather(*self._senders.values(), *self._confirmations, return_exceptions=True)
            if drained:
                await producer.flush()
        finally:
            await producer.stop()
            if self._producer is producer:
                self._producer = None

    async def _current(self) -> AIOKafkaProducer:
        if self._stopping:
            raise ActorDied("publisher stopped")
        if self._producer is None:
            await self._ready.wait()
        assert self._producer is not None
        return self._producer

    async def send_many(self, messages: Sequence[Message]) -> asyncio.Future[None]:
        """Hand a batch to the producer once the window has room for it; the returned future
        resolves once all are acknowledged. Raises ActorDied when the publisher stopped."""
        loop = asyncio.get_running_loop()
        if not messages:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        routes = await self._route(messages)
        # Slots per output partition (a record whose partition is unknown yet: partition -1).
        slots = dict(Counter(tp if isinstance(tp, tuple) else (message[0], -1)
                             for message, tp in zip(messages, routes, strict=True)))
        await self._admit(slots)
        try:
            futures = await self._send(messages, routes)
        except BaseException:
            self._release(slots)
            raise
        task = loop.create_task(self._confirm(messages, futures))
        self._confirmations.add(task)
        n = len(messages)
        self.pending += n
        task.add_done_callback(lambda t: self._confirmed(t, n, slots))
        return task

    def _confirmed(self, task: asyncio.Task[None], n: int, slots: dict[_TP, int]) -> None:
        self._confirmations.discard(task)
        self.pending -= n
        self._release(slots)

    # ---------------------------------------------------------------- the window
    def _fits(self, slots: dict[_TP, int]) -> bool:
        limit, in_flight = self._window_limit, self._in_flight
        return all(in_flight.get(tp, 0) + n <= limit for tp, n in slots.items())

    async def _admit(self, slots: dict[_TP, int]) -> None:
        """Take the slots; wait (behind earlier waiters) while a partition has no room."""
        if self._stopping:
            raise ActorDied("publisher stopped")
        if self._fits(slots) and not any(tp in waiting for _, waiting in self._waiters for tp in slots):
            self._take(slots)  # room, and nobody waits for these partitions: no overtaking
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, slots)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(slots)  # granted just as we gave up
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()
            raise

    def _take(self, slots: dict[_TP, int]) -> None:
        in_flight, gauge = self._in_flight, self._metrics.publish_window
        for tp, n in slots.items():
            depth = in_flight[tp] = in_flight.get(tp, 0) + n
            gauge.labels(tp[0], str(tp[1])).set(depth)
            self.window_peak = max(self.window_peak, depth)

    def _release(self, slots: dict[_TP, int]) -> None:
        in_flight, gauge = self._in_flight, self._metrics.publish_window
        for tp, n in slots.items():
            depth = in_flight[tp] = in_flight[tp] - n
            gauge.labels(tp[0], str(tp[1])).set(depth)
        self._grant()

    def _grant(self) -> None:
        """Let in the waiting senders that fit now, in the order they came: first come, first
        served per partition (one that does not fit holds back later ones for its partitions)."""
        waiting: deque[tuple[asyncio.Future[None], dict[_TP, int]]] = deque()
        blocked: set[_TP] = set()
        for fut, slots in self._waiters:
            if fut.done():
                continue
            if blocked.isdisjoint(slots) and self._fits(slots):
                self._take(slots)
                fut.set_result(None)
            else:
                blocked.update(slots)
                waiting.append((fut, slots))
        self._waiters = waiting

    # ---------------------------------------------------------------- sending
    async def _route(self, messages: Sequence[Message]) -> list[_TP | BaseException]:
        """The output (topic, partition) of each message -- the producer's partitioner on its key --
        or the error that kept it from being known."""
        producer = await self._current()
        partitions: dict[str, list[int]] = {}
        partitioner = self._partitioner
        out: list[_TP | BaseException] = []
        for topic, key, _, _ in messages:
            all_partitions = partitions.get(topic)
            if all_partitions is None:
                try:
                    all_partitions = partitions[topic] = sorted(await producer.partitions_for(topic))
                except KafkaError as exc:
                    out.append(exc)
                    continue
            out.append((topic, partitioner(key, all_partitions, all_partitions)))
        return out

    async def _send(self, messages: Sequence[Message], routes: Sequence[_TP | BaseException] | None = None
                    ) -> list[asyncio.Future[Any] | BaseException]:
        """One delivery future (or the error) per message, in order; see the module doc."""
        if routes is None:
            routes = await self._route(messages)
        producer = await self._current()
        out: list[asyncio.Future[Any] | BaseException] = []
        touched: set[_TP] = set()
        for (topic, key, value, headers), tp in zip(messages, routes, strict=True):
            if not isinstance(tp, tuple):
                out.append(tp)
                continue
            touched.add(tp)
            batch = self._open.get(tp) or self._open_batch(producer, tp)
            record = {"key": key, "value": value, "timestamp": None, "headers": headers or []}
            if batch.builder.append(**record) is None:
                empty = batch.builder.record_count() == 0
                if not empty:  # full: seal it (sent in order) and start the next one
                    self._seal(tp)
                    batch = self._open_batch(producer, tp)
                if empty or batch.builder.append(**record) is None:
                    # larger than an empty batch: the producer's own path (max_request_size applies)
                    self._discard(tp)
                    try:
                        out.append(await producer.send(topic, value, key=key, partition=tp[1], headers=headers))
                    except Exception as exc:  # the record's failure, retried by _confirm
                        out.append(exc)
                    continue
            out.append(batch.delivered)
        if self._linger_s <= 0:
            for tp in touched:
                self._seal(tp)
        return out

    def _open_batch(self, producer: AIOKafkaProducer, tp: _TP) -> _Batch:
        loop = asyncio.get_running_loop()
        batch = self._open[tp] = _Batch(producer.create_batch(), loop)
        if self._linger_s > 0:
            batch.timer = loop.call_later(self._linger_s, self._seal, tp)
        return batch

    def _discard(self, tp: _TP) -> None:
        """Drop the open batch of ``tp`` if it holds nothing."""
        batch = self._open.get(tp)
        if batch is not None and batch.builder.record_count() == 0:
            del self._open[tp]
            if batch.timer is not None:
                batch.timer.cancel()
            batch.delivered.cancel()

    def _seal(self, tp: _TP) -> None:
        """Close the open batch of ``tp`` and queue it for its partition's sender."""
        batch = self._open.pop(tp, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        batch.builder.close()
        self._sealed.setdefault(tp, deque()).append(batch)
        sender = self._senders.get(tp)
        if sender is None or sender.done():
            self._senders[tp] = asyncio.get_running_loop().create_task(self._send_sealed(tp))

    async def _send_sealed(self, tp: _TP) -> None:
        """Hand a partition's sealed batches to the producer, strictly in the order sealed."""
        queue = self._sealed[tp]
        topic, partition = tp
        while queue:
            batch = queue[0]
            try:
                producer = await self._current()
                fut = await producer.send_batch(batch.builder, topic, partition=partition)
            except Exception as exc:  # not CancelledError (a BaseException): that ends the sender
                # any failure (KafkaError, ActorDied, the AssertionError of a partition gone from the
                # metadata) fails the batch, never the sender: its confirmation retries or fails
                queue.popleft()
                if not isinstance(exc, KafkaError | ActorDied):
                    self._log.error("publish_batch_failed", topic=topic, partition=partition, error=repr(exc))
                if not batch.delivered.done():
                    batch.delivered.set_exception(exc)
                continue
            queue.popleft()
            fut.add_done_callback(lambda f, target=batch.delivered: _settle(f, target))

    async def _confirm(self, messages: Sequence[Message],
                       futures: list[asyncio.Future[Any] | BaseException]) -> None:
        backoff = _BACKOFF_START_S
        retrying = False
        me = asyncio.current_task()
        assert me is not None
        try:
            while True:
                failed: list[Message] = []
                error: BaseException | None = None
                for message, fut in zip(messages, futures, strict=True):
                    if isinstance(fut, BaseException):
                        exc: BaseException | None = fut
                    else:
                        try:
                            await fut
                            exc = None
                            self._last_ack = time.monotonic()
                        except Exception as e:  # every failure is retried (routed again)
                            exc = e
                    if exc is not None:
                        failed.append(self._fallback(message, exc))
                        error = exc
                if not failed:
                    return
                if self._stopping:
                    raise ActorDied(f"publisher stopped with {len(failed)} unacknowledged records")
                if not retrying:
                    retrying = True
                    self._retrying.add(me)
                self._metrics.publish_retries.labels(failed[0][0]).inc(len(failed))
                self._log.warning("publish_retry", records=len(failed), error=repr(error), backoff_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                messages = failed
                futures = await self._send(messages)
        finally:
            if retrying:
                self._retrying.discard(me)

    def _fallback(self, message: Message, exc: BaseException) -> Message:
        """What to send again after ``exc``: the same message, except a dead letter refused as too
        large (:data:`_TOO_LARGE`, never a timeout, an authorization or policy error: those are
        retried unchanged, so a dead letter keeps its bytes through an outage). It goes again
        without its value, and if that is still too large, without its key too; the length and
        sha256 of what was dropped are in headers, so the original can be found in the source topic
        (headers ``source_partition``, ``source_offset``) and one poison record cannot stall its
        partition."""
        topic, key, value, headers = message
        if topic != self._settings.topics.dlq or not isinstance(exc, _TOO_LARGE):
            return message
        if value is not None:
            part, dropped = "value", value
        elif key is not None:
            part, dropped = "key", key
        else:
            return message  # nothing left to drop: headers alone too large (ours are bounded)
        self._log.error("dead_letter_part_omitted", part=part, error=repr(exc), bytes=len(dropped))
        omitted = [(f"{part}_omitted", f"{len(dropped)} bytes not accepted by the broker: {exc!r}"[:500].encode()),
                   (f"{part}_sha256", hashlib.sha256(dropped).hexdigest().encode())]
        if part == "value":
            return (topic, key, None, [*(headers or []), *omitted])
        return (topic, None, value, [*(headers or []), *omitted])

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every batch handed off so far is acknowledged (or failed for good); False
        when some are still pending after ``timeout_s``."""
        pending = list(self._confirmations)
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        return all(task.done() for task in pending)

    def stop(self) -> None:
        """Stop retrying: pending confirmations fail instead of retrying forever, and senders
        waiting for room in the window get ActorDied."""
        self._stopping = True
        for fut, _ in self._waiters:
            if not fut.done():
                fut.set_exception(ActorDied("publisher stopped"))
        self._waiters.clear()
