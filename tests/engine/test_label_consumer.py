"""The label consumer's ordering with dead letters: a malformed label's offset is committed only
once the broker acknowledged its dead letter, so a crash in between re-reads it instead of losing
it. The consumer and the publisher are stand-ins (the order of two calls is what is tested; the
real path is covered end to end in test_engine_stream.py and test_engine_ab.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord, TopicPartition

from fraudactors.actors import IGNORED
from fraudactors.engine.labels import LabelConsumer, Said
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.errors import FeatureStoreRejected, InvalidRecord
from fraudactors.features.schema import Label, label_merchant
from fraudactors.features.store import OnlineFeatureStore
from fraudactors.services import kafka
from fraudactors.settings import Settings

TP = TopicPartition("labels", 3)


class _Consumer:
    """Hands out one batch: a malformed label at offset 7; records the commits."""

    def __init__(self) -> None:
        value = b'{"transaction_id": "t-1"'  # cut short
        self.batches: list[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]] = [
            {TP: [ConsumerRecord("labels", 3, 7, 0, 0, b"u-1", value, None, 0, len(value), ())]}]
        self.commits: list[dict[TopicPartition, int]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def getmany(self, timeout_ms: int, max_records: int) -> Any:
        if self.batches:
            return self.batches.pop(0)
        await asyncio.sleep(0.01)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


class _Publisher:
    def __init__(self) -> None:
        self.ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent: list[Any] = []

    async def send_many(self, messages: Any) -> asyncio.Future[None]:
        self.sent.extend(messages)
        return self.ack


async def _until(cond: Any) -> None:
    async with asyncio.timeout(10):
        while not cond():  # noqa: ASYNC110 (observing the consumer, no event to wait on)
            await asyncio.sleep(0.005)


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch) -> _Consumer:
    fake = _Consumer()
    monkeypatch.setattr(kafka, "make_consumer", lambda *args, **kwargs: fake)
    return fake


def _started(settings: Settings) -> tuple[LabelConsumer, _Publisher, asyncio.Task[None]]:
    publisher = _Publisher()
    labels = LabelConsumer(settings, EngineMetrics(), features=None, outcomes=None,  # type: ignore[arg-type]
                           publisher=publisher)  # type: ignore[arg-type]
    return labels, publisher, asyncio.create_task(labels.run(IGNORED))


async def test_a_malformed_labels_offset_is_committed_only_once_its_dead_letter_is_acknowledged(
        settings: Settings, consumer: _Consumer) -> None:
    labels, publisher, task = _started(settings)
    try:
        await _until(lambda: publisher.sent)
        (topic, key, _, headers), = publisher.sent
        assert (topic, key) == (settings.topics.dlq, b"u-1")
        assert dict(headers)["stage"] == b"labels" and dict(headers)["source_offset"] == b"7"
        await asyncio.sleep(0.1)
        assert consumer.commits == [], "committed before the broker had the dead letter"
        publisher.ack.set_result(None)
        await _until(lambda: consumer.commits)
        assert consumer.commits == [{TP: 8}]
        assert labels.invalid == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_dead_letter_the_broker_refused_fails_the_consumer_and_commits_nothing(
        settings: Settings, consumer: _Consumer) -> None:
    """The supervisor restarts it from the last commit: the label is read and dead-lettered again."""
    _, publisher, task = _started(settings)
    await _until(lambda: publisher.sent)
    publisher.ack.set_exception(KafkaConnectionError("broker gone"))
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(task, 10)
    assert consumer.commits == []


def _label(transaction_id: str, labeled_at: float) -> Label:
    return Label(transaction_id, "u-1", "m-1", True, labeled_at)


def test_a_label_dated_ahead_of_the_clock_is_refused_however_it_got_there(settings: Settings) -> None:
    """Its labeled_at would be its merchant's newest mark and age the others out of the dedup.
    Last year's labels (a replay) pass; labels each within the skew of the one before (a clock
    drifting ahead) stop at the clock's horizon."""
    labels = LabelConsumer(settings, EngineMetrics(), features=None, outcomes=None,  # type: ignore[arg-type]
                           publisher=None)  # type: ignore[arg-type]
    skew, now = settings.engine.max_future_skew_s, time.time()
    labels._check_time(_label("last-year", now - 365 * 86400.0))
    labels._check_time(_label("now", now))
    with pytest.raises(InvalidRecord, match="ahead of the clock"):
        labels._check_time(_label("2090", now + 64 * 365 * 86400.0))
    labels._check_time(_label("walk-0", now + skew * 0.9))
    with pytest.raises(InvalidRecord, match="ahead of the clock"):
        labels._check_time(_label("walk-1", now + skew * 1.8))


