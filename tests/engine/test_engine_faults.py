"""Fault containment (issue 10): a fault is contained where it happens and nothing is lost.

Faults are real where they can be (an inference worker killed with SIGKILL; the broker frozen
with SIGSTOP in test_engine_broker_faults.py). A crash of a feature worker is injected by making
a real stage raise (the monkeypatched stage calls the real one otherwise).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from engine_helpers import nan_model, produce, reading, running, transactions, wait_committed, wait_until

from fraudactors.engine.engine import Engine
from fraudactors.engine.features import FeatureStoreActor
from fraudactors.engine.inference import InferenceActor
from fraudactors.settings import Settings


class Faults:
    """The next ``n`` calls of a stage fail once armed; every other call goes to the real stage."""

    def __init__(self) -> None:
        self.left = 0
        self.fired = 0

    def arm(self, n: int) -> None:
        self.left = n

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self.fired += 1
        return True


def ids_of(records: list[Any]) -> list[str]:
    return [orjson.loads(r.value)["transaction_id"] for r in records]


def restarts(engine: Engine, actor: str) -> float:
    sample = engine.metrics.registry.get_sample_value("fraudactors_actor_restarts_total", {"actor": actor})
    return sample or 0.0


async def test_a_crashed_feature_worker_restarts_from_its_handed_off_offset_and_dead_letters_nothing(
        engine_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing feature computation is the worker's failure, not bad input: the worker crashes,
    its supervisor restarts it, the partition is read again from the end of the last batch handed
    off -- no valid transaction goes to the dead-letter topic, none is skipped, none repeated."""
    s = engine_settings
    faults = Faults()
    real_compute = FeatureStoreActor.compute_staged

    async def compute(self: FeatureStoreActor, *args: Any, **kwargs: Any) -> Any:
        if faults.take():
            raise RuntimeError("injected: feature computation failed")
        return await real_compute(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStoreActor, "compute_staged", compute)
    first = transactions(1000, prefix="crash")
    second = transactions(1000, start=1000, prefix="crash")
    async with running(s) as engine, reading(s, s.topics.predictions) as decided, \
            reading(s, s.topics.dlq) as dead:
        await produce(s, [(k, v) for k, v, _ in first])
        await decided.wait_for(lambda recs: len(recs) >= 1000, timeout_s=60)
        faults.arm(2)  # the batch call, and (before the fix) the first record of its per-record retry
        ends = await produce(s, [(k, v) for k, v, _ in second])
        await decided.wait_for(lambda recs: len(set(ids_of(recs))) >= 2000, timeout_s=60)
        assert faults.fired == 2
        assert engine.ingestor.worker_restarts >= 1
        assert sum(restarts(engine, f"features-{p}") for p in range(s.topics.partitions)) >= 1
        assert restarts(engine, "ingestor") == 0, "a worker's crash stays with the worker"
        commits = await wait_committed(s, ends, timeout_s=30)
        assert commits == ends
    ids = Counter(ids_of(decided.records))
    assert set(ids) == {t for _, _, t in first + second}, "nothing skipped"
    assert max(ids.values()) == 1, "nothing handed off before the crash is decided again"
    assert dead.records == [], "a valid transaction is never dead-lettered for the worker's failure"


