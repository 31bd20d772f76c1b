"""``fraudactors run`` as a real process: SIGKILL, SIGTERM, and two replicas sharing a group."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import orjson
from engine_helpers import (
    EngineProcess,
    TopicReader,
    committed,
    engine_env,
    produce,
    reading,
    transactions,
    wait_committed,
    wait_until_committed_some,
)

from fraudactors.settings import Settings


async def _get(port: int, path: str) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


async def _feed(settings: Settings, txns: list[tuple[bytes, bytes, str]], chunk: int = 250) -> dict[int, int]:
    """Produce in chunks (traffic keeps arriving while the test does things to the engine)."""
    ends: dict[int, int] = {}
    for i in range(0, len(txns), chunk):
        part = await produce(settings, [(k, v) for k, v, _ in txns[i:i + chunk]])
        for p, end in part.items():
            ends[p] = max(ends.get(p, 0), end)
        await asyncio.sleep(0.02)  # pace the load: the engine is meant to be mid-stream
    return ends


def _ids(reader: object) -> Counter[str]:
    return Counter(orjson.loads(r.value)["transaction_id"] for r in reader.records)  # type: ignore[attr-defined]


async def _mid_stream(engine: EngineProcess, settings: Settings, txns: list[tuple[bytes, bytes, str]],
                      reader: TopicReader) -> asyncio.Task[dict[int, int]]:
    """Start ``engine``, feed it ``txns`` and return the still-running feeder once 1500 decisions are out."""
    await engine.start()
    await engine.wait_event("engine_ready", timeout_s=60)
    feeder = asyncio.create_task(_feed(settings, txns))
    await reader.wait_for(lambda recs: len(recs) >= 1500, timeout_s=60)
    return feeder


async def test_sigkill_mid_stream_then_restart_resumes_from_the_last_commit(engine_settings: Settings) -> None:
    """The restarted engine decides exactly the records at or after the group's last commit (so
    nothing is lost, and it did not replay the topic): duplicates are the first engine's decisions
    that were not committed yet, nothing below a committed offset."""
    s = engine_settings
    txns = transactions(6000, prefix="k")
    env = engine_env(s)
    first = EngineProcess(env)
    async with reading(s, s.topics.predictions) as reader, reading(s, s.topics.transactions) as sent:
        try:
            feeder = await _mid_stream(first, s, txns, reader)
            await wait_until_committed_some(s, timeout_s=30)  # else resuming and replaying look alike
            await first.kill()  # SIGKILL: no drain, no commit, no goodbye
            await feeder
        finally:
            await first.kill()
        last_commit = await committed(s)  # nobody in the group is alive to move it
        await sent.wait_for(lambda recs: len(recs) >= len(txns), timeout_s=30)
        # The second engine's decisions carry the feature vector: that tells them apart.
        second = EngineProcess({**env, "FRAUDACTORS_ENGINE__EMIT_FEATURES": "true"})
        await second.start()
        try:
            await second.wait_event("engine_ready", timeout_s=60)
            await reader.wait_for(lambda recs: len(_ids(reader)) >= 6000, timeout_s=90)
        finally:
            await second.signal(signal.SIGTERM)
            assert await second.wait(timeout_s=30) == 0
    ids = _ids(reader)
    assert set(ids) == {t for _, _, t in txns}, "every transaction is decided at least once"
    where = {orjson.loads(r.value)["transaction_id"]: (r.partition, r.offset) for r in sent.records}
    uncommitted = {t for t, (p, offset) in where.items() if offset >= last_commit.get(p, 0)}
    assert 0 < len(uncommitted) < len(txns), last_commit
    by_second = {d["transaction_id"] for d in reader.decisions() if "features" in d}
    assert by_second == uncommitted, "the restarted engine starts at each partition's committed offset"
    duplicated = {t for t, n in ids.items() if n > 1}
    assert duplicated <= uncommitted, "a transaction below a committed offset was decided again"
    assert sum(ids.values()) - len(ids) <= len(uncommitted)


async def test_sigterm_under_load_exits_zero_and_loses_nothing_without_duplicates(engine_settings: Settings) -> None:
    s = engine_settings
    txns = transactions(6000, prefix="s")
    env = engine_env(s)
    first = EngineProcess(env)
    async with reading(s, s.topics.predictions) as reader:
        try:
            feeder = await _mid_stream(first, s, txns, reader)
            await first.signal(signal.SIGTERM)
            code = await first.wait(timeout_s=s.engine.shutdown_timeout_s + 10)
            assert code == 0, first.lines[-10:]
            assert first.events("engine_stopped")
            ends = await feeder
        finally:
            await first.kill()
        second = EngineProcess(env)
        await second.start()
        try:
            await second.wait_event("engine_ready", timeout_s=60)
            await reader.wait_for(lambda recs: len(_ids(reader)) >= 6000, timeout_s=90)
            commits = await wait_committed(s, ends, timeout_s=30)
        finally:
            await second.signal(signal.SIGTERM)
            assert await second.wait(timeout_s=30) == 0
    ids = _ids(reader)
    assert set(ids) == {t for _, _, t in txns}, "nothing lost"
    assert max(ids.values()) == 1, f"duplicates: {[t for t, n in ids.items() if n > 1][:10]}"
    assert commits == ends


async def test_two_replicas_split_the_partitions_and_take_over_on_stop(engine_settings: Settings) -> None:
    s = engine_settings
    env = engine_env(s)
    a, b = EngineProcess(env), EngineProcess(env)
    txns = transactions(6000, prefix="g")
    async with reading(s, s.topics.predictions) as reader:
        try:
            await a.start()
            port_a = (await a.wait_event("engine_ready", timeout_s=60))["port"]
            await b.start()
            port_b = (await b.wait_event("http_listening", timeout_s=60))["port"]

            async def split() -> tuple[list[int], list[int]]:
                async with asyncio.timeout(60):
                    while True:
                        (ca, ra), (cb, rb) = await _get(port_a, "/readyz"), await _get(port_b, "/readyz")
                        if ca == cb == 200 and len(ra["partitions"]) + len(rb["partitions"]) == 12:
                            return ra["partitions"], rb["partitions"]
                        await asyncio.sleep(0.2)  # polling another process's HTTP state

            pa, pb = await split()
            assert pa and pb and not set(pa) & set(pb) and set(pa) | set(pb) == set(range(12))
            feeder = asyncio.create_task(_feed(s, txns))
            await reader.wait_for(lambda recs: len(recs) >= 1500, timeout_s=60)
            await b.signal(signal.SIGTERM)
            assert await b.wait(timeout_s=s.engine.shutdown_timeout_s + 10) == 0
            await feeder

            async with asyncio.timeout(60):
                while True:
                    code, body = await _get(port_a, "/readyz")
                    if code == 200 and len(body["partitions"]) == 12:
                        break
                    await asyncio.sleep(0.2)
            await reader.wait_for(lambda recs: len(_ids(reader)) >= 6000, timeout_s=90)
        finally:
            for proc in (a, b):
                if proc.proc is not None and proc.proc.returncode is None:
                    await proc.signal(signal.SIGTERM)
                    await proc.wait(timeout_s=30)
            await a.kill()
            await b.kill()
    assert set(_ids(reader)) == {t for _, _, t in txns}, "nothing lost across the hand-over"


async def test_run_with_missing_models_exits_non_zero_with_one_clear_line(engine_settings: Settings,
                                                                          tmp_path: object) -> None:
    env = engine_env(engine_settings, FRAUDACTORS_MODELS__DIR=str(tmp_path))
    proc = EngineProcess(env)
    await proc.start()
    code = await proc.wait(timeout_s=60)
    assert code == 1
    failed = proc.events("engine_failed")
    assert failed and "not found" in failed[-1]["cause"]
    unparsed = [line["text"] for line in proc.lines if line.get("event") == "unparsed"]
    assert any(text.startswith("fraudactors run: engine failed to start: model v1 not found")
               for text in unparsed), unparsed