def test_outcome_entries_of_this_engine_and_of_the_engines_before_parse() -> None:
    """An entry holds the merchant its decision was made at, last (a merchant id may hold a tab or a
    comma); the entries of the previous engines (no merchant; before the A/B ledger, no bucket
    either) still parse: a rolling upgrade leaves them in Redis for a while."""
    now = Said.parse(b"493\td:A/v1=1,s:S/v3=0\tm-7, \tx")
    assert (now.bucket, now.flags, now.merchant) == (493, {"d:A/v1": True, "s:S/v3": False}, "m-7, \tx")
    before = Said.parse(b"493\td:A/v1=1,s:S/v3=0")
    assert (before.bucket, before.flags, before.merchant) == (493, {"d:A/v1": True, "s:S/v3": False}, None)
    oldest = Said.parse(b"A=1,B=0")
    assert (oldest.bucket, oldest.flags, oldest.merchant) == (None, {"A": True, "B": False}, None)


def test_a_label_counts_at_the_merchant_of_its_decision_else_at_the_one_it_names() -> None:
    decided = Said(1, {"d:A/v1": True}, "m-true")
    assert label_merchant(Label("t", "u", "m-wrong", True, 0.0), decided.merchant) == "m-true"
    assert label_merchant(Label("t", "u", "unknown", True, 0.0), decided.merchant) == "m-true"
    assert label_merchant(Label("t", "u", "m-named", True, 0.0), None) == "m-named"
    assert label_merchant(Label("t", "u", "unknown", True, 0.0), None) is None
    assert label_merchant(Label("t", "u", "m-named", True, 0.0), "unknown") == "unknown", \
        "a transaction without a merchant is at merchant 'unknown'"


async def test_a_label_from_the_far_future_goes_to_the_dead_letter_topic(
        settings: Settings, consumer: _Consumer) -> None:
    value = orjson.dumps({"transaction_id": "t-2", "user_id": "u-1", "merchant_id": "m-1", "is_fraud": True,
                          "labeled_at": "2090-01-01T00:00:00+00:00"})
    consumer.batches = [{TP: [ConsumerRecord("labels", 3, 9, 0, 0, b"u-1", value, None, 0, len(value), ())]}]
    labels, publisher, task = _started(settings)
    try:
        await _until(lambda: publisher.sent)
        (_, _, sent, headers), = publisher.sent
        assert sent == value and dict(headers)["stage"] == b"labels"
        assert b"ahead of the clock" in dict(headers)["error"]
        publisher.ack.set_result(None)
        await _until(lambda: consumer.commits)
        assert consumer.commits == [{TP: 10}] and labels.invalid == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _NoOutcomes:
    """No decision to match (the A/B side is covered in test_engine_ab.py)."""

    deltas: dict[Any, Any] = {}

    async def lookup(self, labels: Any) -> list[tuple[None, None]]:
        return [(None, None)] * len(labels)

    async def record_placed(self, labels: Any) -> int:
        return len(labels)