async def test_exhausted_worker_restart_budget_escalates_and_the_engine_recovers(
        engine_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """More worker crashes than the budget allows fail the ingestor upward; the root restarts it
    and the engine carries on (it used to keep the failure and die again after every restart)."""
    s = engine_settings.replace(engine={"restart_max": 2, "restart_window_s": 120.0})
    faults = Faults()
    real_score = InferenceActor.score

    async def score(self: InferenceActor, *args: Any, **kwargs: Any) -> Any:
        if faults.take():
            raise RuntimeError("injected: scoring failed")
        return await real_score(self, *args, **kwargs)

    monkeypatch.setattr(InferenceActor, "score", score)
    first = transactions(200, prefix="budget")
    second = transactions(800, start=200, prefix="budget")
    async with running(s) as engine, reading(s, s.topics.predictions) as decided:
        await produce(s, [(k, v) for k, v, _ in first])
        await decided.wait_for(lambda recs: len(recs) >= 200, timeout_s=60)
        faults.arm(3)  # one crash more than restart_max
        await produce(s, [(k, v) for k, v, _ in second])
        await wait_until(lambda: restarts(engine, "ingestor") >= 1, timeout_s=60)
        await decided.wait_for(lambda recs: set(ids_of(recs)) >= {t for _, _, t in second}, timeout_s=90)
        await engine.wait_ready(timeout_s=60)
        assert engine.done is not None and not engine.done.done(), "the engine is still running"
        assert restarts(engine, "ingestor") == 1, "one escalation, one restart of the ingestor"
        # Two more rounds, each decided and committed: the restarted ingestor lives through
        # several housekeeping passes (each commit is made by one).
        for start in (1000, 1300):
            more = transactions(300, start=start, prefix="budget")
            ends = await produce(s, [(k, v) for k, v, _ in more])
            await decided.wait_for(lambda recs, more=more: set(ids_of(recs)) >= {t for _, _, t in more},
                                   timeout_s=60)
            commits = await wait_committed(s, ends, timeout_s=30)
            assert all(commits.get(p, 0) >= end for p, end in ends.items()), (commits, ends)
        assert restarts(engine, "ingestor") == 1
        assert engine.done is not None and not engine.done.done()
    assert faults.fired == 3


async def test_a_killed_inference_worker_mid_stream_loses_nothing(engine_settings: Settings) -> None:
    s = engine_settings
    assert s.engine.inference_mode == "process", "this fault needs the process pool (the engine's default)"
    stop_feeding = asyncio.Event()
    sent: list[str] = []

    async def feed() -> None:
        i = 0
        while not stop_feeding.is_set():
            batch = transactions(100, start=i, prefix="kill")
            await produce(s, [(k, v) for k, v, _ in batch])
            sent.extend(t for _, _, t in batch)
            i += 100

    async with running(s) as engine, reading(s, s.topics.predictions) as decided:
        pool = engine.inference._pool
        feeder = asyncio.create_task(feed())
        try:
            await decided.wait_for(lambda recs: len(recs) >= 500, timeout_s=60)
            (pid,) = pool.pids
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: pool.worker_restarts_total >= 1 and pool.pids and pool.pids[0] != pid,
                             timeout_s=60)
            count = len(decided.records)
            await decided.wait_for(lambda recs: len(recs) >= count + 300, timeout_s=60)
        finally:
            stop_feeding.set()
            await feeder
        await decided.wait_for(lambda recs: set(ids_of(recs)) >= set(sent), timeout_s=60)
        assert pool.worker_deaths_total == 1
        assert engine.supervisor.restarts_total == 0
    assert set(ids_of(decided.records)) == set(sent)


async def test_a_model_scoring_nan_sends_its_rows_to_review_and_the_stream_goes_on(
        engine_settings: Settings, models_dir: Path, tmp_path: Path) -> None:
    """A broken export that scores NaN must neither approve (every comparison with NaN is false)
    nor stop the partition (the A/B tally and the monitor cannot bin NaN): its rows are decided at
    its review threshold, counted and logged; the other variant's rows are untouched."""
    root = tmp_path / "models"
    root.mkdir()
    for version in ("v1", "v2"):
        (root / version).symlink_to(models_dir / version, target_is_directory=True)
    nan_model(models_dir, root)
    review = json.loads((root / "v3-nan" / "metadata.json").read_text())["thresholds"]["review"]
    s = engine_settings.replace(models={"dir": str(root), "variants": {
        "A": {"version": "v1", "weight": 0.5}, "B": {"version": "v3-nan", "weight": 0.5}}})
    txns = transactions(400)
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, [(k, v) for k, v, _ in txns])
        await reader.wait_for(lambda recs: len(recs) >= len(txns), timeout_s=90)
        decisions = {d["transaction_id"]: d for d in reader.decisions()}
        counted = engine.metrics.registry.get_sample_value("fraudactors_nonfinite_scores_total",
                                                           {"version": "v3-nan"})
        restarted = [(sample.labels, sample.value) for metric in engine.metrics.registry.collect()
                     for sample in metric.samples if sample.name == "fraudactors_actor_restarts_total"]
        assert all(value == 0 for _, value in restarted), restarted
    assert len(decisions) == len(txns)
    broken = [d for d in decisions.values() if d["model_version"] == "v3-nan"]
    assert broken and counted == len(broken)
    assert {d["decision"] for d in broken} == {"review"}
    assert all(d["fraud_probability"] == round(review, 6) for d in broken)  # as SPEC §3 decisions carry it
    assert {d["decision"] for d in decisions.values() if d["model_version"] == "v1"} >= {"approve"}
