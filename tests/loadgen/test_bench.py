"""Short smokes of the benchmark machinery (tiny backlogs; no assertion on any rate)."""

from __future__ import annotations

import os
from pathlib import Path

from fraudactors.settings import Settings
from loadgen.bench_drain import fill_backlog, machine, run_trial, trial_settings
from loadgen.procs import CpuMeter, cpu_seconds, null_child, settings_toml


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
