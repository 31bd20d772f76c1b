"""Child processes for the demo and the benchmarks: the engine (``fraudactors run``) and the null
pipeline, configured from one :class:`Settings`, with readiness, CPU accounting and a clean stop.

The child gets the parent's settings as a TOML file (``--config`` / ``FRAUDACTORS_CONFIG``) and none
of the parent's ``FRAUDACTORS_*`` environment, so it runs with exactly what the parent computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from fraudactors.errors import FraudActorsError
from fraudactors.services.process import _make_preexec
from fraudactors.settings import Settings, as_dict

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class SigtermCancels:
    """While entered (in the run's task), SIGTERM cancels that task as Ctrl-C does, so a command
    stops its children and clients on the way out; ``terminated`` says whether SIGTERM came (the
    command then prints one line and exits 143). On exit the handler from before is back (the
    event loop alone would leave SIGTERM's default action: the process killed without a word)."""

    def __init__(self) -> None:
        self.terminated = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def __enter__(self) -> SigtermCancels:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "enter SigtermCancels in the task it cancels"

        def on_sigterm() -> None:
            self.terminated = True
            task.cancel()

        self._previous = signal.getsignal(signal.SIGTERM)
        self._loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.remove_signal_handler(signal.SIGTERM)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Terminated(BaseException):
    """SIGTERM in synchronous code under :class:`SigtermRaises`: a BaseException, as
    KeyboardInterrupt is for Ctrl-C, so no ``except Exception`` on the way takes it."""


class SigtermRaises:
    """While entered (main thread), SIGTERM raises :class:`Terminated` wherever the code is, as
    Ctrl-C raises KeyboardInterrupt: for what a command does outside its event loop (writing its
    report), where :class:`SigtermCancels` has no task to cancel."""

    def __init__(self) -> None:
        self._previous: Any = None

    def __enter__(self) -> SigtermRaises:
        def on_sigterm(signum: int, frame: object) -> None:
            raise Terminated

        self._previous = signal.signal(signal.SIGTERM, on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class ChildFailed(FraudActorsError):
    """A child process exited early or did not become ready in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def settings_toml(settings: Settings) -> str:
    """The whole settings object as TOML that :func:`load_settings` reads back to equal settings
    (secrets included: it is the child's config file, not a log line)."""
    lines: list[str] = []

    def table(name: str, data: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in data.items():
            if isinstance(v, Mapping):
                table(f"{name}.{k}", v)

    for section, data in as_dict(settings, secrets=True).items():
        table(section, data)
    return "\n".join(lines)


def child_env(config_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}
    env["FRAUDACTORS_CONFIG"] = str(config_path)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (from /proc), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_delay_seconds(pid: int) -> float:
    """Time ``pid`` (all its threads) spent runnable but waiting for a CPU (/proc/<pid>/schedstat)."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue
    return total


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (via /proc/<pid>/task/*/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


class CpuMeter:
    """CPU used by named processes between :meth:`start` and :meth:`stop`; each name counts its
    process and its descendants, except descendants that are named themselves (so the load
    generator's own entry does not include the broker it started).

    ``result``: cores used on average (1.0 = one full core). ``waiting``: cores' worth of time the
    processes were runnable but had no CPU (scheduler run-queue delay) - high means the machine, not
    the process, is the limit.
    """

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self._start: dict[str, tuple[float, float]] = {}
        self._t0 = 0.0
        self.result: dict[str, float] = {}
        self.waiting: dict[str, float] = {}
        self.wall_s = 0.0

    def _sample(self) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        named = set(self.pids.values())
        for name, pid in self.pids.items():
            cpu = cpu_seconds(pid) or 0.0
            wait = run_delay_seconds(pid)
            stack = [pid]
            while stack:
                for kid in _children(stack.pop()):
                    if kid not in named:
                        cpu += cpu_seconds(kid) or 0.0
                        wait += run_delay_seconds(kid)
                        stack.append(kid)
            out[name] = (cpu, wait)
        return out

    def start(self) -> None:
        self._start = self._sample()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        self.wall_s = time.perf_counter() - self._t0
        if self.wall_s <= 0:
            return {}
        base = {name: self._start.get(name, value) for name, value in end.items()}
        self.result = {name: round((end[name][0] - base[name][0]) / self.wall_s, 3) for name in end}
        self.waiting = {name: round((end[name][1] - base[name][1]) / self.wall_s, 3) for name in end}
        return self.result


class StageMeter:
    """The engine's time per micro-batch in each pipeline stage between :meth:`start` and
    :meth:`stop`, from two reads of its ``/metrics`` (``fraudactors_stage_latency_seconds``):
    where a decision's time goes, beside the CPU of :class:`CpuMeter`.

    Both methods are called from the event loop and only schedule the read; :meth:`result`
    awaits them: per stage, the batches in the window and their mean time in ms, or ``None``
    when the engine could not be read.
    """

    METRIC = "fraudactors_stage_latency_seconds"

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._reads: list[asyncio.Task[dict[str, tuple[float, float]]]] = []

    def start(self) -> asyncio.Task[dict[str, tuple[float, float]]]:
        """Schedules the first read (returned, for a caller that must know it is made)."""
        self._reads = [asyncio.ensure_future(self._read())]
        return self._reads[0]

    def stop(self) -> asyncio.Task[dict[str, tuple[float, float]]]:
        self._reads.append(asyncio.ensure_future(self._read()))
        return self._reads[-1]

    async def _read(self) -> dict[str, tuple[float, float]]:
        """stage -> (count, sum in seconds) as the engine has them now."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url) as response:
            response.raise_for_status()
            text = await response.text()
        out: dict[str, tuple[float, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name != self.METRIC:
                continue
            for sample in family.samples:
                count, total = out.get(sample.labels.get("stage", ""), (0.0, 0.0))
                if sample.name == f"{self.METRIC}_count":
                    count = sample.value
                elif sample.name == f"{self.METRIC}_sum":
                    total = sample.value
                else:
                    continue
                out[sample.labels["stage"]] = (count, total)
        return out

    async def result(self) -> dict[str, dict[str, float]] | None:
        if len(self._reads) != 2:
            return None
        import aiohttp

        try:
            first, last = await asyncio.gather(*self._reads)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            print(f"engine stages: /metrics not read: {exc!r}", file=sys.stderr)
            return None
        out: dict[str, dict[str, float]] = {}
        for stage, (count, total) in last.items():
            count0, total0 = first.get(stage, (0.0, 0.0))
            if count > count0:
                out[stage] = {"batches": int(count - count0),
                              "mean_ms": round(1000.0 * (total - total0) / (count - count0), 3)}
        return out


# How long a child stopped before it was ready may take to exit after SIGTERM, before SIGKILL.
STOP_WHILE_STARTING_S = 10.0


class Child:
    """One child process: output to a log file, readiness by a log line or an HTTP 200, SIGTERM stop."""

    def __init__(self, name: str, argv: Sequence[str], settings: Settings, workdir: Path,
                 ready_line: bytes | None = None, ready_url: tuple[str, int, str] | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.ready_line = ready_line
        self.ready_url = ready_url
        self.settings = settings
        self.extra_env = dict(extra_env or {})
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, timeout_s: float = 90.0) -> None:
        """Spawn and wait until ready (a failure to become ready stops the child and raises ChildFailed)."""
        await self.spawn()
        await self.wait_ready(timeout_s)

    async def spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(settings_toml(self.settings), encoding="utf-8")
        self._log = self.log_path.open("wb")  # closed in stop() / kill()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=asyncio.subprocess.STDOUT,
            env=child_env(self.config_path, self.extra_env), start_new_session=True,
            # Killed by the kernel if we die, even by SIGKILL (same guard as the embedded services).
            preexec_fn=_make_preexec(os.getpid()))

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Wait until the child is ready. Not ready in time, exited, or this wait cancelled (Ctrl-C,
        SIGTERM): the child is stopped as :meth:`stop` does (SIGTERM first, so it cleans up after
        itself, e.g. its multiprocessing temp dir), then the error is raised."""
        try:
            await self._wait_ready(timeout_s)
        except BaseException:
            await asyncio.shield(self.stop(STOP_WHILE_STARTING_S))
            raise

    async def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            while time.monotonic() < deadline:
                if exited.done():
                    raise ChildFailed(f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                                      f"last output: {self.tail()!r}")
                if await self._is_ready():
                    return
                await asyncio.wait({exited}, timeout=0.1)
            raise ChildFailed(f"{self.name} was not ready within {timeout_s:g} s; last output: {self.tail()!r}")
        finally:
            if not exited.done():
                exited.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await exited

    async def _is_ready(self) -> bool:
        if self.ready_line is not None and self.ready_line in self.log_path.read_bytes():
            return True
        if self.ready_url is not None:
            host, port, path = self.ready_url
            return await http_status(host, port, path) == 200
        return False

    def tail(self, n: int = 600) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                await self.kill()
        self.returncode = self.proc.returncode
        self._close_log()
        return self.returncode if self.returncode is not None else -1

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self.proc is not None:
            self.returncode = self.proc.returncode
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


async def http_status(host: str, port: int, path: str, timeout_s: float = 2.0) -> int | None:
    """Status code of a plain HTTP GET, or None when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def engine_child(settings: Settings, workdir: Path, name: str = "engine") -> Child:
    """``fraudactors run`` on a free HTTP port; ready when /readyz answers 200."""
    port = free_port()
    settings = settings.replace(http={"host": "127.0.0.1", "port": port}, logging={"format": "json"})
    return Child(name, [sys.executable, "-m", "fraudactors", "run"], settings, workdir,
                 ready_url=("127.0.0.1", port, "/readyz"))


def null_child(settings: Settings, workdir: Path, name: str = "null") -> Child:
    return Child(name, [sys.executable, "-m", "loadgen.nullpipe"], settings, workdir, ready_line=b"null_ready")
