"""The load generator against a real broker and a real responder loop (the null pipeline)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import numpy as np
import orjson

from fraudactors.settings import Settings
from loadgen.report import build_report, check_report, write_outputs
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


async def test_a_late_engine_shows_as_latency_and_gaps_as_lost_and_duplicates(settings: Settings, responder) -> None:
    """The responder holds every batch 300 ms, answers every 7th transaction twice and never
    answers every 10th: latency counts from the scheduled send, and the report says so."""
    config = LoadConfig(profile=make_profile("constant", 200, 1.5), drain_timeout_s=5, progress=False)
    async with responder(settings, hold_s=0.3, duplicate_every=7, drop_every=10) as pipeline:
        result = await run_load(settings, config)
    report = build_report(result)
    check_report(report)
    assert pipeline.processed == 300
    assert report["sent"] == 300
    assert report["lost"] == 30  # every 10th never answered
    assert report["decided"] == 270
    assert report["duplicates"] == 42 - 4  # multiples of 7, minus those also multiples of 10
    assert report["drained"] is False
    assert report["latency_ms"]["min"] >= 290.0  # nothing can be faster than the hold
    assert report["latency_ms"]["p50"] >= 290.0


async def test_dlq_counts_this_runs_dead_letters_only(settings: Settings, responder) -> None:
    """Every 10th transaction is dead-lettered; records of other traffic on the DLQ meanwhile
    (here: 25 foreign transactions) are not this run's and are not counted."""
    import asyncio

    from fraudactors.services.kafka import make_producer

    async def foreign_traffic() -> None:
        producer = make_producer(settings)
        await producer.start()
        try:
            await asyncio.sleep(0.5)
            for i in range(25):
                value = orjson.dumps({"transaction_id": f"someone-else-{i}", "user_id": "c-1", "amount": 1})
                await producer.send(settings.topics.dlq, value=value, key=b"c-1")
            await producer.flush()
        finally:
            await producer.stop()

    config = LoadConfig(profile=make_profile("constant", 200, 1.5), drain_timeout_s=5, progress=False)
    async with responder(settings, dead_letter_every=10):
        other = asyncio.create_task(foreign_traffic())
        result = await run_load(settings, config)
        await other
    report = build_report(result)
    check_report(report)
    assert report["sent"] == 300
    assert report["dlq"] == 30
    assert report["lost"] == 30 and report["decided"] == 270


async def test_warmup_is_decided_first_and_left_out_of_the_report(settings: Settings, responder) -> None:
    config = LoadConfig(profile=make_profile("constant", 200, 1.0), warmup=300, drain_timeout_s=30, progress=False)
    async with responder(settings) as pipeline:
        result = await run_load(settings, config)
    report = build_report(result)
    check_report(report)
    assert pipeline.processed == 500
    assert report["warmup"] == {"sent": 300, "decided": 300, "seconds": report["warmup"]["seconds"],
                                "complete": True, "labels_sent": report["warmup"]["labels_sent"]}
    assert report["sent"] == report["decided"] == 200 and report["lost"] == 0
    assert report["foreign_decisions"] == 0


async def test_latency_counts_the_wait_in_the_load_generator_from_the_scheduled_time(settings: Settings,
                                                                                        responder) -> None:
    """Coordinated omission: with a 400 ms send tick, a transaction waits up to 400 ms in the load
    generator before it is sent. That wait is part of its latency, which runs from its scheduled
    time, never from the moment it was sent."""
    config = LoadConfig(profile=make_profile("constant", 100, 1.5), send_tick_s=0.4, drain_timeout_s=30,
                        progress=False, send_labels=False)
    async with responder(settings):
        result = await run_load(settings, config)
    m = result.collector.matches
    assert np.isfinite(m.latency_ms).all()
    lag_ms = (result.sent_at_s - result.scheduled_s) * 1000.0
    assert lag_ms.max() >= 300.0  # the tick held transactions back: there is a wait to count
    assert (m.latency_ms >= lag_ms).all()
    np.testing.assert_allclose(m.latency_ms, (m.decided_at_s - result.scheduled_s) * 1000.0)


async def test_duplicates_written_after_every_first_decision_are_counted(settings: Settings) -> None:
    """The engine's part is played here: once everything is sent, every transaction's decision and
    then 12,000 duplicates of 1 kB go to one partition, in that order. The reader's first fetch
    (8 MiB per partition at most) has every first decision while duplicates are still on the topic:
    the drain reads to the end of the topic before it stops, so all 12,000 count."""
    from fraudactors.services.kafka import make_producer
    from loadgen.runner import prepare_load

    config = LoadConfig(profile=make_profile("constant", 100, 2.0), drain_timeout_s=30, progress=False,
                        send_labels=False)
    prepared = prepare_load(config)
    n, copies = 200, 12_000

    async def answer() -> None:
        producer = make_producer(settings)
        await producer.start()
        try:
            values = [orjson.dumps({"transaction_id": f"{prepared.prefix}{i % n}", "is_fraud": False,
                                    "fraud_probability": 0.1, "variant": "A", "pad": "x" * 1000})
                      for i in range(n + copies)]
            futures = []
            batch = producer.create_batch()
            for value in values:
                if batch.append(key=None, value=value, timestamp=None) is None:  # full
                    futures.append(await producer.send_batch(batch, settings.topics.predictions, partition=0))
                    batch = producer.create_batch()
                    batch.append(key=None, value=value, timestamp=None)
            futures.append(await producer.send_batch(batch, settings.topics.predictions, partition=0))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    def answer_now() -> None:
        # Called in the run's event loop after the last send: it holds the reader until all is written.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, answer()).result(timeout=60)

    result = await run_load(settings, config, prepared=prepared, on_send_end=answer_now)
    report = build_report(result)
    check_report(report)
    assert report["sent"] == report["decided"] == n and report["drained"] is True
    assert report["duplicates"] == copies
