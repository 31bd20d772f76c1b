"""The in-process engine against the real broker and Redis: volume, bad input, Redis outage, HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import orjson
import pytest
from engine_helpers import (
    metric_labels,
    metric_samples,
    metric_sum,
    produce,
    reading,
    transactions,
    wait_committed,
    wait_until,
)
from malformed import generate_malformed

from fraudactors.engine.engine import Engine
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.settings import Settings


@contextlib.asynccontextmanager
async def running(settings: Settings, ready: bool = True) -> AsyncIterator[Engine]:
    engine = Engine(settings)
    await engine.start()
    try:
        if ready:
            await engine.wait_ready(timeout_s=60)
        yield engine
    finally:
        await engine.stop()


async def test_twenty_thousand_transactions_over_twelve_partitions_are_decided_exactly_once(
        engine_settings: Settings) -> None:
    s = engine_settings
    assert s.topics.partitions == 12
    txns = transactions(20_000)
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        ends = await produce(s, [(k, v) for k, v, _ in txns])
        assert len(ends) == 12, "the keys should spread over all 12 partitions"
        await reader.wait_for(lambda recs: len(recs) >= 20_000, timeout_s=90)
        commits = await wait_committed(s, ends, timeout_s=30)
        assert commits == ends, "committed offsets must equal the end offsets"
        assert engine.ingestor.worker_restarts == 0
    decisions = reader.decisions()
    ids = Counter(d["transaction_id"] for d in decisions)
    assert len(decisions) == 20_000
    assert set(ids) == {t for _, _, t in txns}
    assert max(ids.values()) == 1
    by_id = {t: k for k, _, t in txns}
    for record, decision in zip(reader.records, decisions, strict=True):
        assert record.key == by_id[decision["transaction_id"]], "decisions are keyed by user_id"
        assert decision["decision"] in ("approve", "review", "decline")
        assert decision["is_fraud"] == (decision["decision"] != "approve")
        assert decision["degraded"] is False
        assert decision["latency_ms"] >= 0
    variants = Counter(d["variant"] for d in decisions)
    assert set(variants) == {"A", "B"} and variants["A"] > variants["B"]


async def test_record_batches_in_every_kafka_compression_codec_are_decided(engine_settings: Settings) -> None:
    """Producers compress (lz4 and zstd are common defaults): a batch the engine could not
    decompress would fail its fetch, and with it the ingestor, in a restart loop."""
    s = engine_settings
    sent: list[str] = []
    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        for codec in ("gzip", "snappy", "lz4", "zstd"):
            txns = transactions(200, prefix=f"{codec}-")
            await produce(s, [(k, v) for k, v, _ in txns], compression_type=codec)
            sent += [t for _, _, t in txns]
        await reader.wait_for(lambda recs: len(recs) >= len(sent), timeout_s=60)
        assert engine.supervisor.restarts_total == 0
    assert sorted(d["transaction_id"] for d in reader.decisions()) == sorted(sent)


async def test_malformed_inputs_go_to_the_dlq_and_every_valid_one_is_decided(engine_settings: Settings) -> None:
    s = engine_settings
    bad = generate_malformed(1000)
    good = transactions(2000, prefix="ok")
    records: list[tuple[bytes | None, bytes]] = []
    for i, (key, value, _) in enumerate(good):
        records.append((key, value))
        if i % 2 == 0:
            records.append((f"bad-{i}".encode(), bad[i // 2]))
    assert len(records) == 3000
    async with running(s) as engine, reading(s, s.topics.predictions) as decided, \
            reading(s, s.topics.dlq) as dead, reading(s, s.topics.transactions) as source:
        await produce(s, records)
        await decided.wait_for(lambda recs: len(recs) >= 2000, timeout_s=60)
        await dead.wait_for(lambda recs: len(recs) >= 1000, timeout_s=60)
        await source.wait_for(lambda recs: len(recs) >= 3000, timeout_s=60)
        assert engine.ingestor.worker_restarts == 0
        assert engine.supervisor.restarts_total == 0
        metrics = engine.metrics.render().decode()
    assert {orjson.loads(r.value)["transaction_id"] for r in decided.records} == {t for _, _, t in good}
    assert len(dead.records) == 1000
    assert Counter(r.value for r in dead.records) == Counter(bad), "DLQ values are the original bytes"
    at = {(r.partition, r.offset): r for r in source.records}
    for record in dead.records:
        headers = dict(record.headers)
        assert set(headers) >= {"error", "stage", "source_topic", "source_partition", "source_offset"}
        assert headers["error"], "a readable reason"
        assert headers["stage"] == b"parse"
        assert headers["source_topic"].decode() == s.topics.transactions
        assert record.key.startswith(b"bad-"), "the original key"
        # the headers locate the very record that was refused
        origin = at[(int(headers["source_partition"]), int(headers["source_offset"]))]
        assert (origin.key, origin.value) == (record.key, record.value)
    assert 'fraudactors_dlq_total{stage="parse"} 1000.0' in metrics


async def test_redis_outage_degrades_decisions_then_recovers_by_itself(engine_settings: Settings,
                                                                       fresh_redis: object) -> None:
    s = engine_settings.replace(redis={"url": fresh_redis.url, "retry_interval_ms": 100})  # type: ignore[attr-defined]
    stop_feeding = asyncio.Event()
    sent: list[str] = []

    async def feed() -> None:
        i = 0
        while not stop_feeding.is_set():
            batch = transactions(50, start=i, prefix="r")
            await produce(s, [(k, v) for k, v, _ in batch])
            sent.extend(t for _, _, t in batch)
            i += 50

    def degraded_seen(recs: list) -> bool:
        return any(orjson.loads(r.value)["degraded"] for r in recs)

    async with running(s) as engine, reading(s, s.topics.predictions) as reader:
        feeder = asyncio.create_task(feed())
        try:
            await reader.wait_for(lambda recs: len(recs) >= 200, timeout_s=30)
            assert not degraded_seen(reader.records)
            await asyncio.to_thread(fresh_redis.stop)  # type: ignore[attr-defined]
            await reader.wait_for(degraded_seen, timeout_s=30)
            await asyncio.to_thread(fresh_redis.start)  # type: ignore[attr-defined]
            degraded_at = max(i for i, r in enumerate(reader.records) if orjson.loads(r.value)["degraded"])

            def recovered(recs: list) -> bool:
                return any(not orjson.loads(r.value)["degraded"] for r in recs[degraded_at + 1:]) and \
                    engine.features.up
            await reader.wait_for(recovered, timeout_s=30)
        finally:
            stop_feeding.set()
            await feeder
        await reader.wait_for(lambda recs: len({orjson.loads(r.value)["transaction_id"] for r in recs})
                              >= len(sent), timeout_s=60)
        assert engine.supervisor.restarts_total == 0
        metrics = engine.metrics.render().decode()
    decided = {orjson.loads(r.value)["transaction_id"] for r in reader.records}
    assert decided == set(sent)
    # The counter says how many decisions went out degraded: those read from the topic, and some.
    degraded = sum(1 for d in reader.decisions() if d["degraded"])
    assert degraded > 0
    assert metric_sum(metric_samples(metrics), "fraudactors_degraded_total") == degraded


async def _http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


async def test_http_readyz_predict_and_metrics(engine_settings: Settings, fresh_redis: object) -> None:
    await asyncio.to_thread(fresh_redis.stop)  # type: ignore[attr-defined]
    s = engine_settings.replace(redis={"url": fresh_redis.url, "retry_interval_ms": 100})  # type: ignore[attr-defined]
    async with running(s, ready=False) as engine:
        port = engine.http.port
        status, body = await _http(port, "GET", "/readyz")
        assert status == 503
        assert "feature_store" in orjson.loads(body)["not_ready"]
        status, _ = await _http(port, "GET", "/healthz")
        assert status == 200
        await asyncio.to_thread(fresh_redis.start)  # type: ignore[attr-defined]
        await engine.wait_ready(timeout_s=30)
        status, body = await _http(port, "GET", "/readyz")
        assert status == 200, body

        txn = {"transaction_id": "p-1", "user_id": "u-9", "amount": 12.5,
               "timestamp": "2026-11-28T21:00:00.123+00:00"}
        status, body = await _http(port, "POST", "/predict", orjson.dumps(txn))
        assert status == 200, body
        decision = orjson.loads(body)
        assert decision["transaction_id"] == "p-1" and decision["variant"] in ("A", "B")
        assert decision["decision"] in ("approve", "review", "decline") and decision["degraded"] is False
        status, body = await _http(port, "POST", "/predict", orjson.dumps(txn))
        assert orjson.loads(body)["variant"] == decision["variant"], "routing is deterministic"
        for bad in (b"not json", b"[]", orjson.dumps({**txn, "amount": -1}), orjson.dumps({"user_id": "u"})):
            status, body = await _http(port, "POST", "/predict", bad)
            assert status == 422, bad
            assert orjson.loads(body)["error"]
        status, _ = await _http(port, "GET", "/predict")
        assert status == 405

        async with reading(s, s.topics.predictions) as reader:
            await produce(s, [(k, v) for k, v, _ in transactions(100)])
            await reader.wait_for(lambda recs: len(recs) >= 100, timeout_s=30)
        await engine.wait_ready(timeout_s=30)  # a stale Redis connection may have flapped it once

        def lag_gauges_caught_up() -> bool:  # they refresh every commit interval
            lag = metric_samples(engine.metrics.render()).get("fraudactors_consumer_lag", {})
            return len(lag) == s.topics.partitions and not any(lag.values())
        await wait_until(lag_gauges_caught_up, timeout_s=30)
        status, body = await _http(port, "GET", "/metrics")
        assert status == 200
        check_metrics_after_streaming_100(body, s.topics.partitions, {d["variant"] for d in reader.decisions()})
        assert engine.healthz()[0] == 200
    # Stopped: its supervision tree is gone, and the liveness answer says so.
    status, _, body = engine.healthz()
    assert status == 503 and orjson.loads(body) == {"status": "dead"}


def check_metrics_after_streaming_100(text: bytes, partitions: int, variants: set[str]) -> None:
    """Values only the traffic of the test above makes (100 records streamed, 2 POST /predict, Redis
    up): a fresh registry has zeros, or no labelled series at all."""
    m = metric_samples(text)
    assert metric_sum(m, "fraudactors_records_consumed_total") == 100
    assert metric_sum(m, "fraudactors_decisions_total") == 100
    assert metric_labels(m, "fraudactors_decisions_total", "variant") == variants
    assert metric_sum(m, "fraudactors_decision_latency_seconds_count") == 100
    assert metric_sum(m, "fraudactors_decision_latency_seconds_bucket", le="+Inf") == 100
    # Scored rows: the 100 streamed and the two POST /predict calls above.
    assert metric_sum(m, "fraudactors_fraud_probability_count") == 102
    assert metric_sum(m, "fraudactors_inference_batch_size_sum") == 102
    for stage in ("parse", "features", "inference", "publish"):
        assert metric_sum(m, "fraudactors_stage_latency_seconds_count", stage=stage) > 0, stage
    assigned = {str(p) for p in range(partitions)}
    assert metric_labels(m, "fraudactors_consumer_lag", "partition") == assigned
    assert metric_sum(m, "fraudactors_consumer_lag") == 0
    assert metric_labels(m, "fraudactors_mailbox_depth", "mailbox") >= {"inference", "publisher",
                                                                         *(f"features-{p}" for p in assigned)}
    assert metric_sum(m, "fraudactors_ready") == 1.0
    assert metric_sum(m, "fraudactors_feature_store_up") == 1.0


def test_the_metrics_check_fails_on_a_fresh_registry() -> None:
    """The check above cannot pass on what a new engine exports before any traffic."""
    fresh = EngineMetrics().render()
    with pytest.raises(AssertionError):
        check_metrics_after_streaming_100(fresh, 12, {"A", "B"})


async def test_a_value_over_one_mebibyte_goes_to_the_dlq_without_stalling_its_partition(
        engine_settings: Settings) -> None:
    s = engine_settings
    huge = b'{"transaction_id": "' + b"x" * (1024 * 1024 + 100) + b'"}'
    from fraudactors.services.kafka import make_producer

    producer = make_producer(s, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(s.topics.transactions, huge, key=b"u-huge", partition=0)
    finally:
        await producer.stop()
    after = transactions(50, prefix="after")
    async with running(s) as engine, reading(s, s.topics.predictions) as decided, \
            reading(s, s.topics.dlq) as dead:
        await produce(s, [(k, v) for k, v, _ in after])
        await dead.wait_for(lambda recs: len(recs) >= 1, timeout_s=30)
        await decided.wait_for(lambda recs: len(recs) >= 50, timeout_s=30)
        assert engine.ingestor.worker_restarts == 0
    record = dead.records[0]
    headers = dict(record.headers)
    assert b"too large" in headers["error"]
    # The original bytes when the broker takes them; otherwise the record says it omitted them.
    assert record.value == huge or "value_omitted" in headers
