"""Degraded mode decides with the routed variant's fallback, under decision.degraded_policy.

Unit tests of the policy and of the inference actor on degraded rows (committed models, scorer in a
thread), and the promise end to end: with Redis frozen mid-stream (SIGSTOP), the simulator's
traffic is decided by the fallbacks and their false-positive rate stays within twice the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from engine_helpers import metric_samples, metric_sum, produce, reading, running

from fraudactors.engine.decision import Thresholds
from fraudactors.engine.inference import InferenceActor
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import ModelError
from fraudactors.features.definition import FEATURE_INDEX, TRANSACTION_ONLY, transaction_only_features
from fraudactors.features.offline import offline_features
from fraudactors.features.schema import transaction_from_obj
from fraudactors.modeling.policy import DegradedPolicy
from fraudactors.modeling.registry import load_model_info
from fraudactors.modeling.scorer import Scorer
from fraudactors.settings import Settings
from fraudactors.sim import Simulator

FALLBACK_OF = {"A": "v1-fallback", "B": "v2-fallback"}


# -- the policy ------------------------------------------------------------------------------------------

def test_the_score_policy_keeps_the_fallbacks_decision() -> None:
    policy = DegradedPolicy("score", 20.0)
    assert [policy.apply(d, 5.0) for d in ("approve", "review", "decline")] == ["approve", "review", "decline"]


def test_the_review_policy_makes_every_degraded_decision_at_least_review() -> None:
    policy = DegradedPolicy("review")
    assert [policy.apply(d, 5.0) for d in ("approve", "review", "decline")] == ["review", "review", "decline"]


def test_the_approve_below_policy_approves_small_payments_and_leaves_the_rest_to_the_fallback() -> None:
    policy = DegradedPolicy("approve-below", 20.0)
    assert [policy.apply(d, 19.99) for d in ("approve", "review", "decline")] == ["approve"] * 3
    assert [policy.apply(d, 20.0) for d in ("approve", "review", "decline")] == ["approve", "review", "decline"]
    assert policy.apply("decline", 0.0) == "approve"  # a card verification (amount 0) is small
    # compared as the scored float32 amount: 19.99 against 19.99 is not below
    assert DegradedPolicy("approve-below", 19.99).apply("review", float(np.float32(19.99))) == "review"
    assert policy.label == "approve-below 20"
    with pytest.raises(ValueError, match="unknown degraded policy"):
        DegradedPolicy("decline")


def test_the_policy_comes_from_the_settings() -> None:
    s = Settings().replace(decision={"degraded_policy": "approve-below", "degraded_approve_below": 50})
    assert DegradedPolicy.from_settings(s.decision) == DegradedPolicy("approve-below", 50.0)
    assert DegradedPolicy.from_settings(Settings().decision) == DegradedPolicy("score", 20.0)


# -- the inference actor ---------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def inference(settings: Settings, metrics: EngineMetrics | None = None) -> AsyncIterator[InferenceActor]:
    actor = InferenceActor(settings, metrics or EngineMetrics())
    started = asyncio.Event()

    class Status:
        def started(self, value: Any = None) -> None:
            started.set()

    task = asyncio.create_task(actor.run(Status()))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiter], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    try:
        if task.done():
            task.result()  # the start failure
        assert started.is_set(), "inference actor did not start"
        yield actor
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@functools.cache
def sim_batch(n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Degraded (transaction-only) and full feature vectors of ``n`` simulated transactions (fraud
    five times as common as usual, so card tests and other small frauds are among them), and their ids."""
    events = []
    for ev in Simulator(seed=5, n_users=300, n_merchants=200, days=3.0, fraud_scale=5.0, id_prefix="deg-").stream():
        events.append(ev)
        if len(events) == n:
            break
    txns = [transaction_from_obj(ev.txn) for ev in events]
    degraded = np.array([transaction_only_features(t) for t in txns], dtype=np.float32)
    return degraded, offline_features(txns), [t.transaction_id for t in txns]


