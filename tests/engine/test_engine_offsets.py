"""OffsetTracker: commits move only over the acknowledged prefix."""

from __future__ import annotations

import asyncio

import pytest

from fraudactors.engine.offsets import OffsetTracker


async def test_commit_waits_for_every_earlier_batch() -> None:
    loop = asyncio.get_running_loop()
    tracker = OffsetTracker(3)
    first: asyncio.Future[None] = loop.create_future()
    second: asyncio.Future[None] = loop.create_future()
    tracker.register(10, first)
    tracker.register(25, second)
    assert tracker.to_commit() is None
    second.set_result(None)
    await asyncio.sleep(0)
    assert tracker.to_commit() is None, "a later ack must not commit past an unacknowledged batch"
    first.set_result(None)
    await asyncio.sleep(0)
    assert tracker.to_commit() == 25
    tracker.mark_committed(25)
    assert tracker.to_commit() is None
    assert await tracker.wait_acked(timeout_s=1.0)


async def test_failed_ack_blocks_commit_and_is_reported() -> None:
    loop = asyncio.get_running_loop()
    tracker = OffsetTracker(0)
    ack: asyncio.Future[None] = loop.create_future()
    tracker.register(5, ack)
    ack.set_exception(RuntimeError("broker said no"))
    await asyncio.sleep(0)
    assert tracker.to_commit() is None
    assert isinstance(tracker.failed, RuntimeError)
    assert not await tracker.wait_acked(timeout_s=1.0)


async def test_wait_acked_times_out_while_pending() -> None:
    tracker = OffsetTracker(0)
    tracker.register(1, asyncio.get_running_loop().create_future())
    assert not await tracker.wait_acked(timeout_s=0.01)
    assert tracker.in_flight == 1


def test_offsets_must_increase() -> None:
    tracker = OffsetTracker(0)
    tracker.register(4, None)
    assert tracker.to_commit() == 4
    with pytest.raises(ValueError):
        tracker.register(4, None)


async def test_an_abandoned_batch_keeps_its_offsets_and_those_after_it_uncommitted() -> None:
    loop = asyncio.get_running_loop()
    tracker = OffsetTracker(0, start=100)
    abandoned: asyncio.Future[None] = loop.create_future()
    later: asyncio.Future[None] = loop.create_future()
    tracker.register(110, abandoned)
    tracker.register(120, later)
    abandoned.cancel()  # shutdown gave up on the batch: its outputs may never have been written
    later.set_result(None)
    await asyncio.sleep(0)
    assert tracker.to_commit() is None
    assert tracker.done_end == 100 and tracker.in_flight == 2
    assert tracker.failed is None


async def test_a_batch_registered_with_an_ack_that_already_failed_or_was_cancelled_is_not_done() -> None:
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[None] = loop.create_future()
    failed.set_exception(RuntimeError("broker said no"))
    tracker = OffsetTracker(0)
    tracker.register(5, failed)
    await asyncio.sleep(0)
    assert tracker.to_commit() is None and tracker.done_end == -1 and tracker.in_flight == 1
    assert isinstance(tracker.failed, RuntimeError)
    assert not await tracker.wait_acked(timeout_s=1.0)

    cancelled: asyncio.Future[None] = loop.create_future()
    cancelled.cancel()
    tracker = OffsetTracker(0)
    tracker.register(5, cancelled)
    await asyncio.sleep(0)
    assert tracker.to_commit() is None and tracker.done_end == -1 and tracker.in_flight == 1


def test_the_committed_offset_never_moves_back() -> None:
    tracker = OffsetTracker(0)
    tracker.register(25, None)
    tracker.mark_committed(25)
    tracker.mark_committed(10)  # a late confirmation of an older commit
    assert tracker.committed == 25
    assert tracker.to_commit() is None
    tracker.register(30, None)
    assert tracker.to_commit() == 30


async def test_a_waiter_already_waiting_sees_a_failed_ack_at_once() -> None:
    loop = asyncio.get_running_loop()
    tracker = OffsetTracker(0)
    ack: asyncio.Future[None] = loop.create_future()
    tracker.register(5, ack)
    waiter = asyncio.create_task(tracker.wait_acked(timeout_s=3600.0))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiter.done()  # it is waiting on the pending batch
    ack.set_exception(RuntimeError("broker said no"))
    for _ in range(5):  # a few loop turns: the failure callback, then the waiter's wake-up
        await asyncio.sleep(0)
    # Done within those turns, not at its hour-long timeout, and it reports the failure.
    assert waiter.done()
    assert waiter.result() is False


async def test_outstanding_records_and_the_oldest_unacknowledged_batch() -> None:
    """What holds back the commits: the records of every batch from the oldest one not
    acknowledged on, that batch's acknowledgement and how long it has waited."""
    loop = asyncio.get_running_loop()
    tracker = OffsetTracker(0)
    assert tracker.outstanding == 0 and tracker.oldest_ack is None and tracker.oldest_age(loop.time()) == 0.0
    first: asyncio.Future[None] = loop.create_future()
    second: asyncio.Future[None] = loop.create_future()
    tracker.register(10, first, records=10)
    tracker.register(14, second, records=4)
    tracker.register(20, None, records=6)
    assert tracker.outstanding == 20 and tracker.oldest_ack is first
    import time

    assert 0.0 <= tracker.oldest_age(time.monotonic()) < 5.0
    assert tracker.oldest_age(time.monotonic() + 100) >= 100
    second.set_result(None)
    await asyncio.sleep(0)
    assert tracker.outstanding == 20 and tracker.oldest_ack is first, "acknowledged behind one that is not"
    first.set_result(None)
    await asyncio.sleep(0)
    assert tracker.outstanding == 0 and tracker.oldest_ack is None and tracker.done_end == 20
