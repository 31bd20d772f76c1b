"""The feature worker: one per assigned partition, micro-batches in offset order.

parse -> features (one store round trip) -> inference (while the batch's state is written) ->
hand to the publisher once the write is done -> register the batch's acknowledgement with the
partition's :class:`OffsetTracker`. A record that is bad input
(:class:`InvalidRecord` from parsing or from the features) goes to the dead-letter topic with its
original key and bytes and a reason; it never crashes the worker and never blocks the partition.
Any other failure of a stage crashes the worker: its supervisor restarts it, and the partition is
read again from the end of the last batch handed off. The worker
does not wait for the broker's acknowledgement before taking the next batch: partitions pipeline,
and the tracker keeps commits honest.

Two stages per partition, overlapped: while batch k is scored and handed to the publisher
(the *tail*: inference -> publish -> register), batch k+1 is parsed and its features computed.
Features stay strictly one batch at a time and in offset order (each batch's state write lands
before the next batch reads, bad-input fallbacks included); tails run in order (each waits for
the one before it to hand off), so decisions and offsets are registered in offset order. At most
``_MAX_TAILS`` tails are in flight; a failed tail fails the worker (nothing after it is handed
off).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka.structs import ConsumerRecord

from fraudactors.engine.decision import encode_decision, utc_now_iso
from fraudactors.engine.features import FeatureStoreActor, Written
from fraudactors.engine.inference import InferenceActor, Scored
from fraudactors.engine.metrics import EngineMetrics, observe_many
from fraudactors.engine.offsets import OffsetTracker
from fraudactors.engine.publisher import Message, Publisher
from fraudactors.errors import InvalidRecord, MailboxClosed
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

if TYPE_CHECKING:
    from fraudactors.actors import Mailbox
    from fraudactors.features.schema import Transaction

# What the ingestor puts in a worker's mailbox: the record and its arrival (time.monotonic()).
Item = tuple[ConsumerRecord[bytes, bytes], float]

_MAX_ERROR_HEADER = 500
# Batches scored/handed off concurrently with the next batch's features (see the module doc).
_MAX_TAILS = 2


def dlq_message(settings: Settings, record: ConsumerRecord[bytes, bytes], reason: str, stage: str) -> Message:
    """The dead letter: original key and value, unchanged; the reason and the source in headers."""
    headers = [
        ("error", reason[:_MAX_ERROR_HEADER].encode("utf-8", "replace")),
        ("stage", stage.encode()),
        ("source_topic", record.topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
    ]
    return (settings.topics.dlq, record.key, record.value, headers)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A micro-batch after stage one: what is left to score, and its dead letters so far."""

    items: Sequence[Item]
    txns: list[Transaction]
    records: list[ConsumerRecord[bytes, bytes]]
    arrivals: list[float]
    X: Any
    degraded: bool
    dead: list[Message]
    # the batch's state write, still being made (see FeatureStoreActor.compute_staged)
    written: Written | None = None


@dataclass(frozen=True, slots=True)
class Stages:
    """The engine-wide actors every partition's records pass through, in order."""

    features: FeatureStoreActor
    inference: InferenceActor
    publisher: Publisher
    # Called with each decided batch (online accuracy: remember what each variant said).
    on_decided: Callable[[Sequence[Transaction], Sequence[Scored]], None] | None = None