def thread_settings(models_dir: Path, **decision: Any) -> Settings:
    return Settings().replace(models={"dir": str(models_dir)}, engine={"inference_mode": "thread"},
                              decision=decision)


async def test_degraded_rows_are_scored_by_the_routed_variants_fallback(models_dir: Path) -> None:
    X_degraded, X_full, ids = sim_batch(2000)
    infos = {v: load_model_info(models_dir, v) for v in ("v1", "v2")}
    scorer = Scorer(list(infos.values()))
    async with inference(thread_settings(models_dir)) as actor:
        normal = await actor.score(X_full, ids)
        degraded = await actor.score(X_degraded, ids, degraded=True)
        # one coalesced call can mix a degraded batch and a normal one
        mixed = await asyncio.gather(actor.score(X_full[:1000], ids[:1000]),
                                     actor.score(X_degraded[1000:], ids[1000:], degraded=True))
    assert [s.variant for s in normal] == [s.variant for s in degraded] == [actor.router.route(t).name for t in ids]
    assert {s.variant for s in degraded} == {"A", "B"}
    assert all(s.model_version == {"A": "v1", "B": "v2"}[s.variant] for s in normal)
    assert all(s.model_version == FALLBACK_OF[s.variant] for s in degraded)
    for info in infos.values():
        fb = info.fallback
        assert fb is not None
        rows = [i for i, s in enumerate(degraded) if s.model_version == fb.version]
        probs = scorer.predict_proba(fb.version, X_degraded[rows])
        thresholds = Thresholds(fb.review_threshold, fb.decline_threshold)
        assert [degraded[i].probability for i in rows] == probs.tolist()
        assert [degraded[i].decision for i in rows] == [thresholds.decide(p) for p in probs.tolist()]
    assert all(set(s.reasons) <= set(TRANSACTION_ONLY) for s in degraded)
    assert any(s.reasons for s in degraded)
    assert [*mixed[0], *mixed[1]] == [*normal[:1000], *degraded[1000:]]


@pytest.mark.parametrize("policy", ["review", "approve-below"])
async def test_the_degraded_policy_changes_only_degraded_decisions(models_dir: Path, policy: str) -> None:
    X_degraded, X_full, ids = sim_batch(2000)
    async with inference(thread_settings(models_dir)) as actor:
        normal = await actor.score(X_full, ids)
        scored = await actor.score(X_degraded, ids, degraded=True)
    async with inference(thread_settings(models_dir, degraded_policy=policy, degraded_approve_below=25.0)) as actor:
        assert await actor.score(X_full, ids) == normal, "a normal decision ignores the degraded policy"
        ruled = await actor.score(X_degraded, ids, degraded=True)
    amounts = X_degraded[:, FEATURE_INDEX["amount"]]
    for before, after, amount in zip(scored, ruled, amounts.tolist(), strict=True):
        assert (after.probability, after.model_version, after.reasons) == (
            before.probability, before.model_version, before.reasons)
        if policy == "review":
            expected = "review" if before.decision == "approve" else before.decision
        else:
            expected = "approve" if amount < 25.0 else before.decision
        assert after.decision == expected
        assert after.is_fraud == (expected != "approve")
    changed = sum(a.decision != b.decision for a, b in zip(scored, ruled, strict=True))
    assert changed > 0, "the sample should exercise the policy"


async def test_a_shadow_variant_scores_degraded_rows_with_its_own_fallback(models_dir: Path) -> None:
    X_degraded, _, ids = sim_batch(2000)
    s = thread_settings(models_dir).replace(models={"variants": {
        "A": {"version": "v1", "weight": 1.0}, "S": {"version": "v2", "shadow": True}}})
    metrics = EngineMetrics()
    async with inference(s, metrics) as actor:
        scored = await actor.score(X_degraded, ids, degraded=True)
    fb = load_model_info(models_dir, "v2").fallback
    assert fb is not None
    probs = Scorer([load_model_info(models_dir, "v2")]).predict_proba(fb.version, X_degraded)
    thresholds = Thresholds(fb.review_threshold, fb.decline_threshold)
    expected = [thresholds.decide(p) != "approve" for p in probs.tolist()]
    assert [{sh.variant: sh.is_fraud for sh in x.shadows}["S"] for x in scored] == expected
    assert all(x.shadows[0].model_version == "v2-fallback" for x in scored)
    assert [x.shadows[0].probability for x in scored] == probs.tolist()
    assert all(x.model_version == "v1-fallback" for x in scored)
    samples = metric_samples(metrics.render())
    assert metric_sum(samples, "fraudactors_shadow_scores_total", model_version="v2-fallback") == len(ids)
    assert metric_sum(samples, "fraudactors_fraud_probability_count") == 0, "fallback scores stay out of it"


