"""Delayed labels: feed the store's label-driven features and measure each variant online.

:class:`OutcomeRecorder` remembers what each variant (deciding and shadow) said about a user's
latest decisions, and the merchant each was made at, so that a label arriving days later can be
matched: one capped list per user (``<prefix>{u<shard>}:o:<user_id>``, the user's newest
``OUTCOMES_PER_USER`` decisions, with the state's TTL), written every 0.2 s in script calls of up
to 256 entries. A failed call's entries are sent again with a check that skips an entry already
listed, so a retry never lists a decision twice (the call may have landed in part or in whole).
Its memory grows with active users, never with decisions; a label for a decision that has left its
user's list (the user made more than ``OUTCOMES_PER_USER`` payments since, or the list expired) is
counted as unmatched.

:class:`LabelConsumer` reads ``labels`` in its own consumer group (``<group_id>.labels``), looks
each label's decision up, and applies the labels to the store at their transaction's merchant
(``schema.label_merchant``): where the transaction's labels were placed before (the user's
placements hash ``<prefix>{u<shard>}:lp:<user_id>``, read by the same script as the outcome list,
written once a label is applied), else the merchant the decision was made at when it is remembered
(a label's own ``merchant_id`` may be missing or wrong), else the label's ``merchant_id``; a label
naming none whose decision is forgotten counts nowhere (``fraudactors_labels_unplaced_total``), as
offline a label for a transaction not in the data. So a reversal that comes after its decision left
the outcome list still takes the first verdict back where it counted. The placements are pruned
``KEEP_LABEL_MS`` behind the user's newest label and to ``PLACEMENTS_PER_USER``: bounded per user
whatever the label rate. The store's ``apply_labels``: the latest ``labeled_at``
stands, a repeat changes nothing. It counts each new or changed verdict against what each variant said
(``fraudactors_label_outcomes_total{variant,outcome}``; a flipped verdict also in
``fraudactors_label_flips_total``), sends malformed labels to the dead-letter topic with
``stage=labels``, and commits once those dead letters are acknowledged. A batch that does not
decode stops its partition there (:mod:`fraudactors.engine.unreadable`; committed up to it, logged
once as ``partition_unreadable``); the other partitions' labels are applied. A label dated more than
``engine.max_future_skew_s`` ahead of the clock is malformed too: its ``labeled_at`` would be the
newest of its merchant's marks and age every other mark out of the dedup that keeps a redelivered
label from counting twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaError

from fraudactors.ab.ledger import (
    AB_ADD,
    Deltas,
    LedgerKeys,
    bin_index,
    card_group,
    decision_deltas,
    label_deltas,
    member,
    parse_member,
)
from fraudactors.engine.features import FeatureStoreActor
from fraudactors.engine.inference import Scored
from fraudactors.engine.metrics import EngineMetrics
from fraudactors.engine.publisher import Publisher
from fraudactors.engine.unreadable import Stopped, fetch
from fraudactors.engine.worker import dlq_message
from fraudactors.errors import FeatureStoreRejected, FeatureStoreUnavailable, InvalidRecord
from fraudactors.features import scripts
from fraudactors.features.keys import KeyLayout
from fraudactors.features.schema import label_merchant
from fraudactors.features.store import KEEP_LABEL_MS, store_error
from fraudactors.logging import Every, get_logger
from fraudactors.settings import Settings

if TYPE_CHECKING:
    from fraudactors.features.schema import Label, Transaction

_FLUSH_S = 0.2
_MAX_BUFFER = 200_000
# Entries per script call. Redis runs a script to the end before anything else, and every flush
# comes at once (5,000/s: ~1,000 entries every 0.2 s): at 2,000 a flush held the feature store's
# calls behind it for ~4 ms; at 256 a call takes ~1 ms and theirs slot in between.
_CHUNK = 256
OUTCOMES_PER_USER = 64
# A user's recorded label placements (transaction -> merchant) kept besides those pruned by time
# (KEEP_LABEL_MS behind the user's newest label): scripts.RECORD_PLACEMENTS.
PLACEMENTS_PER_USER = 256
_UNAVAILABLE = (FeatureStoreUnavailable, ConnectionError, OSError, TimeoutError)
_REFUSED_LOG_EVERY_S = 60.0


def _redis_errors() -> tuple[type[BaseException], ...]:
    from fraudactors.features.redis_client import CLIENT_ERRORS

    return (*_UNAVAILABLE, *CLIENT_ERRORS)


@dataclass(frozen=True, slots=True)
class Said:
    """What the models said about one remembered decision: its ledger bucket, each member's
    is_fraud (``d:A/v1`` decided, ``s:C/v3`` shadow) and the merchant it was made at. An entry is
    ``<transaction_id>\x1f<bucket>\t<flags>\t<merchant_id>`` (the flags hold no tab; the merchant
    id, last, may); this parses what follows the transaction id. Entries of the engines before
    (``<transaction_id>\t...``, still read: a rolling upgrade) have ``merchant`` None:
    ``<bucket>\t<flags>``, and before the A/B ledger ``A=1,B=0`` (variant names, no bucket:
    ``bucket`` None, they count in the metrics only). Those engines do not find the new entries
    (their lookup wants the tab): after a rollback the labels of decisions made by this version count
    as unmatched instead of being misread (they would read the merchant into the last flag)."""

    bucket: int | None
    flags: dict[str, bool]
    merchant: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Said:
        text = raw.decode()
        bucket_text, tab, rest = text.partition("\t")
        bucket = int(bucket_text) if tab else None
        flags_text, tab, merchant = rest.partition("\t") if tab else (text, "", "")
        flags: dict[str, bool] = {}
        for part in flags_text.split(","):
            name, _, flag = part.partition("=")
            flags[name] = flag == "1"
        return cls(bucket, flags, merchant if tab else None)

    def variant_of(self, name: str) -> str:
        return parse_member(name)[1] if self.bucket is not None else name


def outcome(predicted_fraud: bool, labelled_fraud: bool) -> str:
    if predicted_fraud:
        return "tp" if labelled_fraud else "fp"
    return "fn" if labelled_fraud else "tn"


class OutcomeRecorder:
    """Remembers each decision per variant in its user's capped list, one script call per flush."""

    def __init__(self, settings: Settings, metrics: EngineMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.keys = KeyLayout(settings.redis.key_prefix)
        self._ttl = settings.redis.ttl_s
        self._buffer: deque[tuple[str, bytes]] = deque(maxlen=_MAX_BUFFER)
        # Entries at the buffer's front that a failed call may have written: resent with the check.
        # May count more than there are (a full buffer drops from the front): a needless check.
        self._unsure = 0
        # the A/B ledger's increments (fraudactors.ab.ledger), flushed with the outcomes
        self.deltas = Deltas()
        # This process's ledger payloads are numbered (see _flush_ledger); the payload being sent is
        # kept with its number until Redis answers.
        self._writer = os.urandom(8).hex()
        self._number = 0
        self._sending: tuple[int, Deltas] | None = None
        self._said: dict[tuple[str, str, str], tuple[str, tuple[str, str]]] = {}  # see _member
        self.ledger_keys = LedgerKeys(settings.redis.key_prefix)
        self._bucket_s = settings.ab.bucket_s
        self._keep = settings.ab.keep_buckets
        # a bucket must outlive the window, written or not, at any pace of event time
        self._ledger_ttl = max(settings.redis.ttl_s, int(settings.ab.window_s) + 2 * settings.ab.bucket_s)
        self.dropped = 0
        self._redis: Any = None
        self._scripts: Any = None
        self._errors = _redis_errors()
        self._log = get_logger(actor="outcomes")
        self._refused_logged = Every(_REFUSED_LOG_EVERY_S)

    def record(self, txns: Sequence[Transaction], scored: Sequence[Scored]) -> None:
        """Called by the feature workers, synchronously, once per batch."""
        buffer = self._buffer
        room = _MAX_BUFFER - len(buffer)
        if room < len(txns):
            self.dropped += len(txns) - room  # oldest go first; only metrics depend on them
        bucket_s = self._bucket_s
        said = self._said
        append = buffer.append
        # decisions per (bucket, member, flagged, score bin): the ledger's increments, once per batch
        tally: dict[tuple[int, str, bool, int], int] = {}
        for txn, s in zip(txns, scored, strict=True):
            bucket = int(txn.event_time // bucket_s)
            name, flags = said.get(("d", s.variant, s.model_version)) or self._member("d", s.variant, s.model_version)
            flagged = s.is_fraud
            cell = (bucket, name, flagged, bin_index(s.probability))
            tally[cell] = tally.get(cell, 0) + 1
            text = flags[flagged]
            for sh in s.shadows:
                name, flags = (said.get(("s", sh.variant, sh.model_version))
                               or self._member("s", sh.variant, sh.model_version))
                cell = (bucket, name, sh.is_fraud, bin_index(sh.probability))
                tally[cell] = tally.get(cell, 0) + 1
                text = f"{text},{flags[sh.is_fraud]}"
            append((txn.user_id, f"{txn.transaction_id}\x1f{bucket}\t{text}\t{txn.merchant_id}".encode()))
        if txns:
            decision_deltas(self.deltas, tally)
            self.deltas.saw(max(txn.event_time for txn in txns))

    def _member(self, role: str, variant: str, model: str) -> tuple[str, tuple[str, str]]:
        """A model's member name and its ``name=0`` / ``name=1`` flag texts (cached: a handful)."""
        name = member(role, variant, model)
        out = self._said[(role, variant, model)] = (name, (f"{name}=0", f"{name}=1"))
        return out

    def _grouped(self, user_ids: Sequence[str]) -> list[list[int]]:
        """Indexes grouped by hash slot on a cluster (one group on one instance)."""
        if not self._settings.redis.cluster:
            return [list(range(len(user_ids)))] if user_ids else []
        groups: dict[str, list[int]] = {}
        for i, user_id in enumerate(user_ids):
            groups.setdefault(self.keys.user_tag(user_id), []).append(i)
        return list(groups.values())

    async def lookup(self, labels: Sequence[Label]) -> list[tuple[Said | None, str | None]]:
        """Per label, what each model said about its transaction (None: not remembered) and the
        merchant its transaction's labels were placed at before (None: none recorded)."""
        if self._scripts is None or not labels:
            return [(None, None)] * len(labels)
        keys_of = self.keys
        groups = self._grouped([label.user_id for label in labels])
        calls = [([key for i in group for key in (keys_of.outcomes(labels[i].user_id),
                                                   keys_of.placements(labels[i].user_id))],
                  [labels[i].transaction_id for i in group]) for group in groups]
        found: list[tuple[Said | None, str | None]] = [(None, None)] * len(labels)
        for group, reply in zip(groups, await self._scripts.run("lookup", calls), strict=True):
            for n, i in enumerate(group):
                raw, placed = reply[2 * n], reply[2 * n + 1]
                found[i] = (Said.parse(raw) if raw else None, placed.decode() if placed else None)
        return found

    async def record_placed(self, labels: Sequence[Label]) -> int:
        """Remembers the merchant each applied label was placed at (its ``merchant_id``), in its
        user's placements hash, for the later labels of its transaction. Idempotent: the first
        merchant recorded for a transaction stands. Returns the fields written."""
        if self._scripts is None or not labels:
            return 0
        keys_of = self.keys
        calls = [([keys_of.placements(labels[i].user_id) for i in group],
                  [self._ttl, KEEP_LABEL_MS, PLACEMENTS_PER_USER,
                   *(value for i in group for value in (labels[i].transaction_id, round(labels[i].labeled_at * 1000),
                                                        labels[i].merchant_id))])
                 for group in self._grouped([label.user_id for label in labels])]
        return sum(int(reply) for reply in await self._scripts.run("place", calls))

    def connect(self) -> Any:
        """Open the client (lazily connected) and the scripts; returns the client."""
        from fraudactors.features.redis_client import ScriptRunner, make_client

        timeout = max(self._settings.redis.socket_timeout_ms / 1000.0, 1.0)
        # No re-send by the client itself: a timed-out call may have landed, and only the flush's
        # own resend checks for that (the outcome lists' check, the ledger's payload numbers).
        client = make_client(self._settings, timeout)
        self._redis = client
        self._scripts = ScriptRunner(client, self._settings.redis.cluster, {
            "record": scripts.RECORD_OUTCOMES, "lookup": scripts.LOOKUP_OUTCOMES,
            "place": scripts.RECORD_PLACEMENTS, "ab_add": AB_ADD},
            self._settings, timeout)
        return client

    async def run(self, task_status: Any) -> None:
        errors = self._errors
        client = self.connect()
        task_status.started()
        try:
            while True:
                await asyncio.sleep(_FLUSH_S)
                with contextlib.suppress(*errors):  # counted and said by flush; sent again next time
                    await self.flush()
        finally:
            await asyncio.shield(self._final_flush(client, errors))

    async def _final_flush(self, client: Any, errors: tuple[type[BaseException], ...]) -> None:
        catch: tuple[type[BaseException], ...] = (TimeoutError, *errors)
        try:
            async with asyncio.timeout(2.0):
                await self.flush()
                if self._number and self._sending is None:  # nothing in doubt: the number is not needed
                    await client.delete(self.ledger_keys.writer(self._writer))
        except catch as exc:
            self._log.warning("outcomes_lost_on_stop", buffered=len(self._buffer),
                              ledger_unsent=self._sending is not None or bool(self.deltas), error=repr(exc))
        finally:
            self._redis = None
            runner, self._scripts = self._scripts, None
            if runner is not None:
                await runner.close()
            await client.aclose()

    async def flush(self) -> None:
        part = "outcomes"
        try:
            await self._flush_outcomes()
            part = "ledger"
            await self._flush_ledger()
        except self._errors as exc:
            self._flush_failed(part, exc)
            raise

    def _flush_failed(self, part: str, exc: BaseException) -> None:
        """Count a failed flush (``fraudactors_outcome_flush_failures_total{part,kind}``). Redis
        refusing it (a key of the wrong type, out of memory) is said once a minute per part and
        kind: what was refused is sent again as it is (a ledger payload is applied once by its
        number), refused again until an operator acts, and what is newer waits behind it."""
        error = exc if isinstance(exc, FeatureStoreRejected | FeatureStoreUnavailable) else store_error(exc, part)
        kind = error.kind if isinstance(error, FeatureStoreRejected) else "unavailable"
        self._metrics.outcome_flush_failures.labels(part, kind).inc()
        if kind == "unavailable":
            self._log.debug("outcomes_flush_failed", part=part, error=repr(exc), buffered=len(self._buffer))
        elif self._refused_logged.due((part, kind)):
            self._log.error("outcomes_flush_refused", part=part, kind=kind, error=str(exc),
                            buffered=len(self._buffer),
                            ledger_payload=self._sending[0] if self._sending is not None else None)

    async def _flush_ledger(self) -> None:
        """The ledger's increments as numbered payloads, one at a time. A payload whose call failed
        may have landed (a reply lost; a frozen Redis runs the request it holds when it thaws): it
        is sent again as it is, with its number, before anything newer, and the script skips a
        number it has applied. Increments taken meanwhile wait in ``deltas``, merged as they come:
        never more than one payload besides them, however long Redis is away."""
        if self._sending is not None:
            await self._send_ledger(*self._sending)
        if self.deltas and self._scripts is not None:
            self._number += 1
            self._sending = (self._number, self.deltas.take())
            await self._send_ledger(*self._sending)

    async def _send_ledger(self, number: int, payload: Deltas) -> None:
        if self._scripts is None:
            return
        call = payload.call(self.ledger_keys, self._bucket_s, self._keep, self._ledger_ttl, self._writer, number)
        if await self._scripts.run("ab_add", [call]) == [-1]:
            self._log.info("ab_payload_already_applied", number=number)
        self._sending = None

    async def _flush_outcomes(self) -> None:
        """The buffer in calls of up to ``_CHUNK`` entries. A failed call's chunk goes back to the
        buffer's front, and its entries are sent again with the script's check for an entry already
        listed: the call may have landed in part (on a cluster, every master but the failed one) or
        in whole (a reply lost; a frozen master runs the request it holds when it thaws)."""
        buffer = self._buffer
        keys_of = self.keys
        while self._scripts is not None and buffer:
            # never a chunk of resent and new entries: only a resend pays for the check
            self._unsure = min(self._unsure, len(buffer))
            again = self._unsure > 0
            chunk = [buffer.popleft() for _ in range(min(len(buffer), _CHUNK, self._unsure or _CHUNK))]
            self._unsure = max(self._unsure - len(chunk), 0)
            groups = self._grouped([user_id for user_id, _ in chunk])
            calls = [([keys_of.outcomes(chunk[i][0]) for i in group],
                      [self._ttl, OUTCOMES_PER_USER, int(again), *(chunk[i][1] for i in group)]) for group in groups]
            try:
                await self._scripts.run("record", calls)
            except BaseException:
                room = _MAX_BUFFER - len(buffer)
                kept = chunk[len(chunk) - room:] if room < len(chunk) else chunk
                buffer.extendleft(reversed(kept))
                self._unsure += len(kept)
                raise


class LabelConsumer:
    """Supervised child: labels -> store.apply_labels + online accuracy per variant -> commit."""

    def __init__(self, settings: Settings, metrics: EngineMetrics, features: FeatureStoreActor,
                 outcomes: OutcomeRecorder, publisher: Publisher) -> None:
        self._settings = settings
        self._metrics = metrics
        self._features = features
        self._outcomes = outcomes
        self._publisher = publisher
        self._log = get_logger(actor="labels")
        self.applied = 0
        self.invalid = 0
        self._skew = settings.engine.max_future_skew_s
        self._stopped = Stopped(metrics.partition_unreadable, self._log)  # partitions at a batch that does not decode

    def _check_time(self, label: Label) -> None:
        """A label may not be dated more than the skew ahead of the clock (the wall clock only
        guards against the future: a replay of last year's labels passes). Not ahead of the newest
        label taken: a run of labels each a little ahead of the one before would walk that far."""
        if label.labeled_at > time.time() + self._skew:
            self._metrics.future_records.inc()
            raise InvalidRecord(f"labeled_at is more than {self._skew:g}s ahead of the clock")

    async def run(self, task_status: Any) -> None:
        from fraudactors.features.schema import parse_label
        from fraudactors.services.kafka import make_consumer

        settings = self._settings
        consumer = make_consumer(settings, settings.topics.labels,
                                 group_id=f"{settings.kafka.group_id}.labels",
                                 client_id=f"{settings.kafka.client_id}-labels",
                                 # Labels arrive days late; a long poll costs the broker nothing
                                 # while the topic is idle (the decision path keeps its short one).
                                 fetch_max_wait_ms=max(settings.kafka.fetch_max_wait_ms, 500),
                                 group_instance_id=(f"{settings.kafka.group_instance_id}.labels"
                                                    if settings.kafka.group_instance_id else None))
        # Labels are not on the decision path and not part of readiness: report started at once
        # and join the group in the background (a group join costs seconds on some brokers).
        task_status.started()
        errors = _redis_errors()
        retry_s = settings.redis.retry_interval_ms / 1000.0
        stopped = self._stopped
        try:
            await consumer.start()
            while True:
                if stopped.at:  # revoked since: its next owner finds the batch again
                    for tp in stopped.at.keys() - consumer.assignment():
                        stopped.forget(tp)
                data, unreadable = await fetch(consumer, timeout_ms=500, max_records=1000)
                if unreadable is not None:
                    # what the failed call had drained is handled as any fetch; the rest waits
                    stopped.stop(consumer, unreadable)
                elif not data:
                    continue
                labels: list[Label] = []
                sources: list[Any] = []
                dead: list[Any] = []
                for records in data.values():
                    for record in records:
                        try:
                            label = parse_label(record.value)
                            self._check_time(label)
                            labels.append(label)
                            sources.append(record)
                        except InvalidRecord as exc:
                            dead.append(dlq_message(settings, record, exc.reason, "labels"))
                if dead:  # one line per batch, not per record
                    self.invalid += len(dead)
                    self._metrics.dlq.labels("labels").inc(len(dead))
                    self._log.warning("labels_invalid", count=len(dead))
                try:
                    await self._applied(labels, errors, retry_s)
                except FeatureStoreRejected as exc:
                    # Redis refuses something in the batch whatever we do: the refused labels are
                    # dead letters (found one at a time), the others are applied -- not a stall.
                    self._log.error("labels_rejected", kind=exc.kind, error=str(exc), labels=len(labels))
                    self._metrics.feature_store_errors.labels(exc.kind).inc()
                    for label, record in zip(labels, sources, strict=True):
                        try:
                            await self._applied([label], errors, retry_s)
                        except FeatureStoreRejected as one:
                            self._metrics.dlq.labels("labels").inc()
                            dead.append(dlq_message(settings, record, f"feature store refused the label: {one}",
                                                    "labels"))
                if dead:  # committed only once the broker has the dead letters
                    await (await self._publisher.send_many(dead))
                offsets = {tp: records[-1].offset + 1 for tp, records in data.items() if records}
                if unreadable is not None:
                    offsets[unreadable.tp] = unreadable.offset  # up to the batch, not past it
                try:
                    await consumer.commit(offsets)
                except KafkaError as exc:
                    self._log.warning("labels_commit_failed", error=repr(exc))
        finally:
            await asyncio.shield(consumer.stop())

    async def _applied(self, labels: list[Label], errors: tuple[type[BaseException], ...], retry_s: float) -> None:
        """:meth:`_apply`, retried while Redis is unavailable (raises FeatureStoreRejected); then
        the applied labels' placements recorded, that call alone retried (it is idempotent; the
        labels are not applied again, which would count them as repeats)."""
        while True:
            try:
                placed = await self._apply(labels)
                break
            except FeatureStoreRejected:
                raise
            except errors as exc:
                self._log.warning("labels_retry", error=repr(exc), labels=len(labels))
                await asyncio.sleep(retry_s)
        while placed:
            try:
                await self._outcomes.record_placed(placed)
                break
            except errors as exc:
                if isinstance(store_error(exc, "placement record"), FeatureStoreRejected):
                    # applied, and stays so; only a later label of these transactions may go elsewhere
                    self._log.error("label_placements_refused", error=repr(exc), labels=len(placed))
                    break
                self._log.warning("label_placements_retry", error=repr(exc), labels=len(placed))
                await asyncio.sleep(retry_s)
        self.applied += len(labels)

    async def _apply(self, labels: list[Label]) -> list[Label]:
        """Applies the labels where they count; returns the placed ones (at their merchant)."""
        if not labels:
            return []
        store = self._features.store
        assert store is not None
        # Looked up before the store is written: where the transaction's labels were placed before,
        # else the decision's merchant, says where the label counts (schema.label_merchant). A
        # transaction labelled twice in the batch: both where the first goes.
        placed: list[tuple[Label, Said | None]] = []
        at: dict[str, str] = {}
        for label, (said, before) in zip(labels, await self._outcomes.lookup(labels), strict=True):
            merchant = at.get(label.transaction_id) or before or label_merchant(
                label, said.merchant if said is not None else None)
            if merchant is not None:
                at[label.transaction_id] = merchant
                placed.append((label if merchant == label.merchant_id else replace(label, merchant_id=merchant),
                               said))
        statuses = await store.apply_labels([label for label, _ in placed])
        counts: dict[tuple[str, str], int] = {}
        unmatched = flips = 0
        deltas = self._outcomes.deltas
        for (label, said), status in zip(placed, statuses, strict=True):
            if status not in (1, 2):
                continue
            flips += status == 2
            if said is None:
                unmatched += 1
                continue
            for name, predicted in said.flags.items():
                key = (said.variant_of(name), outcome(predicted, label.is_fraud))
                counts[key] = counts.get(key, 0) + 1
            if said.bucket is not None:
                label_deltas(deltas, said.bucket, said.flags, label.is_fraud, flipped=status == 2,
                             group=card_group(label.user_id))
        for (variant, result), count in counts.items():
            self._metrics.label_outcomes.labels(variant, result).inc(count)
        if unmatched:
            self._metrics.labels_unmatched.inc(unmatched)
        if flips:
            self._metrics.label_flips.inc(flips)
        if len(placed) < len(labels):
            self._metrics.labels_unplaced.inc(len(labels) - len(placed))
        return [label for label, _ in placed]
