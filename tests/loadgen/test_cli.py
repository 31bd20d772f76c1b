"""``fraudactors loadgen`` as a user runs it, against a running stand-in engine (the null pipeline)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudactors.settings import Settings
from loadgen.procs import settings_toml


def _env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["FRAUDACTORS_CONFIG"] = str(config)
    return env


@pytest.fixture
def null_engine(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    config = tmp_path / "settings.toml"
    config.write_text(settings_toml(settings))
    proc = subprocess.Popen([sys.executable, "-m", "loadgen.nullpipe"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(config))
    try:
        def ready() -> str:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip() == "null_ready":
                    return line
            raise AssertionError("null pipeline exited before it was ready")

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(ready).result(timeout=60)
        yield config
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def test_loadgen_command_writes_report_markdown_and_charts(null_engine: Path, tmp_path: Path) -> None:
    report = tmp_path / "out" / "lg.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fraudactors", "loadgen", "--rate", "300", "--duration", "1",
         "--profile", "ramp", "--rate-to", "600", "--report", str(report)],
        capture_output=True, text=True, timeout=90, env=_env(null_engine))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["sent"] == 450 == data["decided"]  # (300 + 600) / 2 * 1 s
    assert data["lost"] == 0 and data["duplicates"] == 0
    assert data["profile"]["name"] == "ramp" and data["target_tps"] == 450
    assert report.with_suffix(".md").exists()
    assert len(data["charts"]) == 3 and all(Path(p).exists() for p in data["charts"])
    assert "| lost" in proc.stdout  # the summary table
    assert "[done]" in proc.stderr and "decided 450" in proc.stderr  # progress on stderr


def test_loadgen_command_fails_in_one_line_without_a_broker(tmp_path: Path) -> None:
    config = tmp_path / "none.toml"
    config.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:1"\nrequest_timeout_ms = 2000\n')
    proc = subprocess.run([sys.executable, "-m", "fraudactors", "loadgen", "--rate", "10", "--duration", "1",
                           "--no-progress"], capture_output=True, text=True, timeout=90, env=_env(config))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "cannot connect to Kafka" in proc.stderr


def test_loadgen_on_sigterm_stops_in_one_line_and_leaves_no_earlier_report(null_engine: Path,
                                                                             tmp_path: Path) -> None:
    report = tmp_path / "out" / "lg.json"
    report.parent.mkdir()
    earlier = [report, report.with_suffix(".md"), tmp_path / "out" / "lg-latency.png"]
    for path in earlier:
        path.write_text("an earlier run's")
    other = tmp_path / "out" / "lg-notes.txt"  # not a file the run writes: left alone
    other.write_text("mine")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fraudactors", "loadgen", "--rate", "100", "--duration", "60", "--report", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(null_engine))
    try:
        def sending() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("[send]"):
                    return
            raise AssertionError("loadgen ended before it was sending")

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(sending).result(timeout=60)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert [line for line in err.splitlines() if line.startswith("fraudactors")] == ["fraudactors loadgen: terminated"]
    assert not any(path.exists() for path in earlier)
    assert other.read_text() == "mine"


# The load generator with its chart writer patched to signal the process itself once the charts
# are on disk: the signal comes while the report is being written, at that exact point.
_SIGNAL_WHILE_WRITING = """
import os, signal, sys
import loadgen.charts
from fraudactors.cli import main

write_charts = loadgen.charts.write_charts

def then_signalled(result, base):
    names = write_charts(result, base)
    os.kill(os.getpid(), int(os.environ["SIGNAL_WHILE_WRITING"]))
    return names

loadgen.charts.write_charts = then_signalled
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("sig", "code", "line"), [(signal.SIGINT, 130, "fraudactors loadgen: interrupted"),
                                                   (signal.SIGTERM, 143, "fraudactors loadgen: terminated")])
def test_loadgen_stopped_while_writing_its_report_exits_in_one_line_and_leaves_no_half_report(
        null_engine: Path, tmp_path: Path, sig: signal.Signals, code: int, line: str) -> None:
    """Ctrl-C and SIGTERM after the run, while the report files are written: the summary table is
    printed, one line says why the command stopped, and no half-written report is left."""
    report = tmp_path / "out" / "lg.json"
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_WHILE_WRITING, "loadgen", "--rate", "100", "--duration", "1",
         "--no-progress", "--report", str(report)],
        capture_output=True, text=True, timeout=90, env={**_env(null_engine), "SIGNAL_WHILE_WRITING": str(int(sig))})
    assert proc.returncode == code, proc.stderr
    assert "| lost" in proc.stdout  # the summary table came before the files
    assert [text for text in proc.stderr.splitlines() if text.startswith("fraudactors")] == [line], proc.stderr
    assert not list(report.parent.iterdir()), "a half-written report was left"
