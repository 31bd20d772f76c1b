"""Process pool: calls run in initialized workers; a killed worker fails its call and is replaced."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import poolfuncs
import pytest

from fraudactors.actors.pool import PoolBroken, ProcessPool, RemoteCallError, WorkerInitError
from fraudactors.errors import PoolClosed, StartupTimeout, WorkerDied


async def wait_until(predicate: Callable[[], bool], limit_s: float = 30.0) -> None:
    """Wait for a state the code under test reaches on its own (a condition, with a deadline)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 (observing pool state, no event to wait on)
            await asyncio.sleep(0.001)


class Gate:
    """A Unix socket that ``poolfuncs.block`` calls into: we learn a call is running, and release it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.arrivals: asyncio.Queue[tuple[int, asyncio.StreamWriter]] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._accept, self.path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        pid = int((await reader.readline()).decode())
        await self.arrivals.put((pid, writer))

    async def running(self) -> tuple[int, asyncio.StreamWriter]:
        """Wait until a blocked call is running in a worker; returns (worker pid, its release handle)."""
        return await asyncio.wait_for(self.arrivals.get(), 30)

    @staticmethod
    async def release(writer: asyncio.StreamWriter) -> None:
        writer.write(b"x")
        await writer.drain()


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    directory = tempfile.mkdtemp(prefix="fa-pool-", dir="/tmp")  # short: AF_UNIX paths are limited
    g = Gate(os.path.join(directory, "gate.sock"))
    await g.start()
    try:
        yield g
    finally:
        assert g.server is not None
        g.server.close()
        for writer in g.writers:
            writer.close()
        for writer in g.writers:
            try:
                await writer.wait_closed()
            except OSError:
                pass  # the worker at the other end was killed
        await g.server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)


def worker_processes() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name.endswith("-worker")]


async def test_calls_run_in_workers_that_ran_the_initializer() -> None:
    async with ProcessPool(2, poolfuncs.init_state, ("model-v1",), name="t") as pool:
        assert len(pool.pids) == 2 and os.getpid() not in pool.pids
        assert await pool.call(poolfuncs.read_state) == "model-v1"
        pids = await asyncio.gather(*(pool.call(os.getpid) for _ in range(8)))
        assert set(pids) <= set(pool.pids)
        batch = np.random.default_rng(1).random((256, 40), dtype=np.float32)
        scores = await pool.call(np.mean, batch, 1)
        np.testing.assert_array_equal(scores, batch.mean(1))
        assert pool.calls_total == 10 and pool.worker_restarts_total == 0
    assert pool.state == "closed" and worker_processes() == []
    with pytest.raises(PoolClosed):
        await pool.call(os.getpid)


async def test_workers_freeze_what_the_initializer_built() -> None:
    """heap.settle() after the initializer: the loaded state is out of every later GC pass."""
    from fraudactors import heap

    async with ProcessPool(1, poolfuncs.init_state, ("model-v1",)) as pool:
        frozen, gen0 = await pool.call(poolfuncs.gc_settings)
    assert frozen > 1000
    assert gen0 == heap.GEN0_THRESHOLD


async def test_frames_larger_than_the_socket_buffer_stay_intact_when_pipelined() -> None:
    rng = np.random.default_rng(2)
    arrays = [rng.random((1024, 1024), dtype=np.float32) for _ in range(4)]  # 4 MB each
    async with ProcessPool(1, poolfuncs.init_state, (None,), pipeline_depth=2) as pool:
        echoed = await asyncio.gather(*(pool.call(poolfuncs.echo, a) for a in arrays))
    for sent, got in zip(arrays, echoed, strict=True):
        np.testing.assert_array_equal(sent, got)


async def test_exception_in_call_is_reraised_with_the_remote_traceback() -> None:
    async with ProcessPool(1, poolfuncs.init_state, (None,)) as pool:
        with pytest.raises(ValueError, match="bad batch") as info:
            await pool.call(poolfuncs.boom, "bad batch")
        assert any("raised in worker pid" in note for note in info.value.__notes__)
        with pytest.raises(RemoteCallError):
            await pool.call(poolfuncs.unpicklable_result)
        assert await pool.call(poolfuncs.echo, 5) == 5  # the worker is still serving
        assert pool.worker_deaths_total == 0


async def test_killed_worker_fails_its_call_with_worker_died_and_is_replaced(gate: Gate) -> None:
    async with ProcessPool(1, poolfuncs.init_state, ("v",), name="kill") as pool:
        call = asyncio.create_task(pool.call(poolfuncs.block, gate.path))
        pid, _handle = await gate.running()
        assert pool.pids == [pid] and pool.inflight == 1
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied) as info:
            await asyncio.wait_for(call, 30)
        assert info.value.retriable
        # The caller retries: the call waits for the replacement, which ran the initializer too.
        assert await pool.call(poolfuncs.read_state) == "v"
        new_pid = await pool.call(os.getpid)
        assert new_pid != pid and pool.pids == [new_pid]
        assert pool.worker_restarts_total == 1 and pool.worker_deaths_total == 1


async def test_worker_exiting_mid_call_fails_every_call_sent_to_it(gate: Gate) -> None:
    async with ProcessPool(1, poolfuncs.init_state, ("v",), pipeline_depth=2) as pool:
        first = asyncio.create_task(pool.call(poolfuncs.block, gate.path))
        pid, handle = await gate.running()
        second = asyncio.create_task(pool.call(poolfuncs.exit_now, 3))  # queued behind `first`
        await wait_until(lambda: pool.inflight == 2)
        await gate.release(handle)
        assert await first == pid
        with pytest.raises(WorkerDied):
            await asyncio.wait_for(second, 30)
        assert await pool.call(poolfuncs.echo, "ok") == "ok"
        assert pool.worker_restarts_total == 1


async def test_pipelined_calls_on_a_killed_worker_all_fail_retriably(gate: Gate) -> None:
    async with ProcessPool(1, poolfuncs.init_state, ("v",), pipeline_depth=2) as pool:
        first = asyncio.create_task(pool.call(poolfuncs.block, gate.path))
        pid, _handle = await gate.running()
        second = asyncio.create_task(pool.call(poolfuncs.echo, 2))
        await wait_until(lambda: pool.inflight == 2)
        os.kill(pid, signal.SIGKILL)
        for call in (first, second):
            with pytest.raises(WorkerDied):
                await asyncio.wait_for(call, 30)
        assert await pool.call(poolfuncs.echo, 3) == 3


async def test_in_flight_calls_are_bounded_and_extra_callers_wait(gate: Gate) -> None:
    async with ProcessPool(1, poolfuncs.init_state, (None,), max_inflight=2, pipeline_depth=1) as pool:
        calls = [asyncio.create_task(pool.call(poolfuncs.block, gate.path)) for _ in range(5)]
        for done in range(5):
            pid, handle = await gate.running()  # exactly one call runs in the single worker
            await wait_until(lambda d=done: pool.inflight == 1 and pool.pending == min(1, 4 - d))
            assert pool.inflight + pool.pending <= pool.max_inflight
            await gate.release(handle)
        assert await asyncio.gather(*calls) == [pid] * 5
        assert pool.calls_total == 5


async def test_cancelled_caller_does_not_wedge_the_worker(gate: Gate) -> None:
    async with ProcessPool(1, poolfuncs.init_state, (None,)) as pool:
        call = asyncio.create_task(pool.call(poolfuncs.block, gate.path))
        _pid, handle = await gate.running()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await gate.release(handle)  # the worker finishes the abandoned call; its result is dropped
        assert await pool.call(poolfuncs.echo, "next") == "next"
        assert pool.worker_deaths_total == 0


async def test_abandoned_call_kills_its_worker_when_asked(gate: Gate) -> None:
    async with ProcessPool(1, poolfuncs.init_state, ("v",), kill_on_cancel=True) as pool:
        call = asyncio.create_task(pool.call(poolfuncs.block, gate.path))
        pid, _handle = await gate.running()
        call.cancel()  # the caller gives up on a stuck call (e.g. its asyncio.timeout expired)
        with pytest.raises(asyncio.CancelledError):
            await call
        new_pid = await pool.call(os.getpid)  # served by the replacement
        assert new_pid != pid and pool.worker_deaths_total == 1 and pool.worker_restarts_total == 1


async def test_initializer_failure_fails_start_and_leaves_no_worker() -> None:
    pool = ProcessPool(2, poolfuncs.fail_init, ("no model file",), name="badinit")
    with pytest.raises(WorkerInitError, match="no model file") as info:
        await pool.start()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert pool.state == "closed" and worker_processes() == []
    with pytest.raises(PoolClosed):
        await pool.call(os.getpid)


async def test_worker_not_ready_in_time_fails_start_with_startup_timeout() -> None:
    pool = ProcessPool(1, poolfuncs.hang_init, ready_timeout=0.5, name="slowinit")
    with pytest.raises(StartupTimeout):
        await pool.start()
    assert pool.state == "closed" and worker_processes() == []


async def test_replacement_that_cannot_initialize_breaks_the_pool(gate: Gate, tmp_path: Path) -> None:
    flag = tmp_path / "initialized"
    async with ProcessPool(1, poolfuncs.init_once, (str(flag),), name="brittle") as pool:
        call = asyncio.create_task(pool.call(poolfuncs.block, gate.path))
        pid, _handle = await gate.running()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            await asyncio.wait_for(call, 30)
        with pytest.raises(PoolBroken) as info:
            await asyncio.wait_for(pool.call(os.getpid), 30)  # waits for the replacement, which fails
        assert not info.value.retriable
        assert isinstance(info.value.__cause__, WorkerInitError)
        with pytest.raises(PoolBroken):
            await pool.call(os.getpid)
    assert worker_processes() == []


async def test_close_lets_the_call_in_flight_finish(gate: Gate) -> None:
    pool = ProcessPool(1, poolfuncs.init_state, (None,))
    await pool.start()
    call = asyncio.create_task(pool.call(poolfuncs.block, gate.path))
    pid, handle = await gate.running()
    closing = asyncio.create_task(pool.close())
    await wait_until(lambda: pool.state == "closing")
    with pytest.raises(PoolClosed):
        await pool.call(os.getpid)
    await gate.release(handle)
    assert await call == pid
    await asyncio.wait_for(closing, 30)
    assert pool.state == "closed" and worker_processes() == []


async def test_close_fails_the_queued_calls_and_the_callers_waiting_for_admission(gate: Gate) -> None:
    pool = ProcessPool(1, poolfuncs.init_state, (None,), max_inflight=3, pipeline_depth=1)
    await pool.start()
    running = asyncio.create_task(pool.call(poolfuncs.block, gate.path))
    pid, handle = await gate.running()
    queued = [asyncio.create_task(pool.call(poolfuncs.echo, i)) for i in (1, 2)]
    await wait_until(lambda: pool.pending == 2)  # behind the running call (pipeline depth 1)
    waiting = asyncio.create_task(pool.call(poolfuncs.echo, 3))  # over max_inflight: not admitted yet
    for _ in range(3):
        await asyncio.sleep(0)  # it runs up to the admission wait (nothing else to wait for)
    closing = asyncio.create_task(pool.close())
    for call in (*queued, waiting):
        with pytest.raises(PoolClosed):
            await asyncio.wait_for(call, 10)  # at once, not after the running call
    await gate.release(handle)
    assert await running == pid
    await asyncio.wait_for(closing, 30)
    assert pool.state == "closed" and worker_processes() == []


def test_fork_start_method_is_refused() -> None:
    with pytest.raises(ValueError, match="fork"):
        ProcessPool(1, poolfuncs.init_state, (None,), mp_context="fork")


async def test_broadcast_reaches_every_worker_and_later_workers_start_with_the_new_initargs() -> None:
    async with ProcessPool(3, poolfuncs.init_state, ("v1",), name="bcast") as pool:
        await pool.broadcast(poolfuncs.init_state, "v2", initargs=("v2",))
        states = await asyncio.gather(*(pool.call(poolfuncs.read_state_and_pid) for _ in range(30)))
        assert {pid for _, pid in states} == set(pool.pids) and {s for s, _ in states} == {"v2"}
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: victim not in pool.pids and len(pool.pids) == 3)
        states = await asyncio.gather(*(pool.call(poolfuncs.read_state_and_pid) for _ in range(30)))
        assert {s for s, _ in states} == {"v2"}, "a replacement started with the old initargs"


async def test_a_broadcast_that_fails_in_a_worker_raises_and_keeps_the_old_initargs() -> None:
    async with ProcessPool(2, poolfuncs.init_state, ("v1",), name="bcast-fail") as pool:
        with pytest.raises(ValueError, match="cannot load v3"):
            await pool.broadcast(poolfuncs.boom, "cannot load v3", initargs=("v3",))
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: victim not in pool.pids and len(pool.pids) == 2)
        states = await asyncio.gather(*(pool.call(poolfuncs.read_state_and_pid) for _ in range(20)))
        assert {s for s, _ in states} == {"v1"}
