"""The load generator against a real broker and a real responder loop (the null pipeline)."""

from __future__ import annotations

from pathlib import Path

import orjson

from fraudactors.settings import Settings
from loadgen.report import check_report, write_outputs
from loadgen.runner import LoadConfig, run_load
from loadgen.schedule import make_profile


async def test_loadgen_against_a_responder_decides_everything(settings: Settings, responder, tmp_path: Path) -> None:
    config = LoadConfig(profile=make_profile("constant", 400, 1.5), drain_timeout_s=30, progress=False)
    async with responder(settings):
        result = await run_load(settings, config)
    report = write_outputs(result, tmp_path / "r.json")
    check_report(report)
    assert report["sent"] == 600
    assert report["decided"] == 600 and report["lost"] == 0 and report["duplicates"] == 0
    assert report["variants"] == {"A": 600, "B": 0}
    assert report["dlq"] == 0
    assert report["latency_ms"]["max"] > 0
    on_disk = orjson.loads((tmp_path / "r.json").read_bytes())
    assert on_disk["sent"] == 600
    assert (tmp_path / "r.md").read_text().startswith("# Load report")
    for name in ("r-latency.png", "r-throughput.png", "r-distribution.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
