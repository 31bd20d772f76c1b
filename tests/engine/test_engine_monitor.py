"""The model monitor end to end: a running engine (committed models) decides a month of the
simulator's traffic with its fraud labels (so the users and merchants have the history the models
were trained with); the amount and score PSI it exports on /metrics stay under the drift threshold
on that last normal day and pass it on the next day, whose amounts are five times larger. Those very values,
fed to `promtool test rules` as series, leave the drift alerts quiet and then fire them."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from engine_helpers import metric_samples, produce, reading, running

from fraudactors.settings import Settings
from fraudactors.sim import Simulator
from fraudactors.sim.simulator import LabelEvent, SimEvent

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DAY = 86400.0
THRESHOLD = 0.2
WARM_DAYS = 31


def psi_of(samples: dict[str, Any], version: str) -> tuple[float, dict[str, tuple[float, str]]]:
    """(score PSI, {feature: (PSI, top)}) of ``version`` as /metrics shows them."""
    score = samples["fraudactors_score_psi"][(("version", version),)]
    features = {}
    for key, value in samples["fraudactors_feature_psi"].items():
        labels = dict(key)
        if labels["version"] == version:
            features[labels["feature"]] = (value, labels["top"])
    return score, features


def promtool_case(name: str, series: str, normal: float, drifted: float, expected: list[dict[str, Any]]
                  ) -> dict[str, Any]:
    """20 minutes at the normal value, then 40 at the drifted one: quiet at 19m, as expected at 55m."""
    return {"interval": "1m",
            "input_series": [{"series": series, "values": f"{normal!r}x19 {drifted!r}x40"}],
            "alert_rule_test": [{"eval_time": "19m", "alertname": name, "exp_alerts": []},
                                {"eval_time": "55m", "alertname": name, "exp_alerts": expected}]}


def expected_alert(what: str, value: float, **labels: str) -> dict[str, Any]:
    return {"exp_labels": {"severity": "ticket", "team": "fraud-ml", **labels},
            "exp_annotations": {"summary": f"{what} drifted from its training reference (PSI {value:.2f} > 0.2).",
                                "runbook": "docs/operations.md#model-monitor"}}


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: apt-get install -y --no-install-recommends prometheus "
                    "(make test does when it can)")
    return path


@pytest.mark.timeout(400)
async def test_amounts_five_times_larger_move_the_psi_past_the_threshold_and_fire_the_drift_alerts(
        engine_settings: Settings, tmp_path: Path, promtool: str) -> None:
    s = engine_settings.replace(engine={"inference_mode": "thread"},
                                monitor={"window_s": DAY, "sub_windows": 24, "min_rows": 300})
    # The models' population in small, a month of history with its fraud labels first: the last
    # normal day looks like the training data. 400 merchants, not 192 (5 users per merchant, as in
    # training): 192 is one merchant per country and category, so every card's everyday shopping
    # in a category went to that one merchant and merchants had almost no new customers, which
    # the 49-feature models read (v1's score PSI 0.26-0.29 on the normal day; 0.065 with 400).
    sim = Simulator(seed=23, n_users=960, n_merchants=400, days=WARM_DAYS + 1, id_prefix="mon-")
    events = list(sim.events())
    cut = sim.start_time + WARM_DAYS * DAY
    txns = [ev for ev in events if isinstance(ev, SimEvent)]
    normal = [ev for ev in txns if ev.event_time < cut]
    drifted = [ev for ev in txns if ev.event_time >= cut]

    def txn_records(evs: list[SimEvent], scale: float) -> list[tuple[bytes | None, bytes]]:
        out: list[tuple[bytes | None, bytes]] = []
        for ev in evs:
            txn = {**ev.txn, "amount": round(float(ev.txn["amount"]) * scale, 2)}  # type: ignore[arg-type]
            out.append((str(txn["user_id"]).encode(), orjson.dumps(txn)))
        return out

    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        for week in range(0, WARM_DAYS, 7):  # a week of transactions, then the labels reported by its end
            start, end = sim.start_time + week * DAY, sim.start_time + min(week + 7, WARM_DAYS) * DAY
            await produce(s, txn_records([ev for ev in normal if start <= ev.event_time < end], 1.0))
            labels = [ev.label for ev in events if isinstance(ev, LabelEvent) and start <= ev.at < end]
            await produce(s, [(str(lb["user_id"]).encode(), orjson.dumps(lb)) for lb in labels],
                          topic=s.topics.labels)
        await reader.wait_for(lambda recs: len(recs) >= len(normal), timeout_s=300)
        before = metric_samples(engine.metrics.render())
        # Five times the amounts (an upstream unit or currency mix-up). Tripled amounts moved the
        # 49-feature v1's score PSI past the threshold; the 58-feature v1 leans less on the amount
        # (0.022 -> 0.154 tripled, 0.39 at five times): the amount's own PSI passes it either way.
        await produce(s, txn_records(drifted, 5.0))
        await reader.wait_for(lambda recs: len(recs) >= len(txns), timeout_s=180)
        after = metric_samples(engine.metrics.render())
        monitor = engine.inference.monitor
        assert monitor is not None
        assert monitor.psi("v1") is not None

    score0, features0 = psi_of(before, "v1")
    score1, features1 = psi_of(after, "v1")
    print("v1 PSI normal -> amounts x5: score", round(score0, 3), "->", round(score1, 3),
          {f: (round(features0[f][0], 3), round(features1[f][0], 3)) for f in ("amount", "log_amount")},
          "rows", len(normal), len(drifted))
    # normal traffic (the simulator the models were trained on): the amount did not move ...
    assert features0["amount"][0] < THRESHOLD and features0["log_amount"][0] < THRESHOLD
    assert score0 < THRESHOLD
    # ... five times larger, it did, and the score with it
    assert features1["amount"][0] > THRESHOLD and features1["log_amount"][0] > THRESHOLD
    assert score1 > THRESHOLD
    assert after["fraudactors_degraded_share"][()] == 0.0

    # The scraped values as series of a promtool test of the real alert rules.
    cases = [promtool_case("FraudactorsScorePSIHigh", 'fraudactors_score_psi{instance="e", version="v1"}',
                           score0, score1, [expected_alert("Scores of v1", score1, version="v1")])]
    shown = {"FraudactorsScorePSIHigh": 1, "FraudactorsFeatureDrift": 0}
    top = [f for f, (_, is_top) in features1.items() if is_top == "true"]
    for feature in dict.fromkeys(("amount", "log_amount", *top)):
        (value0, is_top), value1 = features0[feature], features1[feature][0]
        if value0 > THRESHOLD:
            continue  # drifted already on normal traffic (not the amount: asserted above)
        fires = is_top == "true" and value1 > THRESHOLD
        series = f'fraudactors_feature_psi{{instance="e", version="v1", feature="{feature}", top="{is_top}"}}'
        expected = [expected_alert(f"Feature {feature} of v1", value1, version="v1", feature=feature)] if fires else []
        cases.append(promtool_case("FraudactorsFeatureDrift", series, value0, value1, expected))
        shown["FraudactorsFeatureDrift"] += fires
    # The amount is not among v1's top features (those the alert watches), so its real values are
    # also shown as if it were: the alert's threshold sits between them.
    cases.append(promtool_case(
        "FraudactorsFeatureDrift", 'fraudactors_feature_psi{instance="e", version="v1", feature="amount", top="true"}',
        features0["amount"][0], features1["amount"][0],
        [expected_alert("Feature amount of v1", features1["amount"][0], version="v1", feature="amount")]))
    shown["FraudactorsFeatureDrift"] += 1
    print("promtool cases:", len(cases), "firing:", shown, "top features:", top)
    path = tmp_path / "drift_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": cases}),
                    encoding="utf-8")
    result = await asyncio.to_thread(subprocess.run, [promtool, "test", "rules", str(path)], capture_output=True,
                                     text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
