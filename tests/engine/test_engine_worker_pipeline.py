"""The feature worker's two overlapped stages: ordering and failure, with stages we control.

The stages here are stand-ins with controllable timing (the real actors are exercised end to end
by the other engine tests); the mailbox, the worker and the offset tracker are the real ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from fraudactors.actors import IGNORED, Mailbox
from fraudactors.engine.inference import Scored
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.offsets import OffsetTracker
from fraudactors.engine.worker import FeatureWorker, Item, Stages
from fraudactors.features.definition import N_FEATURES
from fraudactors.features.schema import Transaction
from fraudactors.settings import Settings


def _item(offset: int) -> Item:
    value = orjson.dumps({"transaction_id": f"t-{offset}", "user_id": "u-1", "amount": 10.0,
                          "timestamp": 1_795_000_000 + offset})
    record = ConsumerRecord("transactions", 0, offset, 0, 0, b"u-1", value, None, 0, len(value), ())
    return record, 0.0


class _Features:
    """Zero features; each batch's state write is done at once, or, with ``hold_writes``, when
    the test resolves its future (in ``writes``)."""

    def __init__(self, hold_writes: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.hold_writes = hold_writes
        self.writes: list[asyncio.Future[tuple[np.ndarray, bool] | None]] = []

    async def compute_staged(self, txns: Sequence[Transaction], partition: int, offsets: Sequence[int]
                             ) -> tuple[np.ndarray, bool, asyncio.Future[tuple[np.ndarray, bool] | None]]:
        self.calls.append(list(offsets))
        written: asyncio.Future[tuple[np.ndarray, bool] | None] = asyncio.get_running_loop().create_future()
        self.writes.append(written)
        if not self.hold_writes:
            written.set_result(None)
        return np.zeros((len(txns), N_FEATURES), dtype=np.float32), False, written


class _Inference:
    """The first call waits for ``release`` (or raises ``fail``); later calls answer at once."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.release = asyncio.Event()
        self.fail = fail
        self.calls = 0
        self.scored: list[tuple[np.ndarray, bool]] = []  # what each call was given
        self.observe_flags: list[bool] = []  # each call's observe
        self.observed: list[tuple[np.ndarray, bool]] = []  # what observe() was given

    async def score(self, X: np.ndarray, ids: Sequence[str], degraded: bool = False,
                    event_times: Sequence[float] | None = None, observe: bool = True) -> list[Scored]:
        self.calls += 1
        self.scored.append((X, degraded))
        self.observe_flags.append(observe)
        if self.calls == 1:
            await self.release.wait()
            if self.fail is not None:
                raise self.fail
        return [Scored("A", "v1", 0.1, "approve", False, []) for _ in ids]

    def observe(self, X: np.ndarray, scored: Sequence[Scored], degraded: bool,
                event_times: Sequence[float] | None) -> None:
        assert event_times is not None and len(event_times) == len(scored)
        self.observed.append((X, degraded))


