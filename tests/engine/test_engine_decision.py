"""Routing (SPEC §7), thresholds and the decision JSON (SPEC §3)."""

from __future__ import annotations

import orjson

from fraudactors.engine.decision import Router, Thresholds, encode_decision, route_fraction
from fraudactors.settings import DecisionSettings, VariantSettings


def test_routing_is_deterministic_and_follows_the_weights() -> None:
    router = Router({"A": VariantSettings("v1", 0.9), "B": VariantSettings("v2", 0.1),
                     "S": VariantSettings("v3", 1.0, shadow=True)})
    ids = [f"t-{i:06d}" for i in range(20_000)]
    first = [router.route(t).name for t in ids]
    assert first == [router.route(t).name for t in ids]
    share_b = first.count("B") / len(ids)
    assert 0.08 < share_b < 0.12
    assert "S" not in first, "a shadow variant never decides"
    assert [s.name for s in router.shadows] == ["S"]
    assert router.versions == ("v1", "v2", "v3")
    assert all(0.0 <= route_fraction(t) < 1.0 for t in ids[:100])


def test_zero_weight_variant_gets_nothing() -> None:
    router = Router({"A": VariantSettings("v1", 1.0), "B": VariantSettings("v2", 0.0)})
    assert {router.route(f"x{i}").name for i in range(1000)} == {"A"}


def test_thresholds_settings_override_the_model() -> None:
    t = Thresholds.resolve(DecisionSettings(), 0.5, 0.9)
    assert (t.decide(0.1), t.decide(0.5), t.decide(0.95)) == ("approve", "review", "decline")
    t = Thresholds.resolve(DecisionSettings(review_threshold=0.2, decline_threshold=0.3), 0.5, 0.9)
    assert (t.decide(0.19), t.decide(0.25), t.decide(0.3)) == ("approve", "review", "decline")
    # 0 is a threshold (everything at least reviewed), not "the model's": only < 0 means that
    t = Thresholds.resolve(DecisionSettings(review_threshold=0.0), 0.5, 0.9)
    assert (t.review, t.decline) == (0.0, 0.9)
    assert (t.decide(0.0), t.decide(0.95)) == ("review", "decline")
    t = Thresholds.resolve(DecisionSettings(review_threshold=0.0, decline_threshold=0.0), 0.5, 0.9)
    assert t.decide(0.0) == "decline"


def test_decision_json_has_the_spec_fields() -> None:
    raw = encode_decision(transaction_id="t-1", user_id="c-1", is_fraud=False, fraud_probability=0.0312345678,
                          decision="approve", model_version="v1", variant="A", reasons=["amount"],
                          degraded=False, event_time="2026-11-28T21:00:00.123+00:00",
                          decided_at="2026-11-28T21:00:00.200+00:00", latency_ms=3.14159)
    obj = orjson.loads(raw)
    assert list(obj) == ["transaction_id", "user_id", "is_fraud", "fraud_probability", "decision",
                         "model_version", "variant", "reasons", "degraded", "event_time", "decided_at",
                         "latency_ms"]
    assert obj["fraud_probability"] == 0.031235
    assert obj["latency_ms"] == 3.142
