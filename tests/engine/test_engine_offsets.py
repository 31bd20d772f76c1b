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
