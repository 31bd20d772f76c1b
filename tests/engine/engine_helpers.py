"""Helpers for the engine's tests: traffic in, decisions out, committed offsets, engine processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from fraudactors.engine.engine import Engine
from fraudactors.modeling.registry import sha256_file
from fraudactors.services.kafka import make_consumer, make_producer
from fraudactors.settings import Settings

REPO = Path(__file__).resolve().parents[2]
BASE_TIME = 1_795_000_000.0  # 2026-11-18, event time of the first generated transaction


def transactions(n: int, *, start: int = 0, users: int = 400, prefix: str = "t",
                 seed: int = 7) -> list[tuple[bytes, bytes, str]]:
    """``n`` valid SPEC §2 transactions as (key, value, transaction_id), in event-time order."""
    rng = random.Random(seed + start)
    out = []
    for i in range(start, start + n):
        tid = f"{prefix}-{i:07d}"
        user = f"u-{rng.randrange(users)}"
        obj = {"transaction_id": tid, "user_id": user, "merchant_id": f"m-{rng.randrange(60)}",
               "amount": round(rng.lognormvariate(3.5, 1.0), 2), "currency": "USD",
               "merchant_category": rng.choice(["grocery", "travel", "electronics", "fuel"]),
               "is_international": rng.random() < 0.1,
               "timestamp": BASE_TIME + i * 0.5}
        out.append((user.encode(), orjson.dumps(obj), tid))
    return out


async def produce(settings: Settings, records: Sequence[tuple[bytes | None, bytes]],
                  topic: str | None = None, compression_type: str | None = None) -> dict[int, int]:
    """Send and wait for every record; returns the end offset (last offset + 1) per partition."""
    producer = make_producer(settings, linger_ms=5, compression_type=compression_type)
    await producer.start()
    ends: dict[int, int] = {}
    try:
        futures = [await producer.send(topic or settings.topics.transactions, value, key=key)
                   for key, value in records]
        for fut in futures:
            meta = await fut
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


@dataclass
class TopicReader:
    """Reads a topic from the beginning, in the background, into ``records``."""

    settings: Settings
    topic: str
    records: list[Any] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        consumer = make_consumer(self.settings, group_id=None, client_id="engine-test-reader")
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.settings.topics.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for recs in batch.values():
                    self.records.extend(recs)
                if batch:
                    self._changed.set()
        finally:
            await consumer.stop()

    async def wait_for(self, predicate: Callable[[list[Any]], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate(self.records):
                self._changed.clear()
                await self._changed.wait()

    def decisions(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.value) for r in self.records]


@contextlib.asynccontextmanager
async def reading(settings: Settings, topic: str) -> AsyncIterator[TopicReader]:
    reader = TopicReader(settings, topic)
    task = asyncio.create_task(reader.run())
    try:
        yield reader
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def committed(settings: Settings, group_id: str | None = None, topic: str | None = None) -> dict[int, int]:
    """The group's committed offsets on ``topic`` (default: transactions; partitions without a
    commit: absent)."""
    consumer = make_consumer(settings, group_id=group_id or settings.kafka.group_id,
                             client_id="engine-test-offsets")
    await consumer.start()
    try:
        out = {}
        for p in range(settings.topics.partitions):
            offset = await consumer.committed(TopicPartition(topic or settings.topics.transactions, p))
            if offset is not None:
                out[p] = offset
        return out
    finally:
        await consumer.stop()


async def produce_corrupt(settings: Settings, partition: int, records: Sequence[tuple[bytes | None, bytes]],
                          topic: str | None = None) -> int:
    """Write ``records`` to ``partition`` of ``topic`` (default: transactions) as one record batch
    whose CRC does not match (a byte of the last value flipped after the CRC was computed), with a
    raw Produce request; returns the batch's base offset. Tansu stores it as sent; Apache Kafka
    would refuse it at the door, but a bad disk or a broker bug puts such a batch in the log all
    the same."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i, (key, value) in enumerate(records):
        builder.append(i, timestamp=None, key=key, value=value, headers=[])
    data = bytearray(builder.build())
    data[-2] ^= 0xFF
    topic = topic or settings.topics.transactions
    client = AIOKafkaClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await client.bootstrap()
    try:
        await client.fetch_all_metadata()
        leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        response = await client.send(leader, ProduceRequest(
            transactional_id=None, required_acks=-1, timeout=10000, topics=[(topic, [(partition, bytes(data))])]))
    finally:
        await client.close()
    [(_, [(_, error, offset, *_)])] = response.topics
    assert error == 0, f"the broker refused the corrupt batch: error {error}"
    return int(offset)