async def test_a_label_redis_refuses_is_a_dead_letter_and_the_rest_of_its_batch_is_applied(
        settings: Settings, consumer: _Consumer, redis_server: Any) -> None:
    """One merchant's frauds key holds something else (a refusal, whatever we retry): that label
    goes to the dead-letter topic; the others of its batch are applied, not dead-lettered with it."""
    s = settings.replace(redis={"url": redis_server.url, "key_prefix": f"fa-labels-{uuid.uuid4().hex[:12]}:"})
    store = OnlineFeatureStore(s)
    await store.open()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set(store.keys.merchant_frauds("m-broken"), "not a hash")
        records = []
        for offset, merchant in enumerate(("m-1", "m-broken", "m-2")):
            value = orjson.dumps({"transaction_id": f"t-{offset}", "user_id": "u-1", "merchant_id": merchant,
                                  "is_fraud": True, "labeled_at": "2026-10-20T10:00:00+00:00"})
            records.append(ConsumerRecord("labels", 3, offset, 0, 0, b"u-1", value, None, 0, len(value), ()))
        consumer.batches = [{TP: records}]
        publisher = _Publisher()
        publisher.ack.set_result(None)
        labels = LabelConsumer(s, EngineMetrics(), features=SimpleNamespace(store=store),  # type: ignore[arg-type]
                               outcomes=_NoOutcomes(), publisher=publisher)  # type: ignore[arg-type]
        task = asyncio.create_task(labels.run(IGNORED))
        try:
            await _until(lambda: consumer.commits)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        (_, _, value, headers), = publisher.sent
        assert value == records[1].value and b"refused" in dict(headers)["error"]
        assert consumer.commits == [{TP: 3}] and labels.applied == 2
        for merchant in ("m-1", "m-2"):
            assert await client.hlen(store.keys.merchant_frauds(merchant)) == 2  # its hour and day
    finally:
        await client.aclose()
        await store.close()


async def test_a_transactions_label_placement_is_recorded_once_and_bounded_per_user(settings: Settings) -> None:
    """scripts.RECORD_PLACEMENTS / LOOKUP_OUTCOMES on a real Redis: the first merchant recorded for a
    transaction stands (a later label only moves its time); a user's placements are pruned past
    the label marks' keep behind the user's newest label, and then to PLACEMENTS_PER_USER (at most
    63 more), and expire; a key of another type is neither read nor overwritten."""
    from fraudactors.engine.labels import PLACEMENTS_PER_USER, OutcomeRecorder
    from fraudactors.features.store import KEEP_LABEL_MS

    recorder = OutcomeRecorder(settings, EngineMetrics())
    client = recorder.connect()
    try:
        at = 1_790_000_000.0
        assert await recorder.record_placed([Label("t1", "u", "m-1", True, at)]) == 1
        assert await recorder.record_placed([Label("t1", "u", "m-2", False, at + 60.0),
                                             Label("t2", "u", "m-2", True, at)]) == 1
        assert await recorder.lookup([Label("t1", "u", "m-9", True, at), Label("t3", "u", "m-9", True, at)]) == \
            [(None, "m-1"), (None, None)]
        key = recorder.keys.placements("u")
        assert await client.hget(key, "t1") == f"{round((at + 60.0) * 1000)}|m-1".encode()
        assert 0 < await client.ttl(key) <= settings.redis.ttl_s
        # past the keep behind the user's newest label: pruned once the hash grows past 64 fields
        later = at + KEEP_LABEL_MS / 1000 + 3600.0
        await recorder.record_placed([Label(f"n{i}", "u", "m-3", True, later + i) for i in range(61)])
        assert await client.hlen(key) == 63 and await client.hexists(key, "t1")  # not at 64 yet
        await recorder.record_placed([Label("n61", "u", "m-3", True, later)])
        assert not await client.hexists(key, "t1") and not await client.hexists(key, "t2")
        assert await client.hlen(key) == 62
        # a heavy user: at most PLACEMENTS_PER_USER + 63, the newest kept
        heavy = [Label(f"h{i}", "heavy", "m", True, at + i) for i in range(3 * PLACEMENTS_PER_USER)]
        for start in range(0, len(heavy), 50):
            await recorder.record_placed(heavy[start:start + 50])
        kept = {k.decode() for k in await client.hkeys(recorder.keys.placements("heavy"))}
        assert PLACEMENTS_PER_USER <= len(kept) < PLACEMENTS_PER_USER + 64
        assert {f"h{i}" for i in range(len(heavy) - PLACEMENTS_PER_USER, len(heavy))} <= kept
        assert "h0" not in kept
        # not a placements hash (say, a user id "lp:x"'s state blob): left alone
        await client.set(recorder.keys.placements("x"), b"blob")
        assert await recorder.record_placed([Label("t1", "x", "m-1", True, at)]) == 0
        assert await client.get(recorder.keys.placements("x")) == b"blob"
        assert await recorder.lookup([Label("t1", "x", "m-1", True, at)]) == [(None, None)]
    finally:
        keys = [k async for k in client.scan_iter(match=settings.redis.key_prefix + "*")]
        if keys:
            await client.delete(*keys)
        await recorder._final_flush(client, ())


