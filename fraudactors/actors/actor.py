"""An actor as a supervised child: a body that serves a mailbox, and ActorDied for its callers.

``actor_child(id, mailbox, body)`` wraps ``body(task_status)`` into a :class:`ChildSpec` that
keeps the promise "a caller waiting on an actor that died gets a typed error at once":

- the body raises or is cancelled and the child will be restarted (PERMANENT / TRANSIENT): every
  unanswered :class:`Request` -- queued or already taken -- fails with ``ActorDied``
  (``Mailbox.fail_pending``); plain messages stay queued for the next incarnation;
- the child will not be restarted (TEMPORARY, or TRANSIENT returning normally): the mailbox is
  failed for good (``Mailbox.fail``) and every sender, getter and caller gets ``ActorDied``.

A final shutdown (the supervisor stops, the budget is spent) cancels the body like a restart
does, so owners that want the mailbox failed for good call ``mailbox.fail()`` themselves after
the supervisor returned (or close and drain it first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fraudactors.actors.mailbox import Mailbox
from fraudactors.actors.supervisor import ChildSpec, Restart
from fraudactors.actors.taskstatus import TaskStatus
from fraudactors.logging import get_logger

__all__ = ["actor_child", "last_step"]

_log = get_logger(actor="supervisor")


async def last_step(cleanup: Awaitable[None], wait_s: float) -> None:
    """A child's cleanup, waited for up to ``wait_s`` more when the child is cancelled meanwhile.

    A supervisor stops its children in reverse start order by cancelling each and waiting up to
    its ``shutdown_timeout``: a child whose cleanup merely sat under ``asyncio.shield`` ended at
    that cancel while the cleanup went on unwatched, and the supervisor went on to stop the
    children the cleanup still needed (the ingestor's drain and last commit need the
    publisher's acknowledgements). Here the child ends with its cleanup, or ``wait_s`` after the
    cancel (the cleanup then goes on unwatched, so that the children after it still get their
    share of the stop's budget); a second cancel gives up at once.
    """
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_cleanup_done)  # nobody is left to raise its error to: log it
        if not task.done():
            await asyncio.wait({task}, timeout=wait_s)
            if not task.done():
                _log.warning("cleanup_unfinished", cleanup=_name(task), waited_s=wait_s)
        raise


def _name(task: asyncio.Task[None]) -> str:
    return str(getattr(task.get_coro(), "__qualname__", task.get_name()))


def _cleanup_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("cleanup_failed", cleanup=_name(task), error=repr(task.exception()))


def actor_child(
    id: str,
    mailbox: Mailbox[Any],
    body: Callable[[TaskStatus], Awaitable[None]],
    *,
    restart: Restart = Restart.PERMANENT,
    start_timeout: float = 30.0,
    shutdown_timeout: float = 10.0,
) -> ChildSpec:
    async def start(task_status: TaskStatus) -> None:
        try:
            await body(task_status)
        except BaseException as exc:
            cause = None if isinstance(exc, asyncio.CancelledError) else exc
            if restart is Restart.TEMPORARY:
                _fail_for_good(id, mailbox, cause)
            else:
                mailbox.fail_pending(cause)
            raise
        if restart is not Restart.PERMANENT:
            _fail_for_good(id, mailbox, None)

    return ChildSpec(id=id, start=start, restart=restart, start_timeout=start_timeout,
                     shutdown_timeout=shutdown_timeout)


def _fail_for_good(actor: str, mailbox: Mailbox[Any], cause: BaseException | None) -> None:
    leftover = mailbox.fail(cause)
    if leftover:
        get_logger(actor=actor).error("actor_mailbox_abandoned", mailbox=mailbox.name, undelivered=len(leftover))