async def test_only_the_scoring_published_is_counted_in_the_metrics_and_the_model_monitor(models_dir: Path) -> None:
    """A worker scores a batch while its state is written (``observe=False``). If the write fails,
    it scores the batch again on the features it got instead, degraded, and publishes that: only
    that scoring is counted. If the write lands, it hands the first scoring to ``observe``."""
    X_degraded, X_full, ids = sim_batch(400)
    times = [1.7e9 + i for i in range(len(ids))]
    s = thread_settings(models_dir).replace(models={"variants": {
        "A": {"version": "v1", "weight": 1.0}, "S": {"version": "v2", "shadow": True}}},
        monitor={"min_rows": 1})
    metrics = EngineMetrics()

    def counted() -> tuple[float, float, float, float]:
        """Histogram counts of A and of S, shadow scores, the degraded share."""
        samples = metric_samples(metrics.render())
        share = samples["fraudactors_degraded_share"][()]
        return (metric_sum(samples, "fraudactors_fraud_probability_count", variant="A"),
                metric_sum(samples, "fraudactors_fraud_probability_count", variant="S"),
                metric_sum(samples, "fraudactors_shadow_scores_total"), share)

    async with inference(s, metrics) as actor:
        await actor.score(X_full, ids, event_times=times, observe=False)
        assert counted() == (0, 0, 0, 0.0), "a scoring that may be replaced is not counted"
        monitor = actor.monitor
        assert monitor is not None and monitor.psi("v1") is None, "nor seen by the monitor"
        assert monitor.psi("v2") is None
        # the write failed: scored again, degraded, and published
        await actor.score(X_degraded, ids, degraded=True, event_times=times)
        assert counted() == (0, 0, len(ids), 1.0)
        # the next batch's write lands: its first scoring is the one published
        scored = await actor.score(X_full, ids, event_times=times, observe=False)
        actor.observe(X_full, scored, False, times)
        assert counted() == (len(ids), len(ids), 2 * len(ids), 0.5)
        assert monitor.psi("v1") is not None and monitor.psi("v1-fallback") is not None
        assert monitor.psi("v2") is not None and monitor.psi("v2-fallback") is not None, "the shadow's windows"


