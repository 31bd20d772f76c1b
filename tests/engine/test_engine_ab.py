"""A/B evidence end to end: decisions and delayed labels into the ledger, `fraudactors ab report`,
the fraudactors_ab_* metrics and the optional `shadow` field of SPEC §3."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from engine_helpers import engine_env, metric_samples, metric_sum, produce, reading, transactions, wait_until

from fraudactors.ab.ledger import parse_member
from fraudactors.engine.engine import Engine
from fraudactors.settings import Settings

VARIANTS = {"A": {"version": "v1", "weight": 0.9}, "B": {"version": "v2", "weight": 0.1},
            "S": {"version": "v2", "weight": 0.0, "shadow": True}}


def _label(txn: dict[str, Any], fraud: bool, at: str) -> tuple[bytes, bytes]:
    return txn["user_id"].encode(), orjson.dumps({
        "transaction_id": txn["transaction_id"], "user_id": txn["user_id"], "merchant_id": txn["merchant_id"],
        "is_fraud": fraud, "labeled_at": at})


async def test_ab_report_counts_every_decision_and_label_per_model_shadow_included(
        engine_settings: Settings) -> None:
    s = engine_settings.replace(models={"dir": engine_settings.models.dir, "variants": VARIANTS},
                                engine={"emit_shadow": True},
                                ab={"bucket_s": 60, "label_delay_s": 120.0, "refresh_s": 0.2})
    txns = transactions(800, prefix="ab")  # 400 s of event time: 7 buckets of 60 s
    objs = {tid: orjson.loads(v) for _, v, tid in txns}
    engine = Engine(s)
    await engine.start()
    try:
        await engine.wait_ready(timeout_s=60)
        async with reading(s, s.topics.predictions) as reader:
            await produce(s, [(k, v) for k, v, _ in txns])
            await reader.wait_for(lambda recs: len(recs) >= 800, timeout_s=60)
        decisions = {d["transaction_id"]: d for d in reader.decisions()}
        assert len(decisions) == 800
        await engine.outcomes.flush()
        # Every decision carries the shadow's probability (SPEC §3 "shadow"), never a deciding one's.
        assert all(set(d["shadow"]) == {"S"} and 0.0 <= d["shadow"]["S"] <= 1.0 for d in decisions.values())
        thresholds = engine.inference._thresholds["v2"]
        shadow_flag = {t: thresholds.decide(d["shadow"]["S"]) != "approve" for t, d in decisions.items()}

        # Labels for the first 300: every 3rd a fraud; then one fraud overturned by a later label.
        labelled = [tid for _, _, tid in txns[:300]]
        fraud = {tid: i % 3 == 0 for i, tid in enumerate(labelled)}
        labels = [_label(objs[tid], fraud[tid], "2026-12-03T10:00:00+00:00") for tid in labelled]
        flipped = labelled[0]
        labels.append(_label(objs[flipped], False, "2026-12-04T10:00:00+00:00"))
        fraud[flipped] = False
        await produce(s, labels, topic=s.topics.labels)
        await wait_until(lambda: engine.labels.applied >= 301, timeout_s=60)
        await engine.outcomes.flush()

        expected: dict[str, dict[str, int]] = {}

        def add(name: str, key: str, n: int = 1) -> None:
            expected.setdefault(name, {}).setdefault(key, 0)
            expected[name][key] += n

        for tid, d in decisions.items():
            deciding = f"d:{d['variant']}/{d['model_version']}"
            for name, flagged in ((deciding, d["is_fraud"]), ("s:S/v2", shadow_flag[tid])):
                add(name, "decisions")
                add(name, "flagged", flagged)
                if tid in fraud:
                    key = ("frauds_caught" if flagged else "frauds_missed") if fraud[tid] else "labelled_legitimate"
                    add(name, key)
        from fraudactors.ab.cli import fetch

        report = await fetch(s)
        rows = {row["member"]: row for row in report["variants"]}
        assert set(rows) == set(expected), (set(rows), set(expected))
        for name, counts in expected.items():
            for key, n in counts.items():
                assert rows[name][key] == n, (name, key, rows[name][key], n)
            assert rows[name]["role"] == ("shadow" if name.startswith("s:") else "deciding")
        assert report["champion"] == "d:A/v1"
        by_challenger = {c["challenger"]: c for c in report["comparisons"]}
        assert by_challenger["d:B/v2"]["traffic"] == "split"
        pair = by_challenger["s:S/v2"]
        assert pair["traffic"] == "identical"
        # every label (the flipped one too) was counted in its card's group: both tests cluster by card
        assert by_challenger["d:B/v2"]["test"] == "two-proportion z + card-clustered"
        assert pair["test"] == "mcnemar exact + card-clustered"
        assert all(row["detection_design_effect"] is not None for row in rows.values() if row["frauds_caught"])
        frauds_by_a = [t for t in fraud if fraud[t] and decisions[t]["variant"] == "A"]
        assert pair["paired_frauds"] == len(frauds_by_a)
        assert pair["only_champion_caught"] == sum(decisions[t]["is_fraud"] and not shadow_flag[t]
                                                   for t in frauds_by_a)
        assert pair["only_challenger_caught"] == sum(shadow_flag[t] and not decisions[t]["is_fraud"]
                                                     for t in frauds_by_a)
        newest = max(o["timestamp"] for o in objs.values())
        assert report["window"]["to"] is not None
        mature = sum(1 for o in objs.values()
                     if (int(o["timestamp"] // 60) + 1) * 60 <= newest - 120.0)
        assert rows["s:S/v2"]["label_maturity"] == mature / 800

        # The same figures as metrics, refreshed by every replica.
        await wait_until(lambda: engine.ab.refreshes >= 2, timeout_s=10)
        await asyncio.sleep(0.3)
        samples = metric_samples(engine.metrics.render())
        for name, row in rows.items():
            _, variant, version = parse_member(name)
            assert metric_sum(samples, "fraudactors_ab_decisions", variant=variant, version=version) \
                == row["decisions"], name
        assert metric_sum(samples, "fraudactors_ab_frauds", variant="S", outcome="caught") \
            == rows["s:S/v2"]["frauds_caught"]
        assert metric_sum(samples, "fraudactors_ab_p_value", challenger="s:S/v2") == pair["p_value"]
    finally:
        await engine.stop()

    # The command line prints the same report (table and JSON) from the shared Redis.
    env = engine_env(s, FRAUDACTORS_AB__BUCKET_S="60", FRAUDACTORS_AB__LABEL_DELAY_S="120")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fraudactors.cli", "ab", "report", "--json", "-", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    printed = orjson.loads(out)
    assert printed["variants"] == orjson.loads(orjson.dumps(report["variants"]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fraudactors.cli", "ab", "report", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "S/v2" in text and "shadow" in text and "identical traffic" in text, text


async def test_decisions_carry_no_shadow_field_unless_configured(engine_settings: Settings) -> None:
    s = engine_settings.replace(models={"dir": engine_settings.models.dir, "variants": VARIANTS})
    engine = Engine(s)
    await engine.start()
    try:
        await engine.wait_ready(timeout_s=60)
        async with reading(s, s.topics.predictions) as reader:
            await produce(s, [(k, v) for k, v, _ in transactions(50, prefix="ns")])
            await reader.wait_for(lambda recs: len(recs) >= 50, timeout_s=60)
        assert all("shadow" not in d for d in reader.decisions())
    finally:
        await engine.stop()


async def test_a_report_the_reporter_cannot_make_leaves_it_running(settings: Settings, monkeypatch: Any) -> None:
    """Every replica reads the same ledger: a report that fails (a bug, a ledger it cannot read)
    must not crash the reporter, or every engine would restart until the window moved on."""
    from fraudactors.actors import IGNORED
    from fraudactors.engine import ab
    from fraudactors.engine.metrics import EngineMetrics

    calls = 0

    async def failing(client: Any, s: Settings) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise ValueError("math domain error")

    monkeypatch.setattr(ab, "ledger_report", failing)
    metrics = EngineMetrics()
    reporter = ab.ABReporter(settings.replace(ab={"refresh_s": 0.01}), metrics)
    task = asyncio.create_task(reporter.run(IGNORED))
    try:
        await wait_until(lambda: calls >= 3, timeout_s=10)
        assert not task.done(), "the reporter stopped"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert metric_sum(metric_samples(metrics.render()), "fraudactors_ab_report_failures_total") >= 3