class _Publisher:
    """Records the transaction ids of each hand-off, and where each message went:
    (topic, transaction_id, stage header or None)."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.routes: list[tuple[str, str, str | None]] = []

    async def send_many(self, messages: Sequence[Any]) -> asyncio.Future[None]:
        self.sent.append([orjson.loads(value)["transaction_id"] for _, _, value, _ in messages])
        for topic, _, value, headers in messages:
            stage = dict(headers)["stage"].decode() if headers else None
            self.routes.append((topic, orjson.loads(value)["transaction_id"], stage))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _worker(settings: Settings, inference: _Inference,
            features: _Features | None = None) -> tuple[FeatureWorker, _Features, _Publisher]:
    features, publisher = features or _Features(), _Publisher()
    stages = Stages(features=features, inference=inference, publisher=publisher)  # type: ignore[arg-type]
    worker = FeatureWorker(0, Mailbox(1000, "p0"), OffsetTracker(0), settings=settings,
                           metrics=EngineMetrics(), stages=stages)
    return worker, features, publisher


async def _until(cond: Any) -> None:
    async with asyncio.timeout(10):
        while not cond():  # noqa: ASYNC110 (observing the worker, no event to wait on)
            await asyncio.sleep(0.005)


async def test_next_batch_computes_features_while_the_previous_one_is_scored(settings: Settings) -> None:
    inference = _Inference()
    worker, features, publisher = _worker(settings, inference)
    task = asyncio.create_task(worker.run(IGNORED))
    try:
        await worker.mailbox.put(_item(0))
        await _until(lambda: inference.calls == 1)  # batch [0] is being scored, and waits
        for offset in (1, 2):
            await worker.mailbox.put(_item(offset))
        await _until(lambda: len(features.calls) == 2)
        # batch [1, 2] has its features and was scored, but is not handed off before batch [0]
        await _until(lambda: inference.calls == 2)
        await asyncio.sleep(0.05)
        assert publisher.sent == []
        assert worker.tracker.registered_end == -1
        inference.release.set()
        await _until(lambda: worker.tracker.registered_end == 3)
        assert publisher.sent == [["t-0"], ["t-1", "t-2"]]
        assert features.calls == [[0], [1, 2]]
    finally:
        worker.mailbox.close()
        await asyncio.wait_for(task, 10)


async def test_while_scoring_is_slow_at_most_two_batches_are_in_hand(settings: Settings) -> None:
    """The worker prepares the next batch while one is scored, and no more: records wait in the
    mailbox (where backpressure sees them), not as prepared batches in memory."""
    inference = _Inference()
    worker, features, publisher = _worker(settings, inference)
    task = asyncio.create_task(worker.run(IGNORED))
    try:
        await worker.mailbox.put(_item(0))
        await _until(lambda: inference.calls == 1)  # batch [0] is scored, and waits
        for offset in range(1, 5):
            await worker.mailbox.put(_item(offset))
            await asyncio.sleep(0.02)  # most likely one record per batch
        await _until(lambda: len(features.calls) == 2)
        await asyncio.sleep(0.2)  # time for a third batch, which must not be taken
        assert len(features.calls) == 2, "a third batch was taken while two were in hand"
        assert sum(map(len, features.calls)) + worker.mailbox.depth == 5, "the rest waits in the mailbox"
        inference.release.set()
        await _until(lambda: worker.tracker.registered_end == 5)
        assert [t for batch in publisher.sent for t in batch] == [f"t-{i}" for i in range(5)]
    finally:
        worker.mailbox.close()
        await asyncio.wait_for(task, 10)


async def test_a_failed_batch_fails_the_worker_and_nothing_after_it_is_handed_off(settings: Settings) -> None:
    inference = _Inference(fail=RuntimeError("scoring broke"))
    worker, _, publisher = _worker(settings, inference)
    task = asyncio.create_task(worker.run(IGNORED))
    await worker.mailbox.put(_item(0))
    await _until(lambda: inference.calls == 1)
    await worker.mailbox.put(_item(1))
    await _until(lambda: inference.calls == 2)  # batch [1] scored, waiting for batch [0]
    inference.release.set()
    with pytest.raises(RuntimeError, match="scoring broke"):
        await asyncio.wait_for(task, 10)
    assert publisher.sent == []
    assert worker.tracker.registered_end == -1  # the ingestor rewinds to here: both are fetched again


async def test_a_batch_cancelled_from_inside_is_a_crash_not_a_stop(settings: Settings) -> None:
    """A stage that ends in CancelledError without anyone stopping the worker fails it with an
    error (the ingestor restarts a failed worker; a cancelled one it would take for stopped)."""
    inference = _Inference(fail=asyncio.CancelledError())
    worker, _, publisher = _worker(settings, inference)
    task = asyncio.create_task(worker.run(IGNORED))
    await worker.mailbox.put(_item(0))
    await _until(lambda: inference.calls == 1)
    inference.release.set()
    with pytest.raises(RuntimeError, match="cancelled inside"):
        await asyncio.wait_for(task, 10)
    assert not task.cancelled()
    assert publisher.sent == []


async def test_stopping_the_worker_finishes_the_batches_in_hand(settings: Settings) -> None:
    inference = _Inference()
    worker, _, publisher = _worker(settings, inference)
    task = asyncio.create_task(worker.run(IGNORED))
    await worker.mailbox.put(_item(0))
    await _until(lambda: inference.calls == 1)
    await worker.mailbox.put(_item(1))
    await _until(lambda: inference.calls == 2)
    task.cancel()
    await asyncio.sleep(0.05)
    inference.release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert publisher.sent == [["t-0"], ["t-1"]]
    assert worker.tracker.registered_end == 2


def _started_with_held_writes(settings: Settings) -> tuple[
        FeatureWorker, _Features, _Publisher, _Inference, asyncio.Task[None]]:
    """A running worker whose scoring answers at once and whose state writes the test resolves."""
    inference = _Inference()
    inference.release.set()
    worker, features, publisher = _worker(settings, inference, _Features(hold_writes=True))
    return worker, features, publisher, inference, asyncio.create_task(worker.run(IGNORED))


async def test_a_batch_scored_while_its_state_is_written_is_handed_off_only_once_it_is(
        settings: Settings) -> None:
    """Scoring overlaps the batch's state write; the decision waits for the write (a decision
    handed on must be one whose state landed), and the next batch is computed meanwhile."""
    worker, features, publisher, inference, task = _started_with_held_writes(settings)
    try:
        await worker.mailbox.put(_item(0))
        await _until(lambda: inference.calls == 1)  # scored before its write is done
        await worker.mailbox.put(_item(1))
        await _until(lambda: len(features.calls) == 2)
        await asyncio.sleep(0.05)
        assert publisher.sent == [], "handed off before its state was written"
        features.writes[0].set_result(None)
        await _until(lambda: worker.tracker.registered_end == 1)
        assert publisher.sent == [["t-0"]]
        features.writes[1].set_result(None)
        await _until(lambda: worker.tracker.registered_end == 2)
        assert publisher.sent == [["t-0"], ["t-1"]]
        assert inference.calls == 2, "a write that landed needs no second scoring"
        assert inference.observe_flags == [False, False], "scored while written: not counted yet"
        assert len(inference.observed) == 2 and all(
            counted is scored for (counted, _), (scored, _) in zip(inference.observed, inference.scored, strict=True)
        ), "each counted, as scored, once its write landed"
    finally:
        worker.mailbox.close()
        await asyncio.wait_for(task, 10)


async def test_a_batch_whose_state_write_failed_is_scored_again_on_the_features_it_got_instead(
        settings: Settings) -> None:
    """The write failed and the feature store gave the batch other features (degraded, say):
    the decision is made on those, not on the ones scored while the write was tried."""
    worker, features, publisher, inference, task = _started_with_held_writes(settings)
    try:
        await worker.mailbox.put(_item(0))
        await _until(lambda: inference.calls == 1)
        instead = np.full((1, N_FEATURES), 7.0, dtype=np.float32)
        features.writes[0].set_result((instead, True))
        await _until(lambda: worker.tracker.registered_end == 1)
        assert inference.calls == 2
        X, degraded = inference.scored[1]
        assert degraded and X is instead
        assert publisher.sent == [["t-0"]], "one decision for the record"
        assert inference.observe_flags == [False, True] and inference.observed == [], \
            "only the scoring published is counted in the metrics and the monitor"
    finally:
        worker.mailbox.close()
        await asyncio.wait_for(task, 10)


async def test_a_state_write_that_fails_outright_fails_the_worker_and_hands_nothing_off(
        settings: Settings) -> None:
    worker, features, publisher, inference, task = _started_with_held_writes(settings)
    await worker.mailbox.put(_item(0))
    await _until(lambda: inference.calls == 1)
    features.writes[0].set_exception(RuntimeError("the write broke"))
    with pytest.raises(RuntimeError, match="the write broke"):
        await asyncio.wait_for(task, 10)
    assert publisher.sent == []
    assert worker.tracker.registered_end == -1


class _FailingFeatures(_Features):
    async def compute_staged(self, txns: Sequence[Transaction], partition: int, offsets: Sequence[int]
                             ) -> tuple[np.ndarray, bool, asyncio.Future[tuple[np.ndarray, bool] | None]]:
        self.calls.append(list(offsets))
        raise RuntimeError("feature store broke")


async def test_a_failing_feature_store_crashes_the_worker_and_dead_letters_nothing(settings: Settings) -> None:
    """Only InvalidRecord is bad input: any other failure of the features is the worker's own,
    so the worker fails (to be restarted from its last handed-off batch) and nothing is sent."""
    features, publisher = _FailingFeatures(), _Publisher()
    stages = Stages(features=features, inference=_Inference(), publisher=publisher)  # type: ignore[arg-type]
    worker = FeatureWorker(0, Mailbox(1000, "p0"), OffsetTracker(0), settings=settings,
                           metrics=EngineMetrics(), stages=stages)
    task = asyncio.create_task(worker.run(IGNORED))
    for offset in (0, 1):
        await worker.mailbox.put(_item(offset))
    with pytest.raises(RuntimeError, match="feature store broke"):
        await asyncio.wait_for(task, 10)
    assert features.calls == [[0, 1]], "no per-record retry"
    assert publisher.sent == []
    assert worker.tracker.registered_end == -1


# -- what a worker lets into the state ---------------------------------------------------------------
def _at(offset: int, t: float) -> Item:
    value = orjson.dumps({"transaction_id": f"t-{offset}", "user_id": "u-1", "amount": 10.0, "timestamp": t})
    return ConsumerRecord("transactions", 0, offset, 0, 0, b"u-1", value, None, 0, len(value), ()), 0.0


def _released() -> _Inference:
    inference = _Inference()
    inference.release.set()
    return inference


async def test_a_partition_ahead_of_the_clock_cannot_walk_past_the_skew_of_the_clock(settings: Settings) -> None:
    """``engine.max_future_skew_s`` refuses a record ahead of the clock by more than the skew, however
    the partition got there: records each within the skew of the one before (a producer whose clock
    drifts ahead) stop at the clock's horizon; past records still pass."""
    s = settings.replace(engine={"max_future_skew_s": 60.0})
    worker, _, publisher = _worker(s, _released())
    task = asyncio.create_task(worker.run(IGNORED))
    now = time.time()
    try:
        for offset, ahead in enumerate((50.0, 100.0, 150.0, 400.0, 55.0, -86400.0 * 365)):
            await worker.mailbox.put(_at(offset, now + ahead))  # one batch each
            await _until(lambda offset=offset: worker.tracker.registered_end == offset + 1)
    finally:
        worker.mailbox.close()
        await asyncio.wait_for(task, 10)
    dlq, predictions = s.topics.dlq, s.topics.predictions
    assert publisher.routes == [(predictions, "t-0", None), (dlq, "t-1", "validate"), (dlq, "t-2", "validate"),
                                (dlq, "t-3", "validate"), (predictions, "t-4", None), (predictions, "t-5", None)]


async def test_a_parser_bug_on_one_record_dead_letters_it_and_the_partition_goes_on(settings: Settings) -> None:
    worker, _, publisher = _worker(settings, _released())
    real = worker._parse

    def parse(value: bytes | None) -> Transaction:
        if value is not None and b'"t-1"' in value:
            raise RuntimeError("a parser bug")
        return real(value)

    worker._parse = parse
    task = asyncio.create_task(worker.run(IGNORED))
    try:
        for offset in (0, 1, 2):
            await worker.mailbox.put(_item(offset))
        await _until(lambda: worker.tracker.registered_end == 3)
    finally:
        worker.mailbox.close()
        await asyncio.wait_for(task, 10)
    dlq, predictions = settings.topics.dlq, settings.topics.predictions
    assert sorted(publisher.routes) == sorted([(predictions, "t-0", None), (dlq, "t-1", "parse"),
                                               (predictions, "t-2", None)])
