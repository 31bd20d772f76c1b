"""Train/serve parity through the running engine: every feature the engine scored with equals the
offline (training) value of the same transaction.

A seeded simulated dataset (several weeks, fraud labels with realistic delays) goes through the
real engine (real broker, real Redis, ``engine.emit_features`` on so each decision carries its
feature vector). The labels are produced and applied first: a label counts only from the hour
after its ``labeled_at`` (``features.definition``), so applying all of them before any transaction
is point-in-time correct and the offline side loads them all up front the same way. Then the
transactions go in, keyed by ``user_id``, in event-time order, and the decided vectors are
compared with ``offline_features`` over the same transactions and labels.

On one partition every feature must match (one writer sees every merchant in time order). Over
twelve partitions the merchant transaction counts and the fraud rates that divide by them are
only eventually consistent (``features.store``), so they are left out there; everything else must
still match.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
from engine_helpers import private_topics, produce, reading, running, wait_until

from fraudactors.engine.decision import encode_decision
from fraudactors.features.definition import FEATURE_NAMES, MERCHANT_COUNT_FEATURES
from fraudactors.features.offline import offline_features
from fraudactors.features.schema import parse_label, parse_transaction
from fraudactors.services.kafka import create_topics, delete_topics
from fraudactors.settings import Settings
from fraudactors.sim.simulator import Simulator

# float32 on both sides and the engine emits the exact float32 values: compared with ==.
_EXAMPLES = 5


@dataclass(frozen=True)
class Dataset:
    transactions: list[tuple[bytes, bytes]]  # (user_id key, SPEC §2 JSON), in event-time order
    labels: list[tuple[bytes, bytes]]  # (user_id key, SPEC §4 JSON)
    ids: list[str]
    days: float


def simulate(*, seed: int, n_users: int, n_merchants: int, days: float, minimum: int) -> Dataset:
    sim = Simulator(seed=seed, n_users=n_users, n_merchants=n_merchants, days=days,
                    id_prefix=f"p{seed}-")
    transactions: list[tuple[bytes, bytes]] = []
    labels: list[tuple[bytes, bytes]] = []
    ids: list[str] = []
    for ev in sim.stream():
        key = str(ev.txn["user_id"]).encode()
        transactions.append((key, orjson.dumps(ev.txn)))
        ids.append(str(ev.txn["transaction_id"]))
        if ev.label_at is not None:
            labels.append((key, orjson.dumps(ev.label())))
    assert len(transactions) >= minimum, f"the simulator made only {len(transactions)} transactions"
    return Dataset(transactions, labels, ids, days)


def online_matrix(decisions: Sequence[dict[str, Any]], ids: Sequence[str]) -> np.ndarray:
    """The engine's vectors in ``ids`` order (float32, FEATURE_NAMES columns)."""
    by_id = {d["transaction_id"]: d for d in decisions}
    out = np.empty((len(ids), len(FEATURE_NAMES)), dtype=np.float32)
    for i, tid in enumerate(ids):
        features = by_id[tid]["features"]
        assert tuple(features) == FEATURE_NAMES, f"{tid}: the emitted features are not FEATURE_NAMES in order"
        out[i] = [features[name] for name in FEATURE_NAMES]
    return out


def compare(online: np.ndarray, offline: np.ndarray, ids: Sequence[str], names: Sequence[str]) -> int:
    """Assert every ``names`` column matches; returns how many values were compared."""
    problems: list[str] = []
    compared = 0
    for name in names:
        j = FEATURE_NAMES.index(name)
        a = online[:, j].astype(np.float64)
        b = offline[:, j].astype(np.float64)
        ok = a == b  # bit for bit, as the README promises: the same float32 from the same code
        compared += len(ok)
        bad = np.flatnonzero(~ok)
        if len(bad):
            examples = ", ".join(f"{ids[i]}: engine {float(a[i])!r} offline {float(b[i])!r}" for i in bad[:_EXAMPLES])
            problems.append(f"{name}: {len(bad)} of {len(ok)} differ (e.g. {examples})")
    exact = int(np.sum(online[:, [FEATURE_NAMES.index(n) for n in names]]
                       == offline[:, [FEATURE_NAMES.index(n) for n in names]]))
    print(f"parity: compared {compared} values ({len(ids)} transactions x {len(names)} features), "
          f"{exact} bit-exact, {compared - exact} not bit-exact")
    if problems:
        pytest.fail("train/serve skew, engine vs offline_features:\n" + "\n".join(problems), pytrace=False)
    return compared


