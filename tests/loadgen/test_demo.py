"""The full ``fraudactors demo``: embedded services, the engine as a child process, the load
generator, the report files; and the models bootstrap it relies on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fraudactors.settings import load_settings
from loadgen.models import ensure_models
from loadgen.report import check_report

PID_LINE = re.compile(r"^(?:broker: tansu|redis:|engine:) pid (\d+) ")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.usefixtures("models_dir")  # the demo finds the checkout's models/; they must load
def test_demo_runs_engine_and_load_and_writes_the_report(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}
    env["PYTHONUNBUFFERED"] = "1"
    report_path = tmp_path / "reports" / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fraudactors", "demo", "--rate", "200", "--duration", "5", "--warmup", "2000",
         "--report", str(report_path)],
        capture_output=True, text=True, timeout=110, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    check_report(report)
    assert report["sent"] == 1000 and report["target_tps"] == 200 and report["duration_s"] == 5
    assert report["decided"] == 1000 and report["lost"] == 0 and report["duplicates"] == 0
    assert report["dlq"] == 0
    assert report["variants"]["A"] + report["variants"]["B"] == 1000
    assert report["engine_exit_code"] == 0
    assert report["warmup"]["decided"] == 2000  # history first, then the measured run
    assert report["latency_ms"]["p50"] > 0
    # where the engine's time went over the send window, read from its /metrics
    stages = report["engine_stages_ms"]
    for stage in ("parse", "features", "state_write", "inference", "publish"):
        assert stages[stage]["batches"] > 0 and stages[stage]["mean_ms"] > 0, (stage, stages)
    assert any(line.startswith("engine stages over the send window") for line in proc.stdout.splitlines())
    assert report_path.with_suffix(".md").is_file()
    assert b"engine_ready" in Path(report["engine_log"]).read_bytes()
    assert [Path(c).name for c in report["charts"]] == ["demo-latency.png", "demo-throughput.png",
                                                       "demo-distribution.png"]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("streaming ") for line in lines)
    assert any(line.startswith("| latency p50 / p95 / p99") for line in lines)  # the summary table
    # the A/B table closes the summary: every decision (warm-up and run) in the ledger, per model
    assert any(line.startswith("A/B evidence, event time") for line in lines)
    assert any(line.startswith("labels fed: ") for line in lines)
    deciding = [row for row in report["ab"]["variants"] if row["role"] == "deciding"]
    assert {row["variant"] for row in deciding} == {"A", "B"}
    assert sum(row["decisions"] for row in deciding) == 3000
    assert report["ab"]["comparisons"][0]["champion"] == "d:A/v1"
    pids = [int(m.group(1)) for m in map(PID_LINE.match, lines) if m]
    assert len(pids) == 3, lines  # broker, Redis, engine
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"left behind: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)


def test_models_come_from_the_configured_dir_or_the_checkout(tmp_path: Path, models_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import loadgen.models

    settings = load_settings(env={}, overrides={"models": {"dir": str(models_dir)}})
    assert ensure_models(settings) == models_dir.resolve()
    # A relative default that does not exist here falls back to the checkout's models/.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loadgen.models, "REPO_MODELS", models_dir)
    relative = load_settings(env={}, overrides={"models": {"dir": "models"}})
    assert ensure_models(relative) == models_dir
    # An absolute directory is taken as meant: a missing variant there is not papered over.
    partial = tmp_path / "partial"
    (partial / "v1").mkdir(parents=True)
    for name in ("model.onnx", "metadata.json"):
        (partial / "v1" / name).write_bytes((models_dir / "v1" / name).read_bytes())
    assert not loadgen.models._complete(partial, {"v1", "v2"})
    assert loadgen.models._complete(partial, {"v1"})
