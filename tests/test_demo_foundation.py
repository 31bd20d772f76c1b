"""``fraudactors demo`` as a user runs it: it works, and it never leaves a process behind (broker,
Redis, engine, workers) — not after a normal run, not after Ctrl-C, SIGTERM or SIGKILL.

A watcher thread scans /proc while the demo runs and records every descendant it ever had, so
the checks do not depend on what the demo prints."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PID_LINE = re.compile(r"^(broker: tansu|redis:) pid (\d+) on ")


def _script() -> list[str]:
    exe = Path(sys.executable).with_name("fraudactors")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fraudactors"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stat(pid: int | str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError, OSError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _wait_gone(pids: set[int] | list[int], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"left behind: {[p for p in pids if _alive(p)]}"
        time.sleep(0.02)


class Descendants(threading.Thread):
    """Every process that was ever a descendant of ``root`` while it ran."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: set[int] = set()
        self._stop_event = threading.Event()

    def scan(self) -> None:
        family = {self.root} | self.seen
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = _stat(entry)
                if fields is not None and int(fields[1]) in family:
                    self.seen.add(int(entry))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.scan()
            self._stop_event.wait(0.03)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """A child inherits an *ignored* SIGINT (pytest started in the background by a
    non-interactive shell, ``cmd &``: the shell ignores SIGINT for it), and the demo then rightly
    keeps ignoring it, so the SIGINT tests would see a run to the end (exit 0). Start the demo with
    SIGINT at its default, as from a terminal or CI."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class Demo:
    """A running ``fraudactors demo``; reads its stdout until a line shows up."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.report = tmp_path / "report.json"
        with _sigint_not_ignored():
            self.proc = subprocess.Popen(
                # 50,000 of history (~6 s; the default is 300,000, ~40 s): these tests are about the run
                [*_script(), "demo", "--report", str(self.report), "--warmup", "50000", *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
        self.family = Descendants(self.proc.pid)
        self.family.start()
        self.lines: list[str] = []
        self.service_pids: list[int] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def wait_for_line(self, prefix: str, timeout_s: float = 90.0) -> str:
        def read() -> str:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._note(line)
                if line.strip().startswith(prefix):
                    return line
            raise AssertionError(f"demo ended before printing {prefix!r}: {self.lines}")

        return self._pool.submit(read).result(timeout=timeout_s)

    def _note(self, line: str) -> None:
        self.lines.append(line.rstrip("\n"))
        match = PID_LINE.match(line.strip())
        if match:
            self.service_pids.append(int(match.group(2)))

    def finish(self, timeout_s: float = 110.0) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout_s)
        for line in out.splitlines():
            self._note(line)
        self.family.stop()
        return self.proc.returncode, err

    def assert_nothing_left(self) -> None:
        assert set(self.service_pids) <= self.family.seen, "the watcher missed the services"
        _wait_gone(self.family.seen)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        if self.family.is_alive():
            self.family.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        d = Demo(tmp_path, *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def test_demo_runs_and_cleans_up(demo: Callable[..., Demo]) -> None:
    run = demo("--duration", "2", "--rate", "200")
    code, err = run.finish()
    assert code == 0, err
    assert len(run.service_pids) == 2, run.lines
    run.assert_nothing_left()
    report = json.loads(run.report.read_text())
    assert report["sent"] == 400
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert any("stopping embedded services" in line for line in run.lines)


@pytest.mark.parametrize(("sig", "expected"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_demo_interrupted_mid_run_leaves_no_process(demo: Callable[..., Demo], sig: int, expected: int) -> None:
    run = demo("--duration", "60", "--rate", "200")
    run.wait_for_line("streaming")
    run.proc.send_signal(sig)
    code, err = run.finish(timeout_s=90)
    assert code == expected, err
    assert len(err.strip().splitlines()) == 1, err
    assert len(run.service_pids) == 2, run.lines
    run.assert_nothing_left()
    assert not run.report.exists()  # an interrupted run claims no result


def test_demo_interrupted_while_starting_leaves_no_process(demo: Callable[..., Demo]) -> None:
    run = demo("--duration", "60", "--rate", "200")
    run.wait_for_line("fraudactors demo: starting")
    run.proc.send_signal(signal.SIGINT)  # lands while the services start (or just after)
    code, err = run.finish(timeout_s=90)
    assert code == 130, err
    run.assert_nothing_left()


def test_demo_killed_mid_run_takes_its_children_along(demo: Callable[..., Demo]) -> None:
    run = demo("--duration", "60", "--rate", "200")
    run.wait_for_line("streaming")
    assert len(run.service_pids) == 2
    run.family.scan()  # everything started so far
    run.proc.kill()
    run.finish(timeout_s=30)
    run.assert_nothing_left()


def test_demo_with_a_missing_binary_fails_in_one_line(tmp_path: Path) -> None:
    env = {**_env(), "FRAUDACTORS_SERVICES__REDIS_BIN": str(tmp_path / "no-such-redis")}
    proc = subprocess.run([*_script(), "demo", "--duration", "1", "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "services.redis_bin" in lines[0] and "no-such-redis" in lines[0]
    assert "broker: tansu pid" not in proc.stdout  # nothing was started