async def stream_through_engine(s: Settings, data: Dataset) -> list[dict[str, Any]]:
    """Labels first (applied by the engine's label consumer), then the transactions; returns
    every decision."""
    n = len(data.transactions)
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        await produce(s, data.labels, topic=s.topics.labels)
        await wait_until(lambda: engine.labels.applied >= len(data.labels), timeout_s=60, interval_s=0.1)
        assert engine.labels.applied == len(data.labels) and engine.labels.invalid == 0
        print(f"parity: {len(data.labels)} fraud labels applied by the engine's label consumer, "
              f"then {n} transactions over {s.topics.partitions} partition(s)")
        await produce(s, data.transactions)
        await reader.wait_for(lambda recs: len(recs) >= n, timeout_s=100)
        assert engine.ingestor.worker_restarts == 0
        assert engine.supervisor.restarts_total == 0
    decisions = reader.decisions()
    ids = Counter(d["transaction_id"] for d in decisions)
    assert len(decisions) == n and set(ids) == set(data.ids), "exactly one decision per transaction"
    assert not any(d["degraded"] for d in decisions), "a degraded decision is not scored with the online features"
    return decisions


def offline(data: Dataset) -> np.ndarray:
    txns = [parse_transaction(value) for _, value in data.transactions]
    labels = [parse_label(value) for _, value in data.labels]
    return offline_features(txns, labels)


async def test_fifty_thousand_streamed_transactions_have_the_offline_features_on_one_partition(
        engine_settings: Settings) -> None:
    s = private_topics(engine_settings, "parity", 1).replace(engine={"emit_features": True})
    data = simulate(seed=41, n_users=900, n_merchants=300, days=21.0, minimum=50_000)
    assert len(data.labels) >= 250, "label feedback must be flowing"
    await create_topics(s)
    try:
        decisions = await stream_through_engine(s, data)
    finally:
        await delete_topics(s)
    expected = offline(data)
    got = online_matrix(decisions, data.ids)
    # the labels matter: some transactions see reported fraud at their merchant
    assert np.count_nonzero(expected[:, FEATURE_NAMES.index("merchant_fraud_count_30d")]) > 1000
    assert compare(got, expected, data.ids, FEATURE_NAMES) == len(data.ids) * len(FEATURE_NAMES)


async def test_streamed_transactions_over_twelve_partitions_have_the_offline_features(
        engine_settings: Settings) -> None:
    s = engine_settings.replace(engine={"emit_features": True})
    assert s.topics.partitions == 12
    data = simulate(seed=43, n_users=400, n_merchants=200, days=18.0, minimum=20_000)
    assert len(data.labels) >= 100, "label feedback must be flowing"
    decisions = await stream_through_engine(s, data)
    exact = [name for name in FEATURE_NAMES if name not in MERCHANT_COUNT_FEATURES]
    assert "merchant_fraud_count_7d" in exact and "tx_count_1h" in exact
    expected = offline(data)
    got = online_matrix(decisions, data.ids)
    assert np.count_nonzero(expected[:, FEATURE_NAMES.index("merchant_fraud_count_7d")]) > 200
    assert compare(got, expected, data.ids, exact) == len(data.ids) * len(exact)


def test_the_feature_audit_is_off_by_default_and_adds_one_key_when_on(engine_settings: Settings) -> None:
    assert engine_settings.engine.emit_features is False
    fields = dict(transaction_id="t-1", user_id="u-1", is_fraud=False, fraud_probability=0.1,
                  decision="approve", model_version="v1", variant="A", reasons=["amount"], degraded=False,
                  event_time="2026-11-28T21:00:00.000+00:00", decided_at="2026-11-28T21:00:00.004+00:00",
                  latency_ms=4.0)
    spec_keys = ["transaction_id", "user_id", "is_fraud", "fraud_probability", "decision", "model_version",
                 "variant", "reasons", "degraded", "event_time", "decided_at", "latency_ms"]
    assert list(orjson.loads(encode_decision(**fields))) == spec_keys  # type: ignore[arg-type]
    vector = np.arange(len(FEATURE_NAMES), dtype=np.float32) / np.float32(3)
    audited = orjson.loads(encode_decision(**fields, features=dict(zip(FEATURE_NAMES, vector.tolist(),  # type: ignore[arg-type]
                                                                            strict=True))))
    assert list(audited) == [*spec_keys, "features"]
    assert np.array_equal(np.array(list(audited["features"].values()), dtype=np.float32), vector), \
        "JSON round-trips the exact float32 values"
