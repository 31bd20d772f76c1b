"""Bounded mailbox: backpressure without loss, close-then-drain, and typed errors on actor death."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from fraudactors.actors import Mailbox, Request, ask
from fraudactors.errors import ActorDied, BackpressureTimeout, MailboxClosed


async def wait_until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait for a state the code under test reaches on its own (a condition, with a deadline)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 (observing internal state, no event to wait on)
            await asyncio.sleep(0.001)


async def test_fifo_depth_and_try_put_when_full() -> None:
    mb: Mailbox[int] = Mailbox(3, name="m")
    for i in range(3):
        assert mb.try_put(i)
    assert mb.depth == 3 and mb.full()
    assert mb.try_put(99) is False
    assert [await mb.get() for _ in range(3)] == [0, 1, 2]
    assert mb.depth == 0 and not mb.full()
    assert mb.puts_total == 3 and mb.gets_total == 3 and mb.high_watermark == 3


async def test_slow_consumer_backpressures_producer_and_loses_nothing() -> None:
    mb: Mailbox[int] = Mailbox(4, name="slow")
    total = 50
    produced = 0

    async def producer() -> None:
        nonlocal produced
        for i in range(total):
            await mb.put(i)
            produced += 1

    task = asyncio.create_task(producer())
    received: list[int] = []
    while len(received) < total:
        if not task.done():
            await wait_until(lambda: mb.waiting_senders == 1 or task.done())
        assert mb.depth <= mb.maxsize
        if mb.waiting_senders:
            # The producer is parked while the mailbox is full: it has not run ahead.
            assert mb.full() and not task.done()
            assert produced == len(received) + mb.depth
        received.append(await mb.get())
    await task
    assert received == list(range(total))
    assert mb.high_watermark == mb.maxsize
    assert mb.put_waits_total >= total - mb.maxsize
    assert mb.put_wait_seconds_total > 0.0


async def test_waiting_senders_are_served_in_order_and_cannot_be_overtaken() -> None:
    mb: Mailbox[str] = Mailbox(1)
    mb.try_put("first")
    a = asyncio.create_task(mb.put("a"))
    await wait_until(lambda: mb.waiting_senders == 1)
    b = asyncio.create_task(mb.put("b"))
    await wait_until(lambda: mb.waiting_senders == 2)
    assert await mb.get() == "first"
    # The freed slot is reserved for "a": a newcomer cannot take it.
    assert mb.try_put("late") is False
    assert await mb.get() == "a"
    assert await mb.get() == "b"
    await asyncio.gather(a, b)
    assert mb.depth == 0


async def test_one_freed_slot_admits_one_of_many_blocked_senders_never_more_than_maxsize() -> None:
    mb: Mailbox[int] = Mailbox(2)
    mb.try_put(0)
    mb.try_put(1)
    senders = [asyncio.create_task(mb.put(i)) for i in range(2, 6)]
    await wait_until(lambda: mb.waiting_senders == 4)
    received = [await mb.get()]
    for _ in range(10):  # let every woken sender run: only the one granted the freed slot appends
        await asyncio.sleep(0)
        assert mb.depth <= mb.maxsize and mb.high_watermark <= mb.maxsize
    assert mb.depth == 2 and mb.waiting_senders == 3
    while len(received) < 6:
        received.append(await mb.get())
        for _ in range(3):
            await asyncio.sleep(0)
            assert mb.depth <= mb.maxsize and mb.high_watermark <= mb.maxsize
    await asyncio.gather(*senders)
    assert received == list(range(6)) and mb.depth == 0 and mb.high_watermark == 2


async def test_put_timeout_raises_backpressure_timeout_and_adds_nothing() -> None:
    mb: Mailbox[int] = Mailbox(1)
    await mb.put(1)
    with pytest.raises(BackpressureTimeout) as info:
        await mb.put(2, timeout=0.01)
    assert info.value.retriable
    assert mb.waiting_senders == 0 and mb.depth == 1
    assert await mb.get() == 1
    await mb.put(3, timeout=0.01)
    assert await mb.get() == 3


async def test_cancelled_sender_passes_its_granted_slot_on() -> None:
    mb: Mailbox[str] = Mailbox(1)
    mb.try_put("x")
    a = asyncio.create_task(mb.put("a"))
    await wait_until(lambda: mb.waiting_senders == 1)
    b = asyncio.create_task(mb.put("b"))
    await wait_until(lambda: mb.waiting_senders == 2)
    assert await mb.get() == "x"  # grants the slot to "a" ...
    a.cancel()  # ... which is cancelled before it can use it
    with pytest.raises(asyncio.CancelledError):
        await a
    await b
    assert await mb.get() == "b"
    assert mb.depth == 0 and not mb.full()


async def test_wait_not_full_resumes_below_low_watermark() -> None:
    mb: Mailbox[int] = Mailbox(4)
    for i in range(4):
        mb.try_put(i)
    resumed = asyncio.create_task(mb.wait_not_full(below=2))
    await mb.get()
    await mb.get()
    await asyncio.sleep(0)
    assert not resumed.done()  # depth 2 is not below 2
    await mb.get()
    await asyncio.wait_for(resumed, 10)
    assert mb.depth == 1


async def test_get_batch_takes_what_is_there_up_to_max() -> None:
    mb: Mailbox[int] = Mailbox(16)
    assert mb.try_put_many(range(10)) == 10
    assert await mb.get_batch(4, linger_s=0) == [0, 1, 2, 3]
    assert await mb.get_batch(100, linger_s=0) == [4, 5, 6, 7, 8, 9]


async def test_get_batch_waits_for_first_then_lingers_until_full_batch() -> None:
    mb: Mailbox[int] = Mailbox(16)
    batch = asyncio.create_task(mb.get_batch(4, linger_s=60.0))
    await wait_until(lambda: bool(mb._getters))
    await mb.put(0)
    await asyncio.sleep(0)
    assert not batch.done()  # lingering for more
    for i in range(1, 6):
        await mb.put(i)
    # Returns once max_items are there, long before the linger deadline.
    assert await asyncio.wait_for(batch, 10) == [0, 1, 2, 3]
    assert mb.depth == 2


async def test_get_batch_returns_partial_batch_after_linger() -> None:
    mb: Mailbox[int] = Mailbox(16)
    await mb.put(7)
    assert await mb.get_batch(64, linger_s=0.005) == [7]


async def test_cancelled_get_batch_loses_nothing() -> None:
    mb: Mailbox[int] = Mailbox(8)
    mb.try_put_many([1, 2])
    batch = asyncio.create_task(mb.get_batch(8, linger_s=60.0))
    await wait_until(lambda: bool(mb._getters))
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    assert mb.depth == 2
    assert await mb.get_batch(8, linger_s=0) == [1, 2]


async def test_close_wakes_blocked_sender_and_idle_getter_at_once() -> None:
    full: Mailbox[int] = Mailbox(1)
    full.try_put(1)
    sender = asyncio.create_task(full.put(2))
    await wait_until(lambda: full.waiting_senders == 1)
    full.close()
    with pytest.raises(MailboxClosed):
        await sender

    empty: Mailbox[int] = Mailbox(1)
    getter = asyncio.create_task(empty.get())
    await wait_until(lambda: bool(empty._getters))
    empty.close()
    with pytest.raises(MailboxClosed):
        await getter


async def test_close_then_drain_delivers_everything_then_mailbox_closed() -> None:
    mb: Mailbox[int] = Mailbox(8)
    mb.try_put_many(range(5))
    mb.close()
    with pytest.raises(MailboxClosed):
        await mb.put(9)
    with pytest.raises(MailboxClosed):
        mb.try_put(9)
    drained = asyncio.create_task(mb.drained())
    got = await mb.get_batch(3, linger_s=60.0)  # closed: no lingering
    assert got == [0, 1, 2]
    await asyncio.sleep(0)
    assert not drained.done()
    assert await mb.get() == 3
    assert await mb.get() == 4
    await asyncio.wait_for(drained, 10)
    with pytest.raises(MailboxClosed):
        await mb.get()
    with pytest.raises(MailboxClosed):
        await mb.get_batch(4, linger_s=0)


async def test_cancellation_during_drain_propagates() -> None:
    mb: Mailbox[int] = Mailbox(8)
    mb.try_put_many(range(3))
    mb.close()

    async def drain_slowly(gate: asyncio.Event) -> None:
        while True:
            await gate.wait()
            try:
                await mb.get()
            except MailboxClosed:
                return

    gate = asyncio.Event()
    consumer = asyncio.create_task(drain_slowly(gate))
    waiter = asyncio.create_task(mb.drained())
    await wait_until(lambda: bool(mb._drain_waiters))
    waiter.cancel()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert waiter.cancelled() and consumer.cancelled()
    assert mb.depth == 3  # nothing was taken by the cancelled drain
    assert mb._drain_waiters == []


async def test_fail_wakes_every_waiter_with_actor_died_and_returns_leftovers() -> None:
    mb: Mailbox[object] = Mailbox(2, name="inference")
    mb.try_put("a")
    mb.try_put("b")
    sender = asyncio.create_task(mb.put("c"))
    space = asyncio.create_task(mb.wait_not_full())
    drained = asyncio.create_task(mb.drained())
    await wait_until(lambda: mb.waiting_senders == 1 and bool(mb._space_waiters) and bool(mb._drain_waiters))
    cause = RuntimeError("boom")
    assert mb.fail(cause) == ["a", "b"]
    for task in (sender, space, drained):
        with pytest.raises(ActorDied) as info:
            await task
        assert info.value.__cause__ is cause
    with pytest.raises(ActorDied):
        await mb.get()
    with pytest.raises(ActorDied):
        await mb.put("d")
    assert mb.fail() == []


async def test_getter_blocked_on_failed_mailbox_gets_actor_died() -> None:
    mb: Mailbox[int] = Mailbox(2)
    getter = asyncio.create_task(mb.get_batch(8, linger_s=0.0))
    await wait_until(lambda: bool(mb._getters))
    mb.fail(RuntimeError("gone"))
    with pytest.raises(ActorDied):
        await getter


async def test_ask_reply_round_trip() -> None:
    mb: Mailbox[Request[int, int]] = Mailbox(4)

    async def doubler() -> None:
        while True:
            req = await mb.get()
            req.resolve(req.payload * 2)

    actor = asyncio.create_task(doubler())
    try:
        assert await ask(mb, 21) == 42
        assert await asyncio.gather(*(ask(mb, i) for i in range(10))) == [i * 2 for i in range(10)]
    finally:
        actor.cancel()
        with pytest.raises(asyncio.CancelledError):
            await actor


async def test_caller_waiting_on_dead_actor_gets_actor_died_at_once() -> None:
    mb: Mailbox[Request[int, int]] = Mailbox(4, name="scorer")
    taken = asyncio.Event()

    async def dies_mid_request() -> None:
        await mb.get()
        taken.set()
        raise RuntimeError("model crashed")

    actor = asyncio.create_task(dies_mid_request())
    in_flight = asyncio.create_task(ask(mb, 1))
    await taken.wait()
    queued = asyncio.create_task(ask(mb, 2))
    await wait_until(lambda: mb.depth == 1)
    with pytest.raises(RuntimeError) as crash:
        await actor
    # What a supervisor-run actor does when its task dies (see actors.actor_child):
    assert mb.fail_pending(crash.value) == 2
    for call in (in_flight, queued):
        with pytest.raises(ActorDied) as info:
            await asyncio.wait_for(call, 10)
        assert info.value.__cause__ is crash.value and info.value.retriable
    assert mb.depth == 0 and not mb.failed  # the next incarnation can keep serving


async def test_a_caller_blocked_on_a_full_mailbox_of_a_dead_actor_gets_actor_died_at_once() -> None:
    mb: Mailbox[Request[int, int]] = Mailbox(1, name="scorer")
    queued = asyncio.create_task(ask(mb, 1))
    await wait_until(lambda: mb.depth == 1)
    blocked = asyncio.create_task(ask(mb, 2))  # waits for a slot, its request not yet in
    await wait_until(lambda: mb.waiting_senders == 1)
    assert mb.fail_pending(RuntimeError("model crashed")) == 2
    for call in (queued, blocked):
        with pytest.raises(ActorDied):
            await asyncio.wait_for(call, 10)
    assert mb.waiting_senders == 0 and mb.depth == 0


async def test_close_wakes_a_task_waiting_for_space() -> None:
    mb: Mailbox[int] = Mailbox(1, name="m")
    mb.try_put(1)
    waiting = asyncio.create_task(mb.wait_not_full())
    await asyncio.sleep(0)
    assert not waiting.done()
    mb.close()
    with pytest.raises(MailboxClosed):
        await asyncio.wait_for(waiting, 10)


async def test_fail_pending_keeps_plain_messages_and_blocked_plain_senders() -> None:
    mb: Mailbox[object] = Mailbox(2)
    mb.try_put("record-1")
    loop = asyncio.get_running_loop()
    req: Request[int, int] = Request(5, loop.create_future())
    mb.try_put(req)
    plain_sender = asyncio.create_task(mb.put("record-2"))
    await wait_until(lambda: mb.waiting_senders == 1)
    assert mb.fail_pending(RuntimeError("x")) == 1
    with pytest.raises(ActorDied):
        await req.reply
    await asyncio.wait_for(plain_sender, 10)  # the freed slot went to the blocked sender
    assert await mb.get_batch(8, linger_s=0) == ["record-1", "record-2"]


async def test_abandoned_request_is_skipped_by_the_actor() -> None:
    mb: Mailbox[Request[int, int]] = Mailbox(4)
    call = asyncio.create_task(ask(mb, 1))
    await wait_until(lambda: mb.depth == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    follow_up = asyncio.create_task(ask(mb, 2))
    await wait_until(lambda: mb.depth == 2)
    req = await mb.get()
    assert req.payload == 2  # the cancelled caller's request was skipped
    req.resolve(4)
    assert await follow_up == 4


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Mailbox(0)
