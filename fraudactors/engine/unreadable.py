"""A fetched batch the consumer cannot decode, pinned to its partition and offset.

aiokafka decodes a fetched batch while ``getmany`` drains it. A batch that does not decode -- a bad
CRC (``CorruptRecordException``), an unknown codec, a failed decompression -- makes ``getmany`` raise
an exception that names neither the partition nor the offset. And the call drops what it had
drained: the records of the partitions drained before the failing one (their positions have moved
past them already) and the failing partition's records before the bad batch (the next ``getmany``
moves its position past them). A consumer that carried on would never see those records again.

:func:`salvage` reads all of this back from the exception's traceback: the frames of aiokafka's
``Fetcher.fetched_records`` (``drained``; ``tp``, the failing partition), ``FetchResult.getall``
(``ret_list``: that partition's records before the bad batch) and
``PartitionRecords._unpack_records`` (``next_fetch_offset``: the first offset not read). These are
aiokafka's internals (0.14); when the traceback does not have that shape :func:`salvage` returns
None and the failure is the consumer's, as it was before: a fresh consumer reads from the committed
offsets, so nothing is lost either way. ``tests/engine/test_engine_unreadable.py`` writes a batch
with a bad CRC on the broker and fails if aiokafka changes under this module.

A consumer fetches with :func:`fetch` and stops a partition at such a batch with :class:`Stopped`
(seeked back to it and paused, the ``fraudactors_partition_unreadable{topic,partition}`` gauge, the
``partition_unreadable`` log line). A stop outlives a re-read up to the batch (the gauge stays 1, the
line is not repeated) and ends when records past the batch are read (``partition_readable``).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from prometheus_client import Gauge

_FETCHER = "aiokafka.consumer.fetcher"


@dataclass(frozen=True)
class Unreadable:
    tp: TopicPartition
    offset: int  # the first offset of ``tp`` not read: the bad batch starts here (or holds it)
    error: BaseException
    # What the failed ``getmany`` had drained and dropped, per partition, in order (``tp``'s: its
    # records before ``offset``). The consumer's positions are already past all of them.
    taken: dict[TopicPartition, list[Any]]
    # The bad batch's own idea of its end (base offset + last offset delta + 1) when it holds
    # ``offset``: a hint for the operator, never trusted (the corruption may be in the header).
    batch_end: int | None = None


def _frames(tb: types.TracebackType | None) -> dict[str, types.FrameType]:
    out: dict[str, types.FrameType] = {}
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__") == _FETCHER:
            out[frame.f_code.co_name] = frame
        tb = tb.tb_next
    return out


def salvage(exc: BaseException) -> Unreadable | None:
    """The partition, offset and dropped records of a ``getmany`` that failed decoding a fetched
    batch; None for any other failure (or an aiokafka whose internals moved)."""
    frames = _frames(exc.__traceback__)
    fetched, getall, unpack = (frames.get(n) for n in ("fetched_records", "getall", "_unpack_records"))
    if fetched is None or getall is None or unpack is None:
        return None
    tp = fetched.f_locals.get("tp")
    drained = fetched.f_locals.get("drained")
    before = getall.f_locals.get("ret_list")
    records = unpack.f_locals.get("self")
    offset = getattr(records, "next_fetch_offset", None)
    if (not isinstance(tp, TopicPartition) or not isinstance(drained, dict) or not isinstance(before, list)
            or getattr(records, "_tp", None) != tp or not isinstance(offset, int)):
        return None
    taken: dict[TopicPartition, list[Any]] = {t: list(r) for t, r in drained.items() if r}
    if before:
        taken[tp] = list(before)
    return Unreadable(tp, offset, exc, taken, _batch_end(unpack.f_locals.get("next_batch"), offset))


def _batch_end(batch: Any, offset: int) -> int | None:
    base = getattr(batch, "base_offset", None)
    end = getattr(batch, "next_offset", None)
    if isinstance(base, int) and isinstance(end, int) and base <= offset < end:
        return end
    return None


async def fetch(consumer: AIOKafkaConsumer, *partitions: TopicPartition,
                **options: Any) -> tuple[dict[TopicPartition, list[Any]], Unreadable | None]:
    """``consumer.getmany(*partitions, **options)`` and None; when it fails on a batch that does not
    decode, what it had drained (to be handled as any fetch) and the batch. Other failures raise."""
    try:
        return await consumer.getmany(*partitions, **options), None
    except Exception as exc:
        found = salvage(exc)
        if found is None:
            raise
        return found.taken, found


class Stopped:
    """The partitions one consumer is stopped at, each at a batch that does not decode: seeked back
    to the batch and paused, 1 in ``gauge`` (labels: topic, partition), logged once per batch."""

    def __init__(self, gauge: Gauge, log: Any) -> None:
        self._gauge = gauge
        self._log = log
        self.at: dict[TopicPartition, int] = {}

    def stop(self, consumer: AIOKafkaConsumer, found: Unreadable, **context: Any) -> None:
        """Stop ``found.tp`` at the batch; ``context`` goes into the log line."""
        tp = found.tp
        with contextlib.suppress(IllegalStateError):  # no longer assigned
            consumer.seek(tp, found.offset)  # aiokafka would move past what it read before it
            consumer.pause(tp)
        self._gauge.labels(tp.topic, str(tp.partition)).set(1)
        if self.at.get(tp) != found.offset:
            self.at[tp] = found.offset
            self._log.error("partition_unreadable", topic=tp.topic, partition=tp.partition, offset=found.offset,
                            batch_end=found.batch_end, error=repr(found.error), **context)

    def passed(self, tp: TopicPartition, end: int) -> None:
        """Records of ``tp`` before ``end`` were read. Past the batch ``tp`` was stopped at (re-read
        after a rewind, the batch was readable this time -- a good copy leads now -- or is gone), it
        is stopped no longer: gauge removed, logged once."""
        at = self.at.get(tp)
        if at is not None and end > at:
            self.forget(tp)
            self._log.info("partition_readable", topic=tp.topic, partition=tp.partition, offset=at)

    def forget(self, tp: TopicPartition) -> None:
        """``tp`` is no longer this consumer's (revoked): its next owner finds the batch again."""
        self.at.pop(tp, None)
        with contextlib.suppress(KeyError):
            self._gauge.remove(tp.topic, str(tp.partition))
