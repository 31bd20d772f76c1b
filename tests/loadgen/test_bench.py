"""Short smokes of the benchmark machinery (tiny backlogs; no assertion on any rate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fraudactors.settings import Settings
from loadgen.bench_drain import fill_backlog, machine, run_trial, trial_settings
from loadgen.procs import CpuMeter, StageMeter, cpu_seconds, null_child, settings_toml


async def test_null_pipeline_child_drains_a_backlog_and_exits_cleanly(settings: Settings, tmp_path: Path) -> None:
    await fill_backlog(settings, 1500)
    s = trial_settings(settings, "null")
    result = await run_trial("null", s, [null_child(s, tmp_path, "null")], 1500, 60.0, {})
    assert result["complete"] is True
    assert result["decided"] == 1500
    assert result["exit_codes"] == [0]  # SIGTERM: commit and leave
    assert result["basis"] in ("after_ready", "first_to_last_decision") and result["tps"] >= 0
    assert set(result["cpu_cores"]) == {"null", "bench"}


def test_settings_cross_into_a_child_unchanged(settings: Settings, tmp_path: Path) -> None:
    from fraudactors.settings import load_settings

    custom = settings.replace(models={"variants": {"A": {"version": "v9", "weight": 1.0}}},
                              decision={"is_fraud_decisions": ("decline",)})
    path = tmp_path / "child.toml"
    path.write_text(settings_toml(custom))
    assert load_settings(path, env={}) == custom


def test_cpu_meter_reads_proc_and_machine_names_the_box() -> None:
    assert (cpu_seconds(os.getpid()) or 0) > 0
    meter = CpuMeter({"me": os.getpid()})
    meter.start()
    sum(i * i for i in range(200_000))
    cores = meter.stop()
    assert set(cores) == {"me"} and cores["me"] >= 0
    info = machine()
    assert info["nproc"] >= 1 and "date" in info


async def test_stage_meter_gives_each_stages_batches_and_mean_over_its_window(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two reads of a real /metrics (an EngineMetrics on aiohttp): the stages observed between
    them, their count and mean; a stage not observed in the window is left out; an engine that
    cannot be read gives None and one line on stderr, not a failed report."""
    from aiohttp import web

    from fraudactors.engine.metrics import EngineMetrics

    metrics = EngineMetrics()
    stage = metrics.stage_latency
    stage.labels("parse").observe(5.0)  # before the window: not in it

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        meter = StageMeter(f"http://127.0.0.1:{port}/metrics")
        await meter.start()  # the first read is made before the window's batches
        for seconds in (0.002, 0.004):
            stage.labels("features").observe(seconds)
        stage.labels("inference").observe(0.003)
        meter.stop()
        assert await meter.result() == {"features": {"batches": 2, "mean_ms": 3.0},
                                        "inference": {"batches": 1, "mean_ms": 3.0}}
    finally:
        await runner.cleanup()
    gone = StageMeter(f"http://127.0.0.1:{port}/metrics", timeout_s=2.0)
    gone.start()
    gone.stop()
    assert await gone.result() is None
    assert "engine stages: /metrics not read" in capsys.readouterr().err


def _bench(args: list[str], tmp_path: Path, models_dir: Path) -> tuple[str, dict]:
    config = tmp_path / "bench.toml"
    config.write_text(f'[models]\ndir = "{models_dir}"\n')
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}
    proc = subprocess.run([sys.executable, "-m", "fraudactors", "bench", *args, "--config", str(config),
                           "--json", str(out)], capture_output=True, text=True, timeout=110, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_drain_bench_smoke_prints_engine_null_and_ratio(tmp_path: Path, models_dir: Path) -> None:
    """With a little history first (0.1 simulated day): drained, then the 3,000 measured."""
    out, result = _bench(["drain", "--records", "3000", "--history-days", "0.1", "--timeout", "60"], tmp_path,
                         models_dir)
    assert "engine/null" in out and "records of history" in out
    history = result["history_records"]
    assert history > 1000 and result["engine"]["history_records"] == history == result["null"]["history_records"]
    assert result["engine"]["complete"] and result["null"]["complete"]
    assert result["engine"]["decided"] == 3000 == result["null"]["decided"]
    assert result["engine"]["exit_codes"] == [0] and result["null"]["exit_codes"] == [0]
    assert result["machine"]["nproc"] >= 1 and "ratio" in result


@pytest.mark.slow
def test_scaleout_bench_smoke_runs_one_then_two_engines(tmp_path: Path, models_dir: Path) -> None:
    out, result = _bench(["scaleout", "--records", "3000", "--timeout", "60"], tmp_path, models_dir)
    assert "speed-up" in out
    assert result["one"]["processes"] == 1 and result["two"]["processes"] == 2
    assert result["one"]["complete"] and result["two"]["complete"]
    assert result["two"]["exit_codes"] == [0, 0]


def test_pool_bench_smoke_compares_process_and_thread(tmp_path: Path, models_dir: Path) -> None:
    out, result = _bench(["pool", "--rows", "1,16", "--calls", "30", "--concurrency", "4"], tmp_path, models_dir)
    assert "process" in out and "thread" in out
    for mode in ("process", "thread"):
        assert [r["rows"] for r in result[mode]] == [1, 16]
        assert all(r["rows_per_s_sequential"] > 0 and r["latency_ms_p99"] >= r["latency_ms_p50"] for r in result[mode])