async def test_models_without_a_fallback_are_refused_at_start(models_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(models_dir, tmp_path / "models")
    meta_path = tmp_path / "models" / "v2" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["fallback"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="model v2 has no fallback for degraded mode"):
        async with inference(thread_settings(tmp_path / "models")):
            pass


# -- end to end: Redis frozen mid-stream -----------------------------------------------------------------

async def _post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


async def test_with_redis_frozen_mid_stream_the_fallbacks_decide_within_twice_the_target_fpr(
        engine_settings: Settings, fresh_redis: Any, models_dir: Path) -> None:
    """SIGSTOP of Redis, then two simulated days (~8,700 transactions, 1,500 users) streamed: every
    decision is degraded, made by the fallback of the routed variant, and the false-positive rate on
    the simulator's legitimate transactions -- computed from the decisions -- is at most twice the
    review threshold's target FPR, per variant too. POST /predict meanwhile does the same."""
    s = engine_settings.replace(redis={"url": fresh_redis.url, "socket_timeout_ms": 400, "retry_interval_ms": 200})
    target = max(load_model_info(models_dir, v).metadata["fallback"]["thresholds"]["review_target_fpr"]
                 for v in ("v1", "v2"))
    sim = Simulator(seed=101, n_users=1500, n_merchants=400, days=2.0, id_prefix="fz-")
    events = list(sim.stream())
    truth = {str(ev.txn["transaction_id"]): ev.is_fraud for ev in events}
    records = [(str(ev.txn["user_id"]).encode(), orjson.dumps(ev.txn)) for ev in events]
    warm = {"transaction_id": "warm", "user_id": "u-warm", "amount": 12.0, "timestamp": sim.start_time - 60.0}
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, [(b"u-warm", orjson.dumps(warm))])
        await reader.wait_for(lambda recs: len(recs) >= 1, timeout_s=30)
        os.kill(fresh_redis.pid, signal.SIGSTOP)
        try:
            await produce(s, records)
            await reader.wait_for(lambda recs: len(recs) >= 1 + len(records), timeout_s=90)
            probe = {**events[0].txn, "transaction_id": "fz-predict"}
            status, body = await _post(engine.http.port, "/predict", orjson.dumps(probe))
            metrics = metric_samples(engine.metrics.render())
        finally:
            os.kill(fresh_redis.pid, signal.SIGCONT)
    assert reader.decisions()[0]["transaction_id"] == "warm" and not reader.decisions()[0]["degraded"]
    first: dict[str, dict[str, Any]] = {}
    for d in reader.decisions()[1:]:
        first.setdefault(d["transaction_id"], d)
    assert set(first) == set(truth)
    frozen = list(first.values())
    assert all(d["degraded"] for d in frozen)
    assert all(d["model_version"] == FALLBACK_OF[d["variant"]] for d in frozen)
    assert all(set(d["reasons"]) <= set(TRANSACTION_ONLY) for d in frozen)
    for variant, version in FALLBACK_OF.items():
        count = sum(d["variant"] == variant for d in frozen)
        assert metric_sum(metrics, "fraudactors_decisions_total", model_version=version) == count
    assert metric_sum(metrics, "fraudactors_degraded_total") == len(frozen)

    rates = {}
    for name, subset in (("all", frozen), *((v, [d for d in frozen if d["variant"] == v]) for v in FALLBACK_OF)):
        legit = [d for d in subset if not truth[d["transaction_id"]]]
        fraud = [d for d in subset if truth[d["transaction_id"]]]
        rates[name] = (sum(d["is_fraud"] for d in legit) / len(legit), len(legit),
                       sum(d["is_fraud"] for d in fraud) / max(len(fraud), 1), len(fraud))
    print("degraded decisions (fpr, legit, detection, frauds):", rates)
    assert rates["B"][1] >= 500, "enough legitimate traffic for variant B to measure its FPR"
    for name, (fpr, n_legit, _, _) in rates.items():
        assert fpr <= 2 * target, f"{name}: FPR {fpr:.4f} on {n_legit} legitimate transactions > 2 x {target}"

    assert status == 200, body
    decision = orjson.loads(body)
    assert decision["degraded"] is True
    assert decision["model_version"] == FALLBACK_OF[decision["variant"]]
    assert set(decision["reasons"]) <= set(TRANSACTION_ONLY)


async def test_a_scoring_call_cancelled_before_it_ran_gives_its_permit_back() -> None:
    """The actor stopping (or crashing) right after it started calls cancels tasks that never ran
    a step: their permits must come back, or the restarted actor (the semaphore is kept across
    restarts) runs with fewer calls in flight each time, down to none."""
    settings = Settings()
    actor = InferenceActor(settings, EngineMetrics())
    loop = asyncio.get_running_loop()
    permits = settings.engine.max_inflight_batches
    for _ in range(permits):
        await actor._start_call(loop, [])
    tasks = list(actor._calls)
    assert actor._inflight.locked()
    for task in tasks:  # what _close does, before any of them ran
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert all(task.cancelled() for task in tasks) and not actor._calls
    for _ in range(permits):  # every permit is free again
        await asyncio.wait_for(actor._inflight.acquire(), 1)