def metric_samples(text: str | bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text -> {sample name: {sorted (label, value) pairs: value}}. Only series that have
    a sample are here: a labelled family nobody touched has its # HELP line and nothing else."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def metric_sum(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    """The sum of ``name``'s series whose labels include ``labels`` (0.0 when none)."""
    want = set(labels.items())
    return sum(v for key, v in samples.get(name, {}).items() if want <= set(key))


def metric_labels(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, label: str) -> set[str]:
    """The values ``label`` takes in ``name``'s series."""
    return {dict(key)[label] for key in samples.get(name, {}) if label in dict(key)}


async def wait_committed(settings: Settings, ends: dict[int, int], timeout_s: float) -> dict[int, int]:
    """Wait until the group committed at least ``ends`` on every partition; returns the last read."""
    last: dict[int, int] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while True:
                last = await committed(settings)
                if all(last.get(p, 0) >= end for p, end in ends.items()):
                    return last
                await asyncio.sleep(0.2)  # polling the broker's state: there is no event to wait on
    return last


async def wait_until_committed_some(settings: Settings, timeout_s: float) -> dict[int, int]:
    """Wait until the group has committed past offset 0 on some partition; returns the commits."""
    async with asyncio.timeout(timeout_s):
        while True:
            last = await committed(settings)
            if any(last.values()):
                return last
            await asyncio.sleep(0.2)  # polling the broker's state: there is no event to wait on


def private_topics(settings: Settings, name: str, partitions: int) -> Settings:
    """``settings`` with topics of their own (``<name>-tx-<random>`` ...) of ``partitions`` partitions,
    for a test that needs another partition count; create them with ``create_topics``."""
    suffix = uuid.uuid4().hex[:8]
    return settings.replace(topics={
        "partitions": partitions, "transactions": f"{name}-tx-{suffix}", "predictions": f"{name}-pred-{suffix}",
        "labels": f"{name}-labels-{suffix}", "dlq": f"{name}-dlq-{suffix}", "control": f"{name}-control-{suffix}"})


def engine_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment-only configuration of a ``fraudactors run`` subprocess for ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}
    k, t, r, e = settings.kafka, settings.topics, settings.redis, settings.engine
    env.update({
        "FRAUDACTORS_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "FRAUDACTORS_KAFKA__GROUP_ID": k.group_id,
        "FRAUDACTORS_KAFKA__CLIENT_ID": k.client_id,
        "FRAUDACTORS_KAFKA__ENABLE_IDEMPOTENCE": "false",
        "FRAUDACTORS_KAFKA__SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
        "FRAUDACTORS_KAFKA__HEARTBEAT_INTERVAL_MS": str(k.heartbeat_interval_ms),
        "FRAUDACTORS_TOPICS__TRANSACTIONS": t.transactions,
        "FRAUDACTORS_TOPICS__PREDICTIONS": t.predictions,
        "FRAUDACTORS_TOPICS__LABELS": t.labels,
        "FRAUDACTORS_TOPICS__DLQ": t.dlq,
        "FRAUDACTORS_TOPICS__CONTROL": t.control,
        "FRAUDACTORS_TOPICS__PARTITIONS": str(t.partitions),
        "FRAUDACTORS_REDIS__URL": r.url,
        "FRAUDACTORS_REDIS__KEY_PREFIX": r.key_prefix,
        "FRAUDACTORS_HTTP__PORT": "0",
        "FRAUDACTORS_MODELS__DIR": settings.models.dir,
        "FRAUDACTORS_ENGINE__INFERENCE_MODE": e.inference_mode,
        "FRAUDACTORS_ENGINE__COMMIT_INTERVAL_MS": str(e.commit_interval_ms),
        "FRAUDACTORS_LOGGING__FORMAT": "json",
    })
    env.update(extra)
    return env


