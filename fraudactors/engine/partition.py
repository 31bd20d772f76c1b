"""One assigned partition, on the ingestor's side: its mailbox, offset tracker and flow control.

The ingestor routes fetched records into the partition's mailbox. When the mailbox is full the rest
of a fetch waits in a small overflow and the partition is paused at the consumer -- backpressure at
the Kafka edge, never a buffer without end -- until the mailbox is half empty again. It is paused
the same way while more than ``engine.max_unacknowledged`` of its records are handed to the
publisher but cannot be committed (a publish being retried holds back those after it), until half
of them are: what a broker that keeps refusing one record holds stays bounded.

The partition's :class:`FeatureWorker` is a child of the ingestor's worker supervisor. A crashed
worker halts its partition (no fetching while the supervisor backs off); the restart rewinds it: a
fresh mailbox, the consumer seeked to the end of the last batch handed to the publisher. Records
taken but not handed off are fetched again; nothing is skipped. A partition stopped at a batch that
does not decode (``unreadable``) is no longer stopped after the rewind: it is re-read like any other
-- paused and resumed by its mailbox, watched by the watchdog -- up to the batch, and stops there
again (the ingestor's :class:`~fraudactors.engine.unreadable.Stopped` keeps its gauge at 1 meanwhile
and does not log the same batch twice). Kept stopped, a re-read that filled the mailbox before the
batch would stay paused for good, its records neither decided nor committed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

from fraudactors.actors import Mailbox
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.offsets import OffsetTracker
from fraudactors.engine.worker import FeatureWorker, Item


@dataclass(eq=False)
class Partition:
    tp: TopicPartition
    consumer: AIOKafkaConsumer
    metrics: EngineMetrics
    mailbox: Mailbox[Item]
    tracker: OffsetTracker
    overflow: list[Item] = field(default_factory=list)
    paused: bool = False    # by backpressure (its mailbox is full)
    held: bool = False      # by backpressure (too many of its records unacknowledged)
    halted: bool = False    # its worker crashed; the restart rewinds it
    closing: bool = False   # revoked or shutting down: no more records go in
    unreadable: int | None = None  # stopped at this offset by the ingestor: a batch there does not decode
    first_offset: int | None = None
    fetched_end: int = -1   # next offset after the last record routed to the worker
    position: int = -1      # the consumer's position, refreshed by housekeeping
    progress_mark: tuple[int, int] = (-1, -1)
    progress_at: float = field(default_factory=time.monotonic)
    starts: int = 0         # of its worker
    worker: FeatureWorker | None = None  # the running one

    @property
    def number(self) -> int:
        return self.tp.partition

    @property
    def child_id(self) -> str:
        """The worker's id under the supervisor, its mailbox's name and its metrics label."""
        return f"features-{self.tp.partition}"

    def route(self, items: list[Item]) -> bool:
        """Into the mailbox what fits, the rest into the overflow; True when this paused the partition."""
        if self.closing or self.halted:
            return False  # fetched again by the next owner / after the rewind
        if self.first_offset is None:
            self.first_offset = items[0][0].offset
        self.fetched_end = items[-1][0].offset + 1
        if self.overflow:
            self.overflow.extend(items)
            return False
        taken = self.mailbox.try_put_many(items)
        if taken == len(items):
            return False
        self.overflow = items[taken:]
        if self.paused:
            return False
        self.consumer.pause(self.tp)
        self.paused = True
        self._show_paused()
        return True

    def resume_if_drained(self) -> None:
        """Resume a paused partition once its mailbox is half empty and the overflow went in."""
        if not self.paused or self.closing or self.halted:
            return
        mailbox = self.mailbox
        if mailbox.depth > mailbox.maxsize // 2:
            return
        if self.overflow:
            taken = mailbox.try_put_many(self.overflow)
            del self.overflow[:taken]
        if not self.overflow:
            self.paused = False
            self._resume()

    def hold_if_unacknowledged(self, limit: int) -> bool:
        """Pause the partition while more than ``limit`` of its records handed off cannot be
        committed yet; resume once at most half of that are. True when this paused it."""
        outstanding = self.tracker.outstanding
        if not self.held:
            if outstanding <= limit or self.closing or self.halted:
                return False
            self.consumer.pause(self.tp)
            self.held = True
            self._show_paused()
            return True
        if outstanding <= limit // 2:
            self.held = False
            self._resume()
        return False

    def waits_on(self) -> bool:
        """Its progress waits for the broker: its worker waits in ``send_many`` (for room in the
        publish window), or the batch its commits wait for is not acknowledged yet -- in the
        producer's first attempt (up to its request timeout, before the publisher hears of a
        failure) or sent again. A new consumer would not bring the acknowledgement sooner; a batch
        never acknowledged shows in ``fraudactors_unacknowledged_age_seconds`` and pages."""
        if self.worker is not None and self.worker.handing_off:
            return True
        ack = self.tracker.oldest_ack
        return ack is not None and not ack.done()

    def _resume(self) -> None:
        """Fetch again if nothing else keeps the partition paused."""
        if not (self.paused or self.held or self.closing or self.halted) and self.unreadable is None:
            self.consumer.resume(self.tp)
        self._show_paused()

    def halt(self) -> None:
        """The worker crashed: stop fetching the partition until its restart rewinds it."""
        self.halted = True
        self.overflow.clear()
        with contextlib.suppress(IllegalStateError):  # no longer assigned
            self.consumer.pause(self.tp)

    def rewind(self) -> int:
        """Before a restarted worker runs: a fresh mailbox, and the consumer back at the end of the
        last batch handed off (or the first record routed), not stopped at a batch that does not
        decode until the re-read reaches it. Returns that position (-1: none)."""
        old = self.mailbox
        self.mailbox = Mailbox(old.maxsize, old.name)
        old.close()
        self.overflow.clear()
        position = self.tracker.registered_end
        if position < 0:
            position = self.first_offset if self.first_offset is not None else -1
        with contextlib.suppress(IllegalStateError):
            if position >= 0:
                self.consumer.seek(self.tp, position)
                self.fetched_end = position
            if not self.held:
                self.consumer.resume(self.tp)
        self.halted = False
        self.unreadable = None  # the re-read finds the batch again
        self.paused = False
        self._show_paused()
        return position

    def forget_metrics(self) -> None:
        label = str(self.tp.partition)
        m = self.metrics
        for gauge, value in ((m.consumer_lag, label), (m.partition_paused, label), (m.mailbox_depth, self.child_id),
                             (m.unacknowledged_age, label)):
            with contextlib.suppress(KeyError):
                gauge.remove(value)

    def _show_paused(self) -> None:
        self.metrics.partition_paused.labels(str(self.tp.partition)).set(1 if self.paused or self.held else 0)
