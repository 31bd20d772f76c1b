"""Which offset of a partition may be committed: only a prefix whose outputs the broker acknowledged.

A feature worker hands its batches to the publisher in offset order and registers each batch here
with the future that resolves once every decision (or DLQ write) of the batch is acknowledged.
Acknowledgements can arrive out of order (different output partitions); the committable offset
only moves over the longest acknowledged prefix, so a commit never skips an unfinished record.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class _Handed:
    """One batch handed off: its end offset, size, when, and whether the broker acknowledged it."""

    __slots__ = ("ack", "acked", "end", "records", "since")

    def __init__(self, end: int, records: int, ack: asyncio.Future[None] | None) -> None:
        self.end = end
        self.records = records
        self.since = time.monotonic()
        self.ack = ack
        self.acked = ack is None or (ack.done() and not ack.cancelled() and ack.exception() is None)


class OffsetTracker:
    """Per-partition bookkeeping of handed-off batches and their broker acknowledgements."""

    __slots__ = ("_committed", "_done_end", "_failed", "_idle", "_outstanding", "_pending", "_registered_end",
                 "partition")

    def __init__(self, partition: int, start: int = -1) -> None:
        self.partition = partition
        self._pending: deque[_Handed] = deque()  # the first one, if any, is not acknowledged
        self._outstanding = 0           # records of the pending batches
        self._done_end = start          # next offset to consume after the acknowledged prefix
        self._registered_end = start    # next offset after the last batch handed to the publisher
        self._committed = start         # last offset committed to the group (a "next offset")
        self._failed: BaseException | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def register(self, end_offset: int, ack: asyncio.Future[None] | None, records: int = 1) -> None:
        """A batch of ``records`` whose last offset is ``end_offset - 1`` was handed off; ``ack``
        resolves when done."""
        if end_offset <= self._registered_end:
            raise ValueError(f"partition {self.partition}: offsets must increase "
                             f"({end_offset} <= {self._registered_end})")
        self._registered_end = end_offset
        entry = _Handed(end_offset, records, ack)
        self._pending.append(entry)
        self._outstanding += records
        if entry.acked:
            self._advance()
            return
        assert ack is not None
        self._idle.clear()
        ack.add_done_callback(lambda fut: self._on_ack(entry, fut))

    def _on_ack(self, entry: _Handed, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return  # the batch was abandoned (shutdown); its offsets stay uncommitted
        exc = fut.exception()
        if exc is not None:
            self._failed = exc
            self._idle.set()  # wake waiters: they see the failure
            return
        entry.acked = True
        self._advance()

    def _advance(self) -> None:
        pending = self._pending
        while pending and pending[0].acked:
            entry = pending.popleft()
            self._done_end = entry.end
            self._outstanding -= entry.records
        if not pending:
            self._idle.set()

    @property
    def done_end(self) -> int:
        """Every offset below this one has its outputs acknowledged (-1: nothing yet)."""
        return self._done_end

    @property
    def registered_end(self) -> int:
        """Every offset below this one was handed to the publisher (-1: nothing yet)."""
        return self._registered_end

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def outstanding(self) -> int:
        """Records handed off that cannot be committed yet: not acknowledged, or after one that is not."""
        return self._outstanding

    @property
    def oldest_ack(self) -> asyncio.Future[None] | None:
        """The acknowledgement the commits wait for: the oldest batch's not acknowledged (None: none)."""
        return self._pending[0].ack if self._pending else None

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest batch not acknowledged was handed off (0: none)."""
        return max(0.0, now - self._pending[0].since) if self._pending else 0.0

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    def to_commit(self) -> int | None:
        """The offset to commit now, or None when nothing new is done since the last commit."""
        if self._done_end > self._committed:
            return self._done_end
        return None

    def mark_committed(self, offset: int) -> None:
        self._committed = max(self._committed, offset)

    @property
    def committed(self) -> int:
        return self._committed

    async def wait_acked(self, timeout_s: float | None = None) -> bool:
        """Wait until every registered batch is acknowledged; False on timeout or failure."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._pending and self._failed is None:
                    await self._idle.wait()
                    if self._pending and self._failed is None:
                        self._idle.clear()
        except TimeoutError:
            return False
        return not self._pending and self._failed is None