class EngineProcess:
    """``fraudactors run`` as a child process; its JSON log lines are kept in ``lines``."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None
        self._seen = asyncio.Event()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fraudactors", "run", env=self._env, cwd=str(REPO),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                self.lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                self.lines.append({"event": "unparsed", "text": raw.decode(errors="replace")})
            self._seen.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                found = self.events(name)
                if found:
                    return found[-1]
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"engine exited ({self.proc.returncode}) before {name}: "
                                         f"{self.lines[-5:]}")
                self._seen.clear()
                await self._seen.wait()

    async def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout_s):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> None:
    """Wait for a condition on an engine's own state, which has no event to wait on."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - observing state that signals nothing
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Engine]:
    """An engine in this process, ready (partitions assigned, models loaded), stopped afterwards."""
    engine = Engine(settings)
    await engine.start()
    try:
        await engine.wait_ready(timeout_s=60)
        yield engine
    finally:
        await engine.stop()


def models_with_extras(models_dir: Path, tmp_path: Path) -> Path:
    """The committed v1 and v2, plus ``v2b`` (v2's files under a new version name), ``v3-bad-sha``
    (a model.onnx that no longer matches its metadata) and ``v3-bad-onnx`` (bytes onnxruntime
    cannot load, with their sha256 recorded: only loading finds the fault)."""
    root = tmp_path / "models"
    root.mkdir()
    for version in ("v1", "v2"):
        (root / version).symlink_to(models_dir / version, target_is_directory=True)
    shutil.copytree(models_dir / "v2", root / "v2b")
    bad_sha = shutil.copytree(models_dir / "v2", root / "v3-bad-sha")
    data = bytearray((bad_sha / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad_sha / "model.onnx").write_bytes(bytes(data))
    bad_onnx = shutil.copytree(models_dir / "v2", root / "v3-bad-onnx")
    (bad_onnx / "model.onnx").write_bytes(b"this is not an ONNX graph" * 100)
    meta = json.loads((bad_onnx / "metadata.json").read_text())
    meta["sha256"] = sha256_file(bad_onnx / "model.onnx")
    (bad_onnx / "metadata.json").write_text(json.dumps(meta))
    return root


def nan_model(models_dir: Path, root: Path, version: str = "v3-nan") -> Path:
    """A version under ``root`` whose model loads and runs and scores every row NaN (0 / 0): a
    broken export, as a real ONNX graph; v2's fallback and attribution files otherwise."""
    import onnx
    from onnx import TensorProto, helper

    directory = shutil.copytree(models_dir / "v2", root / version)
    meta = json.loads((directory / "metadata.json").read_text())
    width = len(meta["feature_names"])
    graph = helper.make_graph(
        [helper.make_node("Slice", ["X", "start", "end", "axis"], ["two"]),
         helper.make_node("Sub", ["two", "two"], ["zero"]),
         helper.make_node("Div", ["zero", "zero"], ["probabilities"])],
        "nan", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        initializer=[helper.make_tensor(name, TensorProto.INT64, [1], [value])
                     for name, value in (("start", 0), ("end", 2), ("axis", 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, directory / "model.onnx")
    meta["sha256"] = sha256_file(directory / "model.onnx")
    (directory / "metadata.json").write_text(json.dumps(meta))
    return directory


def fail_first_publish(publisher: Any) -> list[int]:
    """Make ``publisher``'s next non-empty ``send_many`` fail for good (its acknowledgement future
    fails: the batch never reaches the broker); the list returned gets that batch's size."""
    real = publisher.send_many
    failed: list[int] = []

    async def send_many(messages: Any) -> asyncio.Future[None]:
        if not failed and messages:
            failed.append(len(messages))
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lost.set_exception(RuntimeError("the broker refused the batch"))
            return lost
        return await real(messages)

    publisher.send_many = send_many
    return failed


async def produce_before_corrupt(settings: Settings, partition: int, n: int,
                                 prefix: str) -> tuple[list[tuple[bytes, bytes, str]], int]:
    """``n`` transactions on ``partition`` of the transactions topic, then a batch that does not
    decode; returns the transactions and the batch's offset."""
    records = transactions(n, prefix=prefix)
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        for key, value, _ in records:
            await producer.send(settings.topics.transactions, value, key=key, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()
    return records, await produce_corrupt(settings, partition, [(b"u-1", b"x")])
