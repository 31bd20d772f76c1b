"""Live routing changes (the control topic) on a running engine: the real broker, Redis and models."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from engine_helpers import (
    metric_labels,
    metric_samples,
    metric_sum,
    models_with_extras,
    produce,
    reading,
    running,
    transactions,
    wait_until,
)
from structlog.testing import capture_logs

from fraudactors.engine.control import current_routing, publish_routing
from fraudactors.engine.decision import Router
from fraudactors.engine.engine import Engine
from fraudactors.engine.routing import ROUTING_KEY, Routing
from fraudactors.services.kafka import make_producer
from fraudactors.settings import Settings, VariantSettings


async def produce_in_chunks(s: Settings, txns: list[tuple[bytes, bytes, str]], chunk: int = 100) -> None:
    for i in range(0, len(txns), chunk):
        await produce(s, [(k, v) for k, v, _ in txns[i:i + chunk]])


def decisions_by_partition(records: list[Any]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        out[record.partition].append(json.loads(record.value))
    return out


def routing_metrics(engine: Engine) -> tuple[float, float, float]:
    samples = metric_samples(engine.metrics.render())
    return (metric_sum(samples, "fraudactors_routing_changes_total", result="applied"),
            metric_sum(samples, "fraudactors_routing_changes_total", result="refused"),
            metric_sum(samples, "fraudactors_routing_revision"))


async def test_weights_changed_mid_stream_switch_every_partition_once_and_decide_everything_once(
        engine_settings: Settings) -> None:
    s = engine_settings
    txns = transactions(4000)
    old = Router(s.models.variants)
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, [(k, v) for k, v, _ in txns[:1500]])
        await reader.wait_for(lambda recs: len(recs) >= 300, timeout_s=60)
        new_routing = (await current_routing(s)).with_weights({"A": 0.5, "B": 0.5}, {}, "even split")
        # the change lands while transactions keep arriving and are being decided
        producing = asyncio.create_task(produce_in_chunks(s, txns[1500:3000]))
        await publish_routing(s, new_routing)
        await wait_until(lambda: engine.routing.applied.revision == 1, timeout_s=30)
        await producing
        await produce(s, [(k, v) for k, v, _ in txns[3000:]])  # sent after the change was applied
        await reader.wait_for(lambda recs: len(recs) >= 4000, timeout_s=90)
        applied, refused, revision = routing_metrics(engine)
    assert (applied, refused, revision) == (1, 0, 1)
    new = Router(new_routing.variants)
    decisions = reader.decisions()
    ids = Counter(d["transaction_id"] for d in decisions)
    assert len(decisions) == 4000 and set(ids) == {t for _, _, t in txns}, "each transaction decided once"
    # transactions whose variant differs between the two routings (hash in [0.5, 0.9): A -> B)
    moved = {t for _, _, t in txns if old.route(t).name != new.route(t).name}
    assert all(old.route(t).name == "A" and new.route(t).name == "B" for t in moved) and len(moved) > 1000
    before = after = 0
    for partition, ds in decisions_by_partition(reader.records).items():
        names = [d["variant"] for d in ds if d["transaction_id"] in moved]
        switch = names.index("B") if "B" in names else len(names)
        assert set(names[switch:]) <= {"B"}, f"partition {partition}: the old routing came back after the new one"
        before += switch
        after += len(names) - switch
    assert before > 0 and after > 0, "the change did not land mid-stream"
    late = {t for _, _, t in txns[3000:]}
    for d in decisions:
        routed = new.route(d["transaction_id"]) if d["transaction_id"] in late else None
        if routed is not None:
            assert d["variant"] == routed.name, "a transaction sent after the change used the old routing"
        variant = {"A": "v1", "B": "v2"}[d["variant"]]
        assert d["model_version"] == variant


async def test_a_broken_model_promoted_is_refused_and_the_old_routing_keeps_serving(
        engine_settings: Settings, models_dir: Path, tmp_path: Path) -> None:
    s = engine_settings.replace(models={"dir": str(models_with_extras(models_dir, tmp_path))})
    txns = transactions(1200)
    base = Routing.from_settings(s.models)
    bad_sha = base.promoted("v3-bad-sha", "A", {}, reason="corrupted file")
    bad_onnx = bad_sha.promoted("v3-bad-onnx", "A", {}, reason="file onnxruntime cannot load")
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, [(k, v) for k, v, _ in txns[:400]])
        await publish_routing(s, bad_sha)
        await wait_until(lambda: routing_metrics(engine)[1] == 1, timeout_s=30)
        await produce(s, [(k, v) for k, v, _ in txns[400:800]])
        await publish_routing(s, bad_onnx)  # passes the sha256 check, fails in the pool's workers
        await wait_until(lambda: routing_metrics(engine)[1] == 2, timeout_s=30)
        await produce(s, [(b"routing", b'{"revision": 9, "variants": {"A": "v1"}}')], topic=s.topics.control)
        await wait_until(lambda: routing_metrics(engine)[1] == 3, timeout_s=30)
        await produce(s, [(k, v) for k, v, _ in txns[800:]])
        await reader.wait_for(lambda recs: len(recs) >= 1200, timeout_s=60)
        assert engine.readiness() == {}
        assert engine.inference.routing.revision == 0 and engine.routing.applied.revision == 0
        applied, refused, revision = routing_metrics(engine)
    assert (applied, refused, revision) == (0, 3, 0)
    decisions = reader.decisions()
    assert len(decisions) == 1200
    assert {(d["variant"], d["model_version"]) for d in decisions} == {("A", "v1"), ("B", "v2")}


async def test_rollback_restores_the_previous_routing(engine_settings: Settings, models_dir: Path,
                                                     tmp_path: Path) -> None:
    s = engine_settings.replace(models={"dir": str(models_with_extras(models_dir, tmp_path))},
                                engine={"inference_mode": "thread"})
    txns = transactions(1500)
    base = Routing.from_settings(s.models)
    promoted = Routing(1, {**base.variants, "A": VariantSettings("v2b", 0.5), "C": VariantSettings("v1", 0.0, True)},
                       reason="v2b decides half, v1 in the shadow", previous=base).validate()
    rolled_back = promoted.rolled_back("v2b looks worse")
    assert rolled_back.revision == 2 and rolled_back.variants == base.variants
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await publish_routing(s, promoted)
        await wait_until(lambda: engine.routing.applied.revision == 1, timeout_s=30)
        await produce(s, [(k, v) for k, v, _ in txns[:500]])
        await reader.wait_for(lambda recs: len(recs) >= 500, timeout_s=60)
        await publish_routing(s, rolled_back)
        await wait_until(lambda: engine.routing.applied.revision == 2, timeout_s=30)
        await produce(s, [(k, v) for k, v, _ in txns[500:]])
        await reader.wait_for(lambda recs: len(recs) >= 1500, timeout_s=60)
        applied, refused, revision = routing_metrics(engine)
        shadow_scored = metric_sum(metric_samples(engine.metrics.render()), "fraudactors_shadow_scores_total",
                                   variant="C")
    assert (applied, refused, revision) == (2, 0, 2)
    assert shadow_scored == 500, "the shadow scores exactly the rows routed while it is in the routing"
    decisions = {d["transaction_id"]: d for d in reader.decisions()}
    assert len(decisions) == 1500
    during, after = Router(promoted.variants), Router(base.variants)
    for i, (_, _, tid) in enumerate(txns):
        d = decisions[tid]
        routed = (during if i < 500 else after).route(tid)
        assert (d["variant"], d["model_version"]) == (routed.name, routed.version)
    assert {decisions[t]["model_version"] for _, _, t in txns[:500]} == {"v2b", "v2"}
    assert {decisions[t]["model_version"] for _, _, t in txns[500:]} == {"v1", "v2"}


async def test_a_replica_started_after_a_refused_change_serves_the_routing_it_replaced(
        engine_settings: Settings, models_dir: Path, tmp_path: Path) -> None:
    s = engine_settings.replace(models={"dir": str(models_with_extras(models_dir, tmp_path))})
    good = Routing.from_settings(s.models).with_weights({"A": 0.2, "B": 0.8}, {})
    await publish_routing(s, good)
    await publish_routing(s, good.promoted("v3-bad-sha", "B", {}))
    async with running(s) as engine:
        assert engine.routing.applied.revision == 1
        assert engine.inference.router.deciding == Router(good.variants).deciding
        applied, refused, revision = routing_metrics(engine)
        assert (applied, refused, revision) == (1, 1, 1)
        status, _, body = await engine.predict(transactions(1)[0][1])
        assert status == 200 and json.loads(body)["model_version"] in ("v1", "v2")


async def test_every_running_replica_follows_a_change(engine_settings: Settings) -> None:
    s = engine_settings.replace(engine={"inference_mode": "thread"})
    txns = transactions(2000)
    change = Routing.from_settings(s.models).with_weights({"A": 0.3, "B": 0.7}, {}, "two replicas")
    async with running(s) as one, running(s) as two, reading(s, s.topics.predictions) as reader:
        await wait_until(lambda: bool(one.ingestor.assigned) and bool(two.ingestor.assigned)
                         and len(one.ingestor.assigned) + len(two.ingestor.assigned) == 12, timeout_s=60)
        await produce(s, [(k, v) for k, v, _ in txns[:1000]])
        await reader.wait_for(lambda recs: len(recs) >= 1000, timeout_s=60)
        await publish_routing(s, change)
        await wait_until(lambda: one.routing.applied.revision == two.routing.applied.revision == 1, timeout_s=30)
        await produce(s, [(k, v) for k, v, _ in txns[1000:]])
        await reader.wait_for(lambda recs: len(recs) >= 2000, timeout_s=60)
        assert [routing_metrics(e) for e in (one, two)] == [(1, 0, 1), (1, 0, 1)]
    decisions = {d["transaction_id"]: d for d in reader.decisions()}
    assert len(decisions) == 2000
    before, after = Router(s.models.variants), Router(change.variants)
    for i, (_, _, tid) in enumerate(txns):
        assert decisions[tid]["variant"] == (before if i < 1000 else after).route(tid).name


async def test_of_two_routing_documents_in_one_fetch_the_newer_is_applied(engine_settings: Settings) -> None:
    """A replica that fetches several routing documents at once applies the newest: applying the
    older would leave it behind the other replicas until the next change."""
    s = engine_settings.replace(engine={"inference_mode": "thread"})
    first = Routing.from_settings(s.models).with_weights({"A": 0.3, "B": 0.7}, {}, "first")
    second = first.with_weights({"A": 0.6, "B": 0.4}, {}, "second")
    async with running(s) as engine:
        producer = make_producer(s, linger_ms=200)  # both documents in one record batch
        await producer.start()
        try:
            sent = [await producer.send(s.topics.control, r.to_json(), key=ROUTING_KEY, partition=0)
                    for r in (first, second)]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        await wait_until(lambda: engine.routing.applied.revision == second.revision, timeout_s=30)
        assert engine.routing.applied.variants == second.variants


async def test_two_changes_built_on_one_revision_leave_every_replica_on_the_newer(engine_settings: Settings) -> None:
    """Two changes written at the same time, both revision 1 (the writers' own check cannot close
    the race entirely). The running replica and one started afterwards, which reads only the newest
    document (all a compacted topic keeps), must route alike: both on the newer."""
    s = engine_settings.replace(engine={"inference_mode": "thread"})
    base = Routing.from_settings(s.models)
    first = base.with_weights({"A": 0.5, "B": 0.5}, {}, "operator 1: B to 50 %")
    second = base.with_weights({"A": 1.0, "B": 0.0}, {}, "operator 2: stop B")
    with capture_logs() as logs:
        async with running(s) as engine:
            await publish_routing(s, first)
            await wait_until(lambda: engine.routing.applied == first, timeout_s=30)
            await publish_routing(s, second)
            await wait_until(lambda: engine.routing.applied == second, timeout_s=30)
            async with running(s) as later:
                assert later.routing.applied == second
                assert later.inference.router.deciding == engine.inference.router.deciding
    assert [e["revision"] for e in logs if e["event"] == "routing_conflict"] == [1]


async def test_a_scorer_lets_go_of_versions_no_routing_in_reach_uses_and_loads_them_again(
        engine_settings: Settings, models_dir: Path, tmp_path: Path) -> None:
    """Through promotions the pool worker keeps only the versions of the routing in force, of the
    one it names as previous and of the one it replaced; a version brought back is loaded again."""
    s = engine_settings.replace(models={"dir": str(models_with_extras(models_dir, tmp_path))})
    txns = transactions(1600)
    base = Routing.from_settings(s.models)  # A: v1, B: v2
    r1 = base.promoted("v2b", "B", {})  # A: v1, B: v2b -- v2 is in the replaced and the previous routing
    r2 = r1.promoted("v2b", "A", {})  # A: v2b, B: v2b -- no routing in reach uses v2 any more
    r3 = r2.rolled_back()  # A: v1, B: v2b -- both still loaded
    r4 = r3.promoted("v2", "B", {})  # A: v1, B: v2 -- v2 loaded again
    held: list[set[str]] = []
    monitored: list[set[str]] = []  # what the model monitor watches, and has offline rates for
    rated: list[set[str]] = []
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        held.append(set(await engine.inference.scorer_versions()))
        for i, routing in enumerate((r1, r2, r3, r4)):
            await publish_routing(s, routing)
            await wait_until(lambda r=routing: engine.routing.applied.revision == r.revision, timeout_s=30)
            held.append(set(await engine.inference.scorer_versions()))
            assert engine.inference.monitor is not None
            monitored.append(set(engine.inference.monitor.versions))
            samples = metric_samples(engine.metrics.render())
            rated.append(metric_labels(samples, "fraudactors_model_offline_detection_rate", "version"))
            await produce(s, [(k, v) for k, v, _ in txns[i * 400:(i + 1) * 400]])
            await reader.wait_for(lambda recs, n=(i + 1) * 400: len(recs) >= n, timeout_s=60)
    with_fallbacks = [{v for name in names for v in (name, f"{name}-fallback")}
                      for names in ({"v1", "v2"}, {"v1", "v2", "v2b"}, {"v1", "v2b"}, {"v1", "v2b"},
                                    {"v1", "v2", "v2b"})]
    assert held == with_fallbacks
    assert monitored == rated == with_fallbacks[1:], "the monitor lets go of unloaded versions too"
    decisions = {d["transaction_id"]: d for d in reader.decisions()}
    assert len(decisions) == 1600
    assert {decisions[t]["model_version"] for _, _, t in txns[400:800]} == {"v2b"}, "r2 decided with v2b only"
    assert {decisions[t]["model_version"] for _, _, t in txns[1200:]} == {"v1", "v2"}, "v2 scored again"
