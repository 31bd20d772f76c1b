"""Bounded mailboxes: a full mailbox makes the sender wait; nothing is dropped, nothing grows.

An actor is an asyncio task that reads its :class:`Mailbox`. Senders either ``await put()``
(waits while full, optionally with a deadline -> :class:`BackpressureTimeout`) or call
``try_put()`` and, when it returns ``False``, pause their source (a Kafka partition) and
``await wait_not_full()`` before resuming. Space freed by the consumer goes to the waiting
senders in arrival order: a slot handed to a waiting sender is reserved for it, so a newcomer
cannot overtake it and the depth never exceeds ``maxsize``.

Shutdown is ``close()`` then ``drained()``: no more puts, the actor reads what is left, and the
getter sees :class:`MailboxClosed` once the mailbox is closed *and* empty.

Request/reply goes through :func:`ask` and :class:`Request`. The mailbox remembers every
request that has not been answered, whether still queued or already taken by the actor, so
when the actor dies the callers get :class:`ActorDied` at once instead of hanging:

- ``fail_pending(cause)`` -- the actor died but will be restarted: every unanswered request
  (and every sender blocked with a request) fails; plain messages stay for the next incarnation.
- ``fail(cause)`` -- the actor is gone for good: every waiter (senders, getters, ``drained()``)
  and every request fails with ``ActorDied``; the undelivered plain messages are returned.

Observable for metrics: ``depth``, ``maxsize``, ``high_watermark``, ``puts_total``,
``gets_total``, ``put_waits_total`` and ``put_wait_seconds_total`` (time senders spent waiting
for space, in ``put()`` or ``wait_not_full()``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from fraudactors.errors import ActorDied, BackpressureTimeout, MailboxClosed

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")

__all__ = ["Mailbox", "Request", "ask"]


class Request(Generic[P, R]):
    """A message that expects a reply: the actor answers with ``resolve()`` or ``reject()``.

    Answering a request whose caller already gave up (cancelled, or failed by the mailbox) is a
    no-op, so the actor never needs to check. Abandoned requests are skipped by ``get()``.
    """

    __slots__ = ("payload", "reply")

    def __init__(self, payload: P, reply: asyncio.Future[R]) -> None:
        self.payload = payload
        self.reply = reply

    def resolve(self, value: R) -> None:
        if not self.reply.done():
            self.reply.set_result(value)

    def reject(self, exc: BaseException) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)

    @property
    def abandoned(self) -> bool:
        """True once the caller has its answer or gave up; the actor may skip the work."""
        return self.reply.done()

    def __repr__(self) -> str:
        return f"Request({self.payload!r}, done={self.reply.done()})"


class _Putter:
    __slots__ = ("fut", "item")

    def __init__(self, fut: asyncio.Future[bool], item: Any) -> None:
        self.fut = fut
        self.item = item


class _Getter:
    __slots__ = ("fut", "need")

    def __init__(self, fut: asyncio.Future[bool], need: int) -> None:
        self.fut = fut
        self.need = need


class Mailbox(Generic[T]):
    """A bounded FIFO between asyncio tasks of one event loop."""

    def __init__(self, maxsize: int, name: str = "") -> None:
        if maxsize < 1:
            raise ValueError(f"mailbox maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.name = name
        self._items: deque[T] = deque()
        self._reserved = 0  # slots granted to woken senders that have not appended yet
        self._putters: deque[_Putter] = deque()
        self._getters: list[_Getter] = []
        self._space_waiters: list[tuple[asyncio.Future[None], int]] = []
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._outstanding: set[Request[Any, Any]] = set()
        self._closed = False
        self._failure: BaseException | None = None  # the cause given to fail(); None = alive
        self._failed = False
        # metrics
        self.high_watermark = 0
        self.puts_total = 0
        self.gets_total = 0
        self.put_waits_total = 0
        self.put_wait_seconds_total = 0.0

    # ------------------------------------------------------------------ state
    @property
    def depth(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) + self._reserved >= self.maxsize

    def empty(self) -> bool:
        return not self._items

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def waiting_senders(self) -> int:
        return sum(1 for p in self._putters if not p.fut.done())

    @property
    def outstanding_requests(self) -> int:
        return sum(1 for r in self._outstanding if not r.reply.done())

    def __repr__(self) -> str:
        state = "failed" if self._failed else "closed" if self._closed else "open"
        return f"Mailbox({self.name!r}, depth={self.depth}/{self.maxsize}, {state})"

    # ------------------------------------------------------------------ send
    async def put(self, item: T, timeout: float | None = None) -> None:  # noqa: ASYNC109 (contract)
        """Append ``item``, waiting while the mailbox is full.

        Raises :class:`BackpressureTimeout` when no space came within ``timeout`` seconds (the
        item was not added), :class:`MailboxClosed` once closed, :class:`ActorDied` once failed.
        """
        self._check_sendable()
        if self._putters or self.full():
            await self._wait_for_slot(item, timeout)
            self._reserved -= 1
            try:
                self._check_sendable()
            except BaseException:
                self._grant_putters()
                raise
        self._append(item)

    def try_put(self, item: T) -> bool:
        """Append ``item`` if there is space now; ``False`` when full (the caller pauses its source)."""
        self._check_sendable()
        if self._putters or self.full():
            return False
        self._append(item)
        return True

    async def wait_not_full(self, below: int | None = None) -> None:
        """Return once a ``try_put`` can succeed (depth < ``below``, default ``maxsize``).

        ``below`` gives hysteresis: pause at full, resume at, say, half full.
        """
        limit = self.maxsize if below is None else max(1, min(below, self.maxsize))
        self._check_sendable()
        if self._has_space(limit):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, limit)
        self._space_waiters.append(entry)
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.put_waits_total += 1
        try:
            await fut
        finally:
            self.put_wait_seconds_total += loop.time() - start
            if entry in self._space_waiters:
                self._space_waiters.remove(entry)

    def _has_space(self, limit: int) -> bool:
        return not self._putters and len(self._items) + self._reserved < limit

    async def _wait_for_slot(self, item: T, timeout: float | None) -> None:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        waiter = _Putter(fut, item)
        self._putters.append(waiter)
        start = loop.time()
        self.put_waits_total += 1
        try:
            if timeout is None:
                await fut
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await fut
                except TimeoutError:
                    raise BackpressureTimeout(
                        f"mailbox {self.name!r} full ({self.maxsize}) for {timeout}s"
                    ) from None
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # The slot was granted just as we gave up: hand it to the next sender.
                self._reserved -= 1
                self._grant_putters()
            else:
                fut.cancel()
                try:
                    self._putters.remove(waiter)
                except ValueError:
                    pass
                self._after_putter_left()
            raise
        finally:
            self.put_wait_seconds_total += loop.time() - start

    def _check_sendable(self) -> None:
        if self._failed:
            raise self._died()
        if self._closed:
            raise MailboxClosed(f"mailbox {self.name!r} is closed")

    def _append(self, item: T) -> None:
        self._items.append(item)
        self.puts_total += 1
        depth = len(self._items)
        if depth > self.high_watermark:
            self.high_watermark = depth
        if isinstance(item, Request):
            self._track(item)
        if self._getters:
            self._wake_getters()

    def _track(self, request: Request[Any, Any]) -> None:
        outstanding = self._outstanding
        outstanding.add(request)

        def answered(_fut: asyncio.Future[Any]) -> None:
            outstanding.discard(request)

        request.reply.add_done_callback(answered)

    # ------------------------------------------------------------------ receive
    async def get(self) -> T:
        """Take the oldest item; waits while empty. :class:`MailboxClosed` once closed and empty."""
        while True:
            batch = self._take(1)
            if batch:
                return batch[0]
            self._check_receivable()
            await self._wait_for_items(1, None)

    async def get_batch(self, max_items: int, linger_s: float) -> list[T]:
        """Wait for the first item, then up to ``linger_s`` for more; at most ``max_items``.

        Items stay in the mailbox while lingering, so a cancelled ``get_batch`` loses nothing.
        Returns early when ``max_items`` are there (or the mailbox is full, or it is closed).
        """
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        loop = asyncio.get_running_loop()
        target = min(max_items, self.maxsize)
        while True:
            if not self._items:
                self._check_receivable()
                await self._wait_for_items(1, None)
                continue
            if linger_s > 0 and len(self._items) < target and not self._closed:
                deadline = loop.time() + linger_s
                while len(self._items) < target and not self._closed:
                    if not await self._wait_for_items(target, deadline):
                        break
            batch = self._take(max_items)
            if batch:
                return batch

    async def _wait_for_items(self, need: int, deadline: float | None) -> bool:
        """Wait until ``need`` items are queued (or close/fail); False when the deadline passed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        getter = _Getter(fut, need)
        self._getters.append(getter)
        timer = None if deadline is None else loop.call_at(deadline, _resolve, fut, False)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.result():
                self._wake_getters()  # we were woken but leave: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if getter in self._getters:
                self._getters.remove(getter)

    def _check_receivable(self) -> None:
        if self._failed:
            raise self._died()
        if self._closed:
            raise MailboxClosed(f"mailbox {self.name!r} is closed and drained")

    def _take(self, max_items: int) -> list[T]:
        out: list[T] = []
        items = self._items
        while items and len(out) < max_items:
            item = items.popleft()
            if isinstance(item, Request) and item.reply.done():
                continue  # the caller gave up; skip the work
            out.append(item)
        if out:
            self.gets_total += len(out)
        self._after_removal()
        return out

    def _after_removal(self) -> None:
        if self._putters:
            self._grant_putters()
        if self._space_waiters:
            self._wake_space_waiters()
        if self._closed and not self._items and self._drain_waiters:
            for fut in self._drain_waiters:
                _resolve(fut, None)
            self._drain_waiters.clear()

    def _after_putter_left(self) -> None:
        if self._putters:
            self._grant_putters()
        if self._space_waiters:
            self._wake_space_waiters()

    def _grant_putters(self) -> None:
        while self._putters and len(self._items) + self._reserved < self.maxsize:
            waiter = self._putters.popleft()
            if waiter.fut.done():
                continue
            waiter.fut.set_result(True)
            self._reserved += 1

    def _wake_space_waiters(self) -> None:
        keep = []
        for fut, limit in self._space_waiters:
            if fut.done():
                continue
            if self._has_space(limit):
                fut.set_result(None)
            else:
                keep.append((fut, limit))
        self._space_waiters = keep

    def _wake_getters(self) -> None:
        n = len(self._items)
        keep = []
        for getter in self._getters:
            if getter.fut.done():
                continue
            if getter.need <= n or self._closed:
                getter.fut.set_result(True)
            else:
                keep.append(getter)
        self._getters = keep

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """No more puts. Blocked senders get :class:`MailboxClosed` now; getters drain the rest."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._putters:
            _fail(waiter.fut, MailboxClosed(f"mailbox {self.name!r} closed while waiting for space"))
        self._putters.clear()
        for fut, _limit in self._space_waiters:
            _fail(fut, MailboxClosed(f"mailbox {self.name!r} closed while waiting for space"))
        self._space_waiters.clear()
        self._wake_getters()
        self._after_removal()

    async def drained(self) -> None:
        """Return once the mailbox is closed and every item was taken. ActorDied if it failed."""
        if self._failed:
            raise self._died()
        if self._closed and not self._items:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._drain_waiters:
                self._drain_waiters.remove(fut)

    def fail(self, cause: BaseException | None = None) -> list[T]:
        """The actor is gone for good: every waiter and every request gets :class:`ActorDied` now.

        Returns the undelivered plain messages (requests among them were failed) so the owner
        can account for them -- nothing disappears silently. Idempotent.
        """
        if self._failed:
            return []
        self._failed = True
        self._closed = True
        self._failure = cause
        leftover = [item for item in self._items if not isinstance(item, Request)]
        self._items.clear()
        for request in list(self._outstanding):
            request.reject(self._died())
        self._outstanding.clear()
        for waiter in self._putters:
            _fail(waiter.fut, self._died())
        self._putters.clear()
        for fut, _limit in self._space_waiters:
            _fail(fut, self._died())
        self._space_waiters.clear()
        for getter in self._getters:
            _resolve(getter.fut, True)  # they re-check and raise ActorDied
        self._getters.clear()
        for fut in self._drain_waiters:
            _fail(fut, self._died())
        self._drain_waiters.clear()
        return leftover

    def fail_pending(self, cause: BaseException | None = None) -> int:
        """The actor died and will be restarted: fail every unanswered request now.

        Requests still queued are removed (freeing their slots); senders blocked with a request
        fail too. Plain messages stay queued for the next incarnation. Returns how many failed.
        """
        failed = 0
        for request in list(self._outstanding):
            if not request.reply.done():
                request.reject(self._died(cause))
                failed += 1
        self._outstanding.clear()
        keep: deque[_Putter] = deque()
        for waiter in self._putters:
            if isinstance(waiter.item, Request) and not waiter.fut.done():
                waiter.item.reject(self._died(cause))
                _fail(waiter.fut, self._died(cause))
                failed += 1
            else:
                keep.append(waiter)
        self._putters = keep
        if any(isinstance(item, Request) for item in self._items):
            self._items = deque(item for item in self._items if not isinstance(item, Request))
        self._after_removal()
        return failed

    def _died(self, cause: BaseException | None = None) -> ActorDied:
        cause = cause if cause is not None else self._failure
        reason = f": {cause!r}" if cause is not None else ""
        err = ActorDied(f"actor behind mailbox {self.name!r} died{reason}")
        err.__cause__ = cause
        return err

    def try_put_many(self, items: Iterable[T]) -> int:
        """Append as many of ``items`` as fit now; returns how many were taken (0 when full)."""
        self._check_sendable()
        count = 0
        for item in items:
            if self._putters or self.full():
                break
            self._append(item)
            count += 1
        return count


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


async def ask(
    mailbox: Mailbox[Request[P, R]], payload: P, *, timeout: float | None = None  # noqa: ASYNC109
) -> R:
    """Send ``Request(payload)`` and wait for the reply.

    ``timeout`` bounds the wait for mailbox space (:class:`BackpressureTimeout`); bound the
    whole call with ``asyncio.timeout``. :class:`ActorDied` at once if the actor dies first.
    """
    loop = asyncio.get_running_loop()
    request: Request[P, R] = Request(payload, loop.create_future())
    await mailbox.put(request, timeout=timeout)
    return await request.reply