class FeatureWorker:
    """Processes the records of one partition from its mailbox."""

    def __init__(
        self,
        partition: int,
        mailbox: Mailbox[Item],
        tracker: OffsetTracker,
        *,
        settings: Settings,
        metrics: EngineMetrics,
        stages: Stages,
    ) -> None:
        from fraudactors.features.definition import FEATURE_NAMES
        from fraudactors.features.schema import parse_transaction

        self.partition = partition
        self.mailbox = mailbox
        self.tracker = tracker
        self._settings = settings
        self._metrics = metrics
        self._features = stages.features
        self._inference = stages.inference
        self._publisher = stages.publisher
        self._on_decided = stages.on_decided
        self._parse = parse_transaction
        self._skew = settings.engine.max_future_skew_s
        # engine.emit_features: the names to label each decision's feature vector with (audit).
        self._feature_names: tuple[str, ...] | None = FEATURE_NAMES if settings.engine.emit_features else None
        self._log = get_logger(actor="feature_worker", partition=partition)
        self.batches = 0
        self.last_progress = time.monotonic()
        self.handing_off = False  # waiting in send_many: for room in the publish window, or metadata

    async def run(self, task_status: Any) -> None:
        """Supervised child. Cancellation lets the batches in hand finish (bounded), then stops."""
        batch_max = self._settings.engine.batch_max
        linger = self._settings.engine.batch_linger_ms / 1000.0
        grace = self._settings.engine.shutdown_timeout_s / 2
        tails: list[asyncio.Task[None]] = []
        prepared: asyncio.Task[_Prepared] | None = None
        getter: asyncio.Task[list[Item]] | None = None
        task_status.started()
        try:
            while True:
                for tail in [t for t in tails if t.done()]:
                    tails.remove(tail)
                    tail.result()  # a failed tail fails the worker (its supervisor restarts it)
                if len(tails) >= _MAX_TAILS:
                    await asyncio.wait(tails[:1])
                    continue
                if getter is None:
                    getter = asyncio.ensure_future(self.mailbox.get_batch(batch_max, linger))
                if tails and not getter.done():
                    # wait for records, but notice a tail that fails meanwhile (quiet partition)
                    await asyncio.wait([getter, *tails], return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        continue
                try:
                    items = await getter
                except MailboxClosed:
                    break
                finally:
                    getter = None
                if not items:
                    continue
                prepared = asyncio.ensure_future(self._prepare(items))
                await asyncio.shield(prepared)
                tails.append(self._tail(prepared.result(), tails))
                prepared = None
            await asyncio.gather(*tails)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling() == 0:
                # Nobody is stopping this worker: a batch was cancelled from inside (a stage gave
                # up). That is a crash, not a stop -- its supervisor restarts the worker.
                raise RuntimeError("a batch was cancelled inside the feature worker") from None
            # Finish the batches in hand so their decisions and offsets stay consistent.
            try:
                await asyncio.wait_for(self._drain(prepared, tails), grace)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception as exc:
                self._log.warning("worker_stop_batch_failed", error=repr(exc))
            raise
        finally:
            # After a failure the later tails can only fail (each waits for the one before it);
            # they have handed nothing off, so they are simply cancelled. A pending get_batch
            # leaves its records in the mailbox when cancelled.
            for tail in tails:
                tail.cancel()
            if getter is not None:
                getter.cancel()

    def _tail(self, batch: _Prepared, tails: list[asyncio.Task[None]]) -> asyncio.Task[None]:
        return asyncio.ensure_future(self._finish(batch, tails[-1] if tails else None))

    async def _drain(self, prepared: asyncio.Task[_Prepared] | None, tails: list[asyncio.Task[None]]) -> None:
        """On stop: the batch being prepared gets its tail too, then every tail ends."""
        if prepared is not None:
            await asyncio.shield(prepared)
            tails.append(self._tail(prepared.result(), tails))
        await asyncio.gather(*tails)

    async def _prepare(self, items: Sequence[Item]) -> _Prepared:
        """Stage one: parse and features (strictly one batch at a time per partition)."""
        metrics = self._metrics
        t0 = time.perf_counter()
        parse = self._parse
        records: list[ConsumerRecord[bytes, bytes]] = []
        arrivals: list[float] = []
        txns: list[Transaction] = []
        dead: list[Message] = []
        # the wall clock only guards against the future (the state follows event time): a replay of
        # last year's records passes, and no run of records can walk the horizon past the clock
        horizon = time.time() + self._skew
        for record, arrival in items:
            try:
                txn = parse(record.value)
            except InvalidRecord as exc:
                dead.append(dlq_message(self._settings, record, exc.reason, exc.stage or "parse"))
                continue
            except Exception as exc:  # a parser bug must not stop the partition
                dead.append(dlq_message(self._settings, record, f"unexpected parse error: {exc!r}", "parse"))
                continue
            reason = self._misplaced(record, txn, horizon)
            if reason is not None:
                dead.append(dlq_message(self._settings, record, reason, "validate"))
                continue
            records.append(record)
            arrivals.append(arrival)
            txns.append(txn)
        metrics.stage_latency.labels("parse").observe(time.perf_counter() - t0)
        X: Any = None
        degraded = False
        written: Written | None = None
        if txns:
            txns, records, arrivals, X, degraded, written = await self._features_for(
                txns, records, arrivals, dead)
        return _Prepared(items, txns, records, arrivals, X, degraded, dead, written)

    def _misplaced(self, record: ConsumerRecord[bytes, bytes], txn: Transaction, horizon: float) -> str | None:
        """Why a well-formed transaction cannot enter this partition's state, if it cannot.

        Its key must be its ``user_id`` (one partition owns a user: a record keyed otherwise
        could be applied by two owners at once), and its time may not lie more than
        ``engine.max_future_skew_s`` ahead of the clock (a record from 2099 would move its user's
        and merchant's pruning horizon). The horizon is the clock's, not the partition's newest
        event time plus the skew: with that, a run of records each a little ahead of the one before
        it (a producer whose clock drifts) would walk the horizon arbitrarily far.
        """
        if record.key != txn.user_id.encode():
            key = "none" if record.key is None else repr(record.key[:80])
            return f"record key {key} is not the transaction's user_id (transactions are keyed by user_id)"
        if txn.event_time > horizon:
            self._metrics.future_records.inc()
            return f"timestamp {txn.timestamp} is more than {self._skew:g}s ahead of the clock"
        return None

    async def _finish(self, batch: _Prepared, previous: asyncio.Task[None] | None) -> None:
        """Stage two: score, then -- after the previous batch's tail -- hand off and register."""
        metrics = self._metrics
        txns, records, arrivals, dead = batch.txns, batch.records, batch.arrivals, batch.dead
        X, degraded = batch.X, batch.degraded
        scored: Sequence[Scored] = ()
        try:
            if txns:
                ids = [t.transaction_id for t in txns]
                event_times = [t.event_time for t in txns]
                pending = batch.written is not None
                # scored while the state is written, and counted in the metrics and the model
                # monitor only once it is known to be the scoring published
                scored = await self._inference.score(X, ids, degraded=degraded, event_times=event_times,
                                                     observe=not pending)
                # handed on only once the state is written
                # (shielded: a tail cancelled while it waits must not cancel the actor's future)
                replaced = await asyncio.shield(batch.written) if batch.written is not None else None
                if replaced is not None:  # the write failed: the features the batch got instead
                    X, degraded = replaced
                    scored = await self._inference.score(X, ids, degraded=degraded, event_times=event_times)
                elif pending:
                    self._inference.observe(X, scored, degraded, event_times)
        except BaseException:
            if previous is not None:  # fail only after the batches before this one are handed off
                await asyncio.gather(previous, return_exceptions=True)
            raise
        if previous is not None:
            await previous
        messages: list[Message] = []
        if txns:
            messages = self._decisions(txns, records, arrivals, scored, degraded,
                                       X if self._feature_names is not None else None)
            if self._on_decided is not None:
                self._on_decided(txns, scored)
        if dead:
            messages.extend(dead)
            counts: dict[str, int] = {}
            for _, _, _, headers in dead:
                assert headers is not None
                stage = headers[1][1].decode()
                counts[stage] = counts.get(stage, 0) + 1
            for stage, count in counts.items():
                metrics.dlq.labels(stage).inc(count)
        t2 = time.perf_counter()
        items = batch.items
        self.handing_off = True
        try:
            ack = await self._publisher.send_many(messages)
        finally:
            self.handing_off = False
        self.tracker.register(items[-1][0].offset + 1, ack, records=len(items))
        metrics.stage_latency.labels("publish").observe(time.perf_counter() - t2)
        if not ack.done():
            # end_to_end: the batch's oldest arrival at the ingestor -> acknowledged by the broker
            first_arrival = items[0][1]
            e2e = metrics.stage_latency.labels("end_to_end")
            ack.add_done_callback(lambda _f: e2e.observe(time.monotonic() - first_arrival))
        self.batches += 1
        self.last_progress = time.monotonic()

    async def _features_for(
        self,
        txns: list[Transaction],
        records: list[ConsumerRecord[bytes, bytes]],
        arrivals: list[float],
        dead: list[Message],
    ) -> tuple[list[Transaction], list[ConsumerRecord[bytes, bytes]], list[float], Any, bool,
               Written | None]:
        """Features for the batch and its state write in flight; if the batch fails on bad input,
        isolate the record(s) at fault (one at a time, each written before the next).

        Only :class:`InvalidRecord` is bad input. Any other error (the store, the actor, a bug) is
        the worker's failure: it propagates, the worker crashes and its supervisor restarts it
        from the end of the last batch handed off -- a valid transaction is never dead-lettered
        because the machinery failed.
        """
        partition = self.partition
        try:
            X, degraded, written = await self._features.compute_staged(txns, partition,
                                                                       [r.offset for r in records])
            return txns, records, arrivals, X, degraded, written
        except InvalidRecord:
            pass
        import numpy as np

        keep_t: list[Transaction] = []
        keep_r: list[ConsumerRecord[bytes, bytes]] = []
        keep_a: list[float] = []
        rows: list[Any] = []
        degraded_any = False
        for txn, record, arrival in zip(txns, records, arrivals, strict=True):
            try:
                X1, deg = await self._features.compute([txn], partition, [record.offset])
            except InvalidRecord as exc:
                dead.append(dlq_message(self._settings, record, exc.reason, "features"))
                continue
            keep_t.append(txn)
            keep_r.append(record)
            keep_a.append(arrival)
            rows.append(X1)
            degraded_any = degraded_any or deg
        X = np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float32)
        return keep_t, keep_r, keep_a, X, degraded_any, None

    def _decisions(
        self,
        txns: Sequence[Transaction],
        records: Sequence[ConsumerRecord[bytes, bytes]],
        arrivals: Sequence[float],
        scored: Sequence[Scored],
        degraded: bool,
        X: Any = None,
    ) -> list[Message]:
        """The decision messages; with ``X`` (``engine.emit_features``) each also carries the
        float32 vector it was scored with (``tolist`` gives the exact float32 values as floats)."""
        metrics = self._metrics
        names = self._feature_names
        rows: Sequence[list[float] | None] = [None] * len(txns) if X is None else X.tolist()
        topic = self._settings.topics.predictions
        decided_at = utc_now_iso()
        now = time.monotonic()
        emit_shadow = self._settings.engine.emit_shadow
        out: list[Message] = []
        counts: dict[tuple[str, str, str], int] = {}
        latencies = [now - arrival for arrival in arrivals]
        observe_many(metrics.decision_latency, latencies)
        for txn, latency_s, s, row in zip(txns, latencies, scored, rows, strict=True):
            key = (s.variant, s.model_version, s.decision)
            counts[key] = counts.get(key, 0) + 1
            value = encode_decision(
                transaction_id=txn.transaction_id, user_id=txn.user_id, is_fraud=s.is_fraud,
                fraud_probability=s.probability, decision=s.decision, model_version=s.model_version,
                variant=s.variant, reasons=s.reasons, degraded=degraded, event_time=txn.timestamp,
                decided_at=decided_at, latency_ms=latency_s * 1000.0,
                features=None if row is None or names is None else dict(zip(names, row, strict=True)),
                shadow={sh.variant: sh.probability for sh in s.shadows} if emit_shadow else None)
            out.append((topic, txn.user_id.encode(), value, None))
        for (variant, version, decision), count in counts.items():
            metrics.decisions.labels(variant, version, decision).inc(count)
        if degraded:
            metrics.degraded.inc(len(out))
        return out