class _Placing:
    """Outcomes without decisions that remember placements; the first record call fails."""

    deltas: dict[Any, Any] = {}

    def __init__(self) -> None:
        self.placed: dict[str, str] = {}
        self.record_calls = 0

    async def lookup(self, labels: Any) -> list[tuple[None, str | None]]:
        return [(None, self.placed.get(label.transaction_id)) for label in labels]

    async def record_placed(self, labels: Any) -> int:
        self.record_calls += 1
        if self.record_calls == 1:
            raise ConnectionError("lost")
        for label in labels:
            self.placed.setdefault(label.transaction_id, label.merchant_id)
        return len(labels)


class _Store:
    """apply_labels: refuses merchant m-broken, records what it applied."""

    def __init__(self) -> None:
        self.applied: list[Label] = []

    async def apply_labels(self, labels: list[Label]) -> list[int]:
        if any(label.merchant_id == "m-broken" for label in labels):
            raise FeatureStoreRejected("refused", "wrongtype")
        self.applied.extend(labels)
        return [1] * len(labels)


async def test_a_placement_is_recorded_once_its_label_is_applied_and_its_record_alone_is_retried(
        settings: Settings, consumer: _Consumer) -> None:
    """A transaction labelled twice in a batch under two merchant ids counts at the first's; a
    refused label is not recorded as placed; a record call that failed is sent again by itself
    (the labels are not applied twice, which would count them as repeats)."""
    def record(offset: int, tid: str, merchant: str, fraud: bool) -> ConsumerRecord[bytes, bytes]:
        value = orjson.dumps({"transaction_id": tid, "user_id": "u-1", "merchant_id": merchant,
                              "is_fraud": fraud, "labeled_at": "2026-10-20T10:00:00+00:00"})
        return ConsumerRecord("labels", 3, offset, 0, 0, b"u-1", value, None, 0, len(value), ())

    consumer.batches = [{TP: [record(0, "t-1", "m-1", True), record(1, "t-1", "m-2", False)]},
                        {TP: [record(2, "t-2", "m-broken", True)]}]
    store, outcomes, publisher = _Store(), _Placing(), _Publisher()
    publisher.ack.set_result(None)
    s = settings.replace(redis={"retry_interval_ms": 10})
    labels = LabelConsumer(s, EngineMetrics(), features=SimpleNamespace(store=store),  # type: ignore[arg-type]
                           outcomes=outcomes, publisher=publisher)  # type: ignore[arg-type]
    task = asyncio.create_task(labels.run(IGNORED))
    try:
        await _until(lambda: len(consumer.commits) == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [(label.transaction_id, label.merchant_id) for label in store.applied] == [("t-1", "m-1")] * 2, \
        "each label applied once, both at the first label's merchant"
    assert outcomes.placed == {"t-1": "m-1"} and outcomes.record_calls == 2
    assert len(publisher.sent) == 1 and labels.applied == 2
