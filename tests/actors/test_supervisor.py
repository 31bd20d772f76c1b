"""Supervisor: ordered readiness, restart policies and strategies, budgets that fail upward."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from fraudactors.actors import (
    ChildSpec,
    Mailbox,
    Request,
    Restart,
    Strategy,
    Supervisor,
    TaskStatus,
    actor_child,
    ask,
    last_step,
    run_root,
)
from fraudactors.errors import ActorDied, ActorError, RestartIntensityExceeded, StartupTimeout


class Boom(Exception):
    pass


async def wait_until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait for a state the code under test reaches on its own (a condition, with a deadline)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 (observing supervisor state, no event to wait on)
            await asyncio.sleep(0.001)


class Status:
    def __init__(self) -> None:
        self.ready = asyncio.Event()

    def started(self, value: Any = None) -> None:
        self.ready.set()


class Child:
    """A controllable child. Commands go to the current incarnation: "crash" or "return"."""

    def __init__(self, name: str, journal: list[str], *, ready_from_start: int = 1,
                 crash_after_ready: bool = False, gate: asyncio.Event | None = None,
                 restart: Restart = Restart.PERMANENT, start_timeout: float = 30.0,
                 shutdown_timeout: float = 10.0) -> None:
        self.name = name
        self.journal = journal
        self.ready_from_start = ready_from_start  # incarnations before this one never get ready
        self.crash_after_ready = crash_after_ready
        self.gate = gate
        self.starts = 0
        self.commands: asyncio.Queue[str] = asyncio.Queue()
        self.spec = ChildSpec(name, self.run, restart, start_timeout, shutdown_timeout)

    async def run(self, task_status: TaskStatus) -> None:
        self.starts += 1
        self.journal.append(f"start:{self.name}")
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.starts < self.ready_from_start:
                await asyncio.Event().wait()  # never ready
            task_status.started()
            self.journal.append(f"ready:{self.name}")
            if self.crash_after_ready:
                raise Boom(self.name)
            command = await self.commands.get()
        except asyncio.CancelledError:
            self.journal.append(f"stop:{self.name}")
            await asyncio.sleep(0)  # cleanup that takes a turn of the loop
            self.journal.append(f"stopped:{self.name}")
            raise
        if command == "crash":
            raise Boom(self.name)
        if command == "cancel":  # ends cancelled though nobody cancelled it (e.g. a stray timeout)
            raise asyncio.CancelledError


async def started(sup: Supervisor) -> asyncio.Task[None]:
    status = Status()
    task = asyncio.create_task(sup.run(status))
    ready = asyncio.create_task(status.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED, timeout=10)
    ready.cancel()
    if task.done():
        task.result()
    assert sup.ready
    return task


async def test_children_start_in_order_each_after_the_previous_is_ready() -> None:
    journal: list[str] = []
    gate = asyncio.Event()
    a, b = Child("a", journal, gate=gate), Child("b", journal)
    sup = Supervisor("root", [a.spec, b.spec])
    status = Status()
    run = asyncio.create_task(sup.run(status))
    await wait_until(lambda: a.starts == 1)
    await asyncio.sleep(0)
    assert b.starts == 0 and not status.ready.is_set() and not sup.ready
    gate.set()
    await asyncio.wait_for(status.ready.wait(), 10)
    assert journal == ["start:a", "ready:a", "start:b", "ready:b"]
    await sup.stop()
    await run


async def test_start_timeout_counts_as_failure_and_the_child_is_retried() -> None:
    journal: list[str] = []
    slow = Child("slow", journal, ready_from_start=2, start_timeout=0.5)
    with capture_logs() as logs:
        sup = Supervisor("root", [slow.spec], max_restarts=3, backoff_base_s=0)
        run = await started(sup)
    assert slow.starts == 2 and sup.restarts_total == 1
    assert journal[:3] == ["start:slow", "stop:slow", "stopped:slow"]  # cancelled on timeout
    failed = [e for e in logs if e["event"] == "child_start_failed"]
    assert len(failed) == 1 and "StartupTimeout" in failed[0]["error"]
    await sup.stop()
    await run


async def test_child_never_ready_exhausts_budget_with_startup_timeout_cause() -> None:
    never = Child("never", [], ready_from_start=10**6, start_timeout=0.02)
    sup = Supervisor("root", [never.spec], max_restarts=1, backoff_base_s=0)
    with pytest.raises(RestartIntensityExceeded) as info:
        await sup.run()
    assert isinstance(info.value.__cause__, StartupTimeout)
    assert never.starts == 2
    assert not sup.running


async def test_crash_loop_exhausts_budget_stops_siblings_and_fails_upward() -> None:
    journal: list[str] = []
    steady = Child("steady", journal)
    crasher = Child("crasher", journal, crash_after_ready=True)
    sup = Supervisor("root", [steady.spec, crasher.spec], max_restarts=3, backoff_base_s=0)
    with pytest.raises(RestartIntensityExceeded) as info:
        await sup.run()
    assert isinstance(info.value.__cause__, Boom)
    assert crasher.starts == 4 and sup.restarts_total == 3
    assert steady.starts == 1 and journal[-2:] == ["stop:steady", "stopped:steady"]


async def test_nested_supervisor_crash_loop_fails_upward_through_the_root() -> None:
    journal: list[str] = []
    crasher = Child("crasher", journal, crash_after_ready=True)
    sibling = Child("sibling", journal)
    with capture_logs() as logs:
        inner = Supervisor("inner", [crasher.spec], max_restarts=1, backoff_base_s=0)
        outer = Supervisor("outer", [sibling.spec, ChildSpec("inner", inner.run)],
                           max_restarts=1, backoff_base_s=0)
        code = await run_root(outer)
    assert code == 1
    # inner: 1 start + 1 restart, twice (the outer restarted it once, then gave up).
    assert crasher.starts == 4 and outer.restarts_total == 1
    assert journal[-2:] == ["stop:sibling", "stopped:sibling"]
    failed = [e for e in logs if e["event"] == "supervisor_failed"]
    assert len(failed) == 1
    assert failed[0]["supervisor"] == "outer" and failed[0]["log_level"] == "error"
    assert "Boom('crasher')" in failed[0]["cause"]


async def test_nested_failure_is_chained_from_the_inner_supervisor() -> None:
    crasher = Child("crasher", [], crash_after_ready=True)
    inner = Supervisor("inner", [crasher.spec], max_restarts=0)
    outer = Supervisor("outer", [ChildSpec("inner", inner.run)], max_restarts=0)
    with pytest.raises(RestartIntensityExceeded) as info:
        await outer.run()
    inner_error = info.value.__cause__
    assert isinstance(inner_error, RestartIntensityExceeded) and "inner" in str(inner_error)
    assert isinstance(inner_error.__cause__, Boom)


async def test_restart_policies_permanent_transient_temporary() -> None:
    journal: list[str] = []
    perm = Child("perm", journal, restart=Restart.PERMANENT)
    trans_ok = Child("trans_ok", journal, restart=Restart.TRANSIENT)
    trans_err = Child("trans_err", journal, restart=Restart.TRANSIENT)
    temp = Child("temp", journal, restart=Restart.TEMPORARY)
    sup = Supervisor("root", [perm.spec, trans_ok.spec, trans_err.spec, temp.spec],
                     max_restarts=10, backoff_base_s=0)
    run = await started(sup)

    perm.commands.put_nowait("return")  # permanent: restarted even after a normal exit
    await wait_until(lambda: perm.starts == 2 and sup.child_running("perm"))

    trans_ok.commands.put_nowait("return")  # transient, normal exit: done, not restarted
    await wait_until(lambda: "trans_ok" not in sup.child_ids)
    assert trans_ok.starts == 1

    trans_err.commands.put_nowait("crash")  # transient, abnormal exit: restarted
    await wait_until(lambda: trans_err.starts == 2 and sup.child_running("trans_err"))

    temp.commands.put_nowait("crash")  # temporary: never restarted
    await wait_until(lambda: "temp" not in sup.child_ids)
    assert temp.starts == 1

    assert sup.child_ids == ("perm", "trans_err") and sup.restarts_total == 2
    assert sup.restarts_by_child == {"perm": 1, "trans_err": 1}
    await sup.stop()
    await run


async def test_a_transient_child_that_ends_cancelled_by_itself_is_restarted() -> None:
    """Only the supervisor stops its children: a child whose task ends cancelled without that did
    not finish its work, and a transient one is restarted (the engine's ingestor is transient)."""
    child = Child("trans", [], restart=Restart.TRANSIENT)
    sup = Supervisor("root", [child.spec], backoff_base_s=0)
    run = await started(sup)
    child.commands.put_nowait("cancel")
    await wait_until(lambda: child.starts == 2 and sup.child_running("trans"))
    assert sup.restarts_by_child == {"trans": 1}
    await sup.stop()
    await run


async def test_one_for_one_restarts_only_the_failed_child() -> None:
    journal: list[str] = []
    a, b, c = (Child(n, journal) for n in "abc")
    sup = Supervisor("root", [a.spec, b.spec, c.spec], Strategy.ONE_FOR_ONE, backoff_base_s=0)
    run = await started(sup)
    b.commands.put_nowait("crash")
    await wait_until(lambda: b.starts == 2 and sup.child_running("b"))
    assert (a.starts, c.starts) == (1, 1)
    assert "stop:a" not in journal and "stop:c" not in journal
    await sup.stop()
    await run


async def test_one_for_all_restarts_siblings_in_order_and_drops_temporary_ones() -> None:
    journal: list[str] = []
    a, b, c = (Child(n, journal) for n in "abc")
    d = Child("d", journal, restart=Restart.TEMPORARY)
    sup = Supervisor("root", [a.spec, b.spec, c.spec, d.spec], Strategy.ONE_FOR_ALL, backoff_base_s=0)
    run = await started(sup)
    journal.clear()
    b.commands.put_nowait("crash")
    await wait_until(lambda: c.starts == 2 and sup.ready and sup.child_running("c"))
    assert journal == [
        "stop:d", "stopped:d", "stop:c", "stopped:c", "stop:a", "stopped:a",  # reverse order
        "start:a", "ready:a", "start:b", "ready:b", "start:c", "ready:c",  # then in order
    ]
    assert sup.child_ids == ("a", "b", "c") and d.starts == 1 and sup.restarts_total == 1
    await sup.stop()
    await run


class Counted:
    """A child that counts its live incarnations; the ones numbered in ``never_ready_on`` never
    get ready (a start failure)."""

    def __init__(self, name: str, never_ready_on: frozenset[int] = frozenset(), start_timeout: float = 30.0) -> None:
        self.never_ready_on = never_ready_on
        self.starts = self.live = self.most_live = 0
        self.commands: asyncio.Queue[str] = asyncio.Queue()
        self.spec = ChildSpec(name, self.run, Restart.PERMANENT, start_timeout, 10.0)

    async def run(self, task_status: TaskStatus) -> None:
        self.starts += 1
        self.live += 1
        self.most_live = max(self.most_live, self.live)
        try:
            if self.starts in self.never_ready_on:
                await asyncio.Event().wait()
            task_status.started()
            if await self.commands.get() == "crash":
                raise Boom(self.spec.id)
        finally:
            self.live -= 1


async def test_one_for_all_stops_the_group_again_when_a_restart_fails_to_start() -> None:
    """A sibling that fails its restart makes the group restart again: the children already
    restarted are stopped first, so no child ever runs twice at once."""
    a, b = Counted("a"), Counted("b", never_ready_on=frozenset({2}), start_timeout=0.2)
    sup = Supervisor("root", [a.spec, b.spec], Strategy.ONE_FOR_ALL, backoff_base_s=0)
    run = await started(sup)
    a.commands.put_nowait("crash")
    await wait_until(lambda: b.starts == 3 and sup.ready and sup.child_running("a") and sup.child_running("b"))
    assert a.starts == 3, "a restarted with the group, then again after b's failed start"
    assert (a.most_live, b.most_live) == (1, 1), "never two incarnations of a child at once"
    assert sup.restarts_total == 2
    await sup.stop()
    await run


async def test_each_restart_in_the_window_backs_off_longer() -> None:
    crasher = Child("crasher", [])
    sup = Supervisor("root", [crasher.spec], max_restarts=10, window_s=60.0, backoff_base_s=0.001,
                     backoff_max_s=1.0)
    attempts: list[int] = []
    real = sup.backoff_delay

    def recording(attempt: int) -> float:
        attempts.append(attempt)
        return real(attempt)

    sup.backoff_delay = recording  # type: ignore[method-assign]
    run = await started(sup)
    for n in (2, 3, 4):
        crasher.commands.put_nowait("crash")
        await wait_until(lambda n=n: crasher.starts == n and sup.child_running("crasher"))  # type: ignore[misc]
    assert attempts == [1, 2, 3], "the backoff grows with the restarts in the window"
    await sup.stop()
    await run


async def test_stop_stops_children_in_reverse_order_one_after_the_other() -> None:
    journal: list[str] = []
    children = [Child(n, journal) for n in "abc"]
    sup = Supervisor("root", [ch.spec for ch in children])
    run = await started(sup)
    journal.clear()
    await sup.stop()
    assert journal == ["stop:c", "stopped:c", "stop:b", "stopped:b", "stop:a", "stopped:a"]
    assert await run is None
    assert not sup.running and not sup.ready
    await sup.stop()  # idempotent


async def test_stuck_child_is_abandoned_after_its_shutdown_timeout() -> None:
    journal: list[str] = []
    release = asyncio.Event()
    finished = asyncio.Event()

    async def stubborn(task_status: TaskStatus) -> None:
        task_status.started()
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # cleanup that hangs
            finished.set()

    a = Child("a", journal)
    with capture_logs() as logs:
        sup = Supervisor("root", [a.spec, ChildSpec("stubborn", stubborn, shutdown_timeout=0.05)])
        run = await started(sup)
        await sup.stop()
    assert journal[-2:] == ["stop:a", "stopped:a"]  # the stop went on past the stuck child
    assert [e["child"] for e in logs if e["event"] == "child_shutdown_timeout"] == ["stubborn"]
    release.set()
    await asyncio.wait_for(finished.wait(), 10)
    await run


async def test_cancelling_run_stops_children_and_propagates_cancellation() -> None:
    journal: list[str] = []
    a, b = Child("a", journal), Child("b", journal)
    sup = Supervisor("root", [a.spec, b.spec])
    run = await started(sup)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert run.cancelled()
    assert journal[-4:] == ["stop:b", "stopped:b", "stop:a", "stopped:a"]
    assert not sup.running


async def test_cancelled_during_startup_stops_the_child_being_started() -> None:
    journal: list[str] = []
    gate = asyncio.Event()
    a, b = Child("a", journal), Child("b", journal, gate=gate)
    sup = Supervisor("root", [a.spec, b.spec])
    run = asyncio.create_task(sup.run())
    await wait_until(lambda: b.starts == 1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert set(journal[-4:]) == {"stop:b", "stopped:b", "stop:a", "stopped:a"}
    assert journal[-2:] == ["stop:a", "stopped:a"]


async def test_stop_during_backoff_does_not_wait_for_it() -> None:
    crasher = Child("crasher", [], crash_after_ready=False)
    sup = Supervisor("root", [crasher.spec], backoff_base_s=3600, backoff_max_s=3600)
    run = await started(sup)
    crasher.commands.put_nowait("crash")
    await wait_until(lambda: sup.restarts_total == 1)  # now sleeping an hour before the restart
    await asyncio.wait_for(sup.stop(), 10)
    await run
    assert crasher.starts == 1


async def test_dynamic_children_start_restart_and_terminate() -> None:
    journal: list[str] = []
    base = Child("base", journal)
    sup = Supervisor("root", [base.spec], backoff_base_s=0)
    with pytest.raises(ActorError):
        await sup.start_child(Child("early", journal).spec)  # not running yet
    run = await started(sup)

    worker = Child("worker-3", journal)
    await sup.start_child(worker.spec)
    assert journal[-1] == "ready:worker-3" and sup.child_ids == ("base", "worker-3")
    with pytest.raises(ValueError):
        await sup.start_child(Child("worker-3", journal).spec)

    worker.commands.put_nowait("crash")  # dynamic children are supervised like static ones
    await wait_until(lambda: worker.starts == 2 and sup.child_running("worker-3"))

    await sup.terminate_child("worker-3")
    assert journal[-2:] == ["stop:worker-3", "stopped:worker-3"]
    assert sup.child_ids == ("base",) and worker.starts == 2
    await sup.terminate_child("worker-3")  # unknown id: no-op

    never = Child("never", journal, ready_from_start=10**6, start_timeout=0.02)
    with pytest.raises(StartupTimeout):
        await sup.start_child(never.spec)
    assert sup.child_ids == ("base",) and sup.restarts_total == 1
    await sup.stop()
    await run
    with pytest.raises(ActorError):
        await sup.terminate_child("base")


async def test_a_command_in_progress_fails_its_caller_when_the_supervisor_is_cancelled() -> None:
    """start_child is waiting for a child that is not ready yet when the supervisor's own task
    is cancelled: the caller gets ActorDied at once, not a wait without end."""
    sup = Supervisor("dyn", [])
    run = await started(sup)
    slow = Child("slow", [], ready_from_start=2)  # its first incarnation never gets ready
    starting = asyncio.create_task(sup.start_child(slow.spec))
    await wait_until(lambda: slow.starts == 1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    with pytest.raises(ActorDied, match="stopped"):
        await asyncio.wait_for(starting, 5)
    assert not sup.running and slow.starts == 1


async def test_a_command_whose_caller_gave_up_before_its_turn_is_not_run() -> None:
    sup = Supervisor("dyn", [])
    run = await started(sup)
    gate = asyncio.Event()
    slow = Child("slow", [], gate=gate)  # ready only once the gate opens
    first = asyncio.create_task(sup.start_child(slow.spec))
    await wait_until(lambda: slow.starts == 1)
    late = Child("late", [])
    second = asyncio.create_task(sup.start_child(late.spec))  # queued behind the first
    await asyncio.sleep(0)
    second.cancel()  # its caller gives up (a timeout, a stop) before the supervisor gets to it
    with pytest.raises(asyncio.CancelledError):
        await second
    gate.set()
    await asyncio.wait_for(first, 10)
    await sup.terminate_child("nobody")  # a later command: everything queued before it was served
    assert late.starts == 0 and sup.child_ids == ("slow",)
    await sup.stop()
    await run


async def test_terminate_children_stops_them_concurrently_and_forgets_them() -> None:
    """Peers stopped together drain in parallel: each one's cleanup here needs the other's to
    have begun, which one-after-the-other would never allow (within their shutdown timeout)."""
    stopping = {"a": asyncio.Event(), "b": asyncio.Event()}
    journal: list[str] = []

    def peer(name: str, other: str) -> ChildSpec:
        async def run(task_status: TaskStatus) -> None:
            task_status.started()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopping[name].set()
                await stopping[other].wait()
                journal.append(f"stopped:{name}")
                raise

        return ChildSpec(name, run, shutdown_timeout=5.0)

    sup = Supervisor("root", [])
    run = await started(sup)
    await sup.start_child(peer("a", "b"))
    await sup.start_child(peer("b", "a"))
    await sup.start_child(Child("c", journal).spec)
    with capture_logs() as logs:
        await asyncio.wait_for(sup.terminate_children(["a", "b", "unknown"]), 3.0)
    assert sorted(journal) == ["ready:c", "start:c", "stopped:a", "stopped:b"]
    assert sup.child_ids == ("c",) and sup.restarts_total == 0
    assert not [e for e in logs if e["event"] == "child_shutdown_timeout"]
    await sup.stop()
    await run


@pytest.mark.parametrize(("third_at", "allowed"), [(1010.0, True), (1009.999, False)])
async def test_restart_budget_is_a_sliding_window(third_at: float, allowed: bool) -> None:
    """The window is (now - window_s, now]: at exactly 1010.0 the restart of t=1000 no longer counts,
    a moment before it still does; either way a further crash inside the window ends the budget."""
    now = [1000.0]
    crasher = Child("crasher", [])
    sup = Supervisor("root", [crasher.spec], max_restarts=2, window_s=10.0, backoff_base_s=0,
                     clock=lambda: now[0])
    run = await started(sup)

    async def crash_and_wait_restart(n: int) -> None:
        crasher.commands.put_nowait("crash")
        await wait_until(lambda: crasher.starts == n and sup.child_running("crasher"))

    await crash_and_wait_restart(2)  # restart 1 at t=1000
    now[0] = 1005.0
    await crash_and_wait_restart(3)  # restart 2 at t=1005: budget (2 in 10 s) now used up
    now[0] = third_at
    if allowed:
        crasher.commands.put_nowait("crash")
        await wait_until(lambda: run.done() or (crasher.starts == 4 and sup.child_running("crasher")))
        assert not run.done(), "the restart of t=1000 was still counted at t=1010"
        assert sup.restarts_total == 3
    crasher.commands.put_nowait("crash")  # 1005 and 1010 (or 1000 and 1005) in the window: no budget left
    with pytest.raises(RestartIntensityExceeded):
        await run
    assert sup.restarts_total == (3 if allowed else 2)


def test_backoff_is_exponential_capped_and_jittered() -> None:
    sup = Supervisor("s", [], backoff_base_s=0.1, backoff_max_s=1.0, seed=7)
    delays = [sup.backoff_delay(attempt) for attempt in range(1, 11)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(1.0, 0.1 * 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    capped = delays[5:]
    assert len(set(capped)) == len(capped)  # jitter: no two capped delays alike


def test_child_spec_accepts_policy_names_and_rejects_bad_timeouts() -> None:
    async def noop(task_status: TaskStatus) -> None:
        task_status.started()

    assert ChildSpec("c", noop, "transient").restart is Restart.TRANSIENT  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ChildSpec("c", noop, "sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        ChildSpec("c", noop, start_timeout=0)


def test_duplicate_child_ids_are_rejected() -> None:
    a = Child("a", [])
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor("s", [a.spec, a.spec])


async def test_started_twice_is_an_error_of_the_child() -> None:
    async def twice(task_status: TaskStatus) -> None:
        task_status.started()
        task_status.started()

    sup = Supervisor("s", [ChildSpec("twice", twice)], max_restarts=0)
    with pytest.raises(RestartIntensityExceeded) as info:
        await sup.run()
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_child_returning_before_ready_is_a_start_failure() -> None:
    async def quits(task_status: TaskStatus) -> None:
        return None

    sup = Supervisor("s", [ChildSpec("quits", quits, Restart.TRANSIENT)], max_restarts=0)
    with pytest.raises(RestartIntensityExceeded) as info:
        await sup.run()
    assert isinstance(info.value.__cause__, ActorError)


async def test_run_root_returns_zero_after_a_clean_stop() -> None:
    sup = Supervisor("root", [Child("a", []).spec])
    status = Status()
    root = asyncio.create_task(run_root(sup, status))
    await asyncio.wait_for(status.ready.wait(), 10)
    await sup.stop()
    assert await root == 0


async def test_caller_of_a_crashed_actor_gets_actor_died_and_the_restart_serves_again() -> None:
    mailbox: Mailbox[Request[str, str]] = Mailbox(8, name="scorer")
    incarnations = 0

    async def scorer(task_status: TaskStatus) -> None:
        nonlocal incarnations
        incarnations += 1
        task_status.started()
        while True:
            request = await mailbox.get()
            if request.payload == "poison":
                raise Boom("poison")
            request.resolve(request.payload.upper())

    sup = Supervisor("root", [actor_child("scorer", mailbox, scorer)], backoff_base_s=0)
    run = await started(sup)
    assert await ask(mailbox, "ok") == "OK"
    with pytest.raises(ActorDied) as info:
        await asyncio.wait_for(ask(mailbox, "poison"), 10)
    assert isinstance(info.value.__cause__, Boom)
    assert await asyncio.wait_for(ask(mailbox, "again"), 10) == "AGAIN"
    assert incarnations == 2
    await sup.stop()
    await run


async def test_callers_of_a_temporary_actor_that_died_fail_for_good() -> None:
    mailbox: Mailbox[Request[str, str]] = Mailbox(8, name="once")
    took = asyncio.Event()

    async def once(task_status: TaskStatus) -> None:
        task_status.started()
        await mailbox.get()
        took.set()
        await asyncio.Event().wait()

    sup = Supervisor("root", [actor_child("once", mailbox, once, restart=Restart.TEMPORARY)])
    run = await started(sup)
    first = asyncio.create_task(ask(mailbox, "a"))
    await took.wait()
    queued = asyncio.create_task(ask(mailbox, "b"))
    await wait_until(lambda: mailbox.depth == 1)
    await sup.terminate_child("once")
    for call in (first, queued):
        with pytest.raises(ActorDied):
            await asyncio.wait_for(call, 10)
    with pytest.raises(ActorDied):
        await ask(mailbox, "c")
    await sup.stop()
    await run


def needed(journal: list[str]) -> Callable[[TaskStatus], Any]:
    """A child serving until stopped, which notes its stop (the one a later child's cleanup needs)."""
    async def body(task_status: TaskStatus) -> None:
        task_status.started()
        try:
            await asyncio.Event().wait()
        finally:
            journal.append("needed stopped")

    return body


async def test_a_child_in_its_last_step_is_waited_for_before_the_child_started_before_it() -> None:
    """Reverse-order stop: the first child (the publisher, say) is stopped only after the second
    (the ingestor, already draining when the supervisor cancels it) finished its cleanup, which
    still needs the first. Under ``asyncio.shield`` alone the second child ended at the cancel
    while its cleanup ran on unwatched, and the first was stopped under it."""
    journal: list[str] = []
    stop_fetching, in_cleanup = asyncio.Event(), asyncio.Event()

    async def drain() -> None:
        in_cleanup.set()
        await asyncio.sleep(0.3)
        journal.append("drained")

    async def draining(task_status: TaskStatus) -> None:
        task_status.started()
        try:
            await stop_fetching.wait()
        finally:
            await last_step(drain(), wait_s=5.0)

    sup = Supervisor("root", [ChildSpec("needed", needed(journal)), ChildSpec("draining", draining)])
    status = Status()
    run = asyncio.create_task(sup.run(status))
    await asyncio.wait_for(status.ready.wait(), 10)
    stop_fetching.set()
    await asyncio.wait_for(in_cleanup.wait(), 10)
    await sup.stop()
    await run
    assert journal == ["drained", "needed stopped"]


async def test_a_last_step_that_overruns_its_wait_leaves_the_rest_of_the_stop_its_time() -> None:
    """A drain that cannot finish (the broker down) is waited for ``wait_s``, then left to run on
    unwatched: the children stopped after it still get their turn within the stop's budget."""
    journal: list[str] = []
    stop_fetching, in_cleanup, never = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def drain() -> None:
        in_cleanup.set()
        await never.wait()

    async def draining(task_status: TaskStatus) -> None:
        task_status.started()
        try:
            await stop_fetching.wait()
        finally:
            await last_step(drain(), wait_s=0.2)

    sup = Supervisor("root", [ChildSpec("needed", needed(journal)),
                              ChildSpec("draining", draining, shutdown_timeout=30.0)])
    status = Status()
    run = asyncio.create_task(sup.run(status))
    await asyncio.wait_for(status.ready.wait(), 10)
    stop_fetching.set()
    await asyncio.wait_for(in_cleanup.wait(), 10)
    with capture_logs() as logs:
        await asyncio.wait_for(sup.stop(), 10)
    await run
    assert journal == ["needed stopped"]
    assert any(e["event"] == "cleanup_unfinished" for e in logs)
    never.set()
