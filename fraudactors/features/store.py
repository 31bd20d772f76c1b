"""The online feature store: per-user state and merchant buckets in Redis (layout: ``keys.py``).

Per micro-batch, :meth:`OnlineFeatureStore.compute` makes exactly two round trips, each one
server-side script call (one command: redis-py's per-command cost, not Redis, is what limits a
pipeline of hundreds of small commands on two cores):

1. a read script: the state blob of every distinct user in the batch; for every distinct
   merchant, its packed transaction counts (summed here, in C) and its fraud window sums at the
   batch's event hour (or its whole frauds hash when the batch spans several event hours of
   that merchant); and the replay-log entries of the batch's offset range in each partition;
2. a write script: the updated user blobs (``SET .. EX ttl``, fenced), the replay-log entries of
   the records applied, the batch's merchant count increments appended to their strings (all and
   new customers', idempotent per ``(partition, offset)``), expiry, and the removal of buckets
   that fell out of every window.

In between, the batch is computed in Python by :func:`fraudactors.features.definition.transition`
(the same function training uses) with the states in memory, so two transactions of one user in
a batch see each other. Docs/architecture.md ("State and its invariants") lists the invariants;
in short:

- **Replay exactness.** A user's blob records the last applied ``(partition, offset)``; a record
  at or below it was applied before (its write landed, its Kafka offset was not committed). It
  is not counted again, and its feature vector is the one it was first scored with, read back
  from the partition's replay log (``{p<n>}:rl``: the vectors of the records applied since the
  last commit, trimmed to the committed offset on every write).
- **Fencing.** Each owner of a partition claims it (:meth:`claim`: the partition's epoch counter
  raised by one, and to at least the Redis server's clock in seconds, so that epochs keep rising
  after Redis lost the counter; ``scripts.CLAIM``) and every blob it writes carries that epoch. The write script keeps a blob whose
  partition is the writer's but whose epoch is newer: a former owner still in flight cannot
  overwrite the new owner's state (counted in ``stale_refused_total``). Merchant counts keep the
  highest offset counted per partition, so each record is counted once whoever writes it.
- **Event time.** Nothing here reads the wall clock (the fencing epoch reads Redis's, features
  never); pruning follows the batch's event times.
  A record older than a user's 30-day history is scored from the current state and changes
  nothing (``definition``: late records).
- **Atomic and validated.** The write is one script that checks every key's type and every
  argument before its first write, and is refused up front by a server out of memory.

Exactness under concurrency (one writer per partition, many partitions at once): every user
feature and the merchant fraud counts are exact; ``merchant_tx_count_24h/7d/30d``, the fraud
rates that divide by them and the new-customer features (``MERCHANT_COUNT_FEATURES``) are
eventually consistent (other partitions increment the same merchant between our read and write),
and equal the offline values when one writer processes a merchant's transactions in time order.

Errors: Redis unreachable, timing out or failing over raises :class:`FeatureStoreUnavailable`
(retriable); Redis refusing the request (OOM, wrong type, a script error, invalid input) raises
:class:`FeatureStoreRejected` (deterministic: the same request fails the same way). The client
never re-sends on its own; calling ``compute`` again with the same offsets is safe.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Any, TypeVar

import numpy as np
import orjson
from redis.exceptions import (
    AskError,
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from fraudactors.errors import FeatureStoreRejected, FeatureStoreUnavailable
from fraudactors.features import scripts
from fraudactors.features._kernel import counts_sums, counts_tables, merchant_tables, window_sums
from fraudactors.features.definition import (
    N_FEATURES,
    MerchantState,
    UserState,
    count_merchant_tx,
    day_of,
    features_of,
    hour_of,
    is_late,
    is_new_customer,
    transaction_only_features,
    transition,
)
from fraudactors.features.keys import KeyLayout, shard
from fraudactors.features.redis_client import CLIENT_ERRORS, ScriptRunner, make_client
from fraudactors.features.redis_client import ping as redis_ping
from fraudactors.features.schema import Label, Transaction
from fraudactors.features.state_codec import StateDecodeError, decode_state, encode_state
from fraudactors.logging import get_logger
from fraudactors.settings import Settings

# Buckets older than these (relative to the newest event of the merchant in the batch) are in no
# window any more and are deleted once a hash holds more than its bound of fields. The margins
# beyond the windows (24h / today, 30d) absorb partitions that lag behind others in event time:
# the fraud buckets, which must stay exact, keep 8 days of hours (they are sparse: only hours
# with a reported fraud); the counts keep 26 hours.
_KEEP_COUNT_HOURS = 26
_KEEP_COUNT_DAYS = 33
_MAX_COUNT_FIELDS = 192  # entries of a merchant's counts string before it is compacted (buckets: 26 + 33, twice)
_KEEP_FRAUD_HOURS = 8 * 24
_KEEP_FRAUD_DAYS = 40
_MAX_FRAUD_FIELDS = 320
# A transaction's standing label is kept this long (labeled_at, event time) after the newest label
# of its merchant: past the 30-day windows, a later verdict cannot change any feature. The label
# placements (engine/labels.py) keep as long behind their user's newest label.
KEEP_LABEL_MS = 45 * 86400 * 1000
# Redis runs one script at a time: big label batches are split to keep each call short.
_MAX_LABELS_PER_CALL = 1000

_IO_ERRORS: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, OSError, TimeoutError)
# Replies that mean "not now" rather than "never": a busy, loading or failing-over server.
_TRANSIENT_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "MOVED", "ASK")
# The same replies as redis-py's own classes, which strip the reply's first word (MovedError is an
# AskError, MasterDownError a ClusterDownError): a failover or a slot move, not a refusal.
_TRANSIENT_ERRORS = (ReadOnlyError, AskError, TryAgainError, ClusterDownError)
_OFFSET = struct.Struct(">q")
_VECTOR_BYTES = 4 * N_FEATURES
# A replay-log member: the record's offset (big-endian) and its feature vector (float32, native)
_MEMBER = np.dtype([("offset", ">i8"), ("vector", np.float32, (N_FEATURES,))])


def store_error(exc: BaseException, what: str) -> FeatureStoreUnavailable | FeatureStoreRejected:
    """The store's error for a Redis failure: unavailable (retry later) or rejected (deterministic)."""
    if isinstance(exc, ResponseError) and not isinstance(exc, _TRANSIENT_ERRORS):
        message = str(exc)
        if not message.startswith(_TRANSIENT_REPLIES):
            head = message.split(" ", 1)[0]
            kind = {"OOM": "oom", "WRONGTYPE": "wrongtype", "INVALID": "invalid",
                    "NOSCRIPT": "script"}.get(head, "script")
            if head == "INVALID" and "WRONGTYPE" in message:
                kind = "wrongtype"
            if isinstance(exc, OutOfMemoryError):  # redis-py strips the "OOM" of the reply
                kind = "oom"
            return FeatureStoreRejected(f"redis refused the {what}: {message}", kind)
    return FeatureStoreUnavailable(f"redis {what} failed: {type(exc).__name__}: {exc}")



def _matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """float32 ``(len(rows), N_FEATURES)`` of the feature rows: through float64 (exact for Python
    floats), then rounded once to float32 -- the values ``np.array(rows, dtype=np.float32)``
    gives, in half its time (one flat pass in C instead of a list per row)."""
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.float64, count=len(rows) * N_FEATURES)
    return flat.reshape(len(rows), N_FEATURES).astype(np.float32)


_RECORD = 5  # a merchant record: partition, offset, hour, day, new customer (0/1)


# The count kinds of the write script's plan (``scripts.COUNTS_CODEC``'s entry kinds).
_HOUR, _DAY, _NEW_HOUR, _NEW_DAY = 1, 2, 3, 4


def _increments(entries: list[Any]) -> list[list[Any]]:
    """A merchant's count increments per partition from its ``[partition, offset, hour, day, new, ...]``
    records: ``[partition, lowest offset, highest offset, records, kind, bucket, n, ...]`` with the
    kinds 1 event hour, 2 event day, 3 and 4 the same of new customers' records."""
    parts: dict[int, list[Any]] = {}
    for x in range(0, len(entries), _RECORD):
        p, offset, hour, day, new = entries[x:x + _RECORD]
        group = parts.get(p)
        if group is None:
            group = parts[p] = [offset, offset, 0, {}, {}, {}, {}]
        elif offset < group[0]:
            group[0] = offset
        elif offset > group[1]:
            group[1] = offset
        group[2] += 1
        hours, days = group[3], group[4]
        hours[hour] = hours.get(hour, 0) + 1
        days[day] = days.get(day, 0) + 1
        if new:
            new_hours, new_days = group[5], group[6]
            new_hours[hour] = new_hours.get(hour, 0) + 1
            new_days[day] = new_days.get(day, 0) + 1
    out: list[list[Any]] = []
    for p, (low, high, n, hours, days, new_hours, new_days) in parts.items():
        flat: list[Any] = [p, low, high, n]
        for kind, table in ((_HOUR, hours), (_DAY, days), (_NEW_HOUR, new_hours), (_NEW_DAY, new_days)):
            for bucket, k in table.items():
                flat += (kind, bucket, k)
        out.append(flat)
    return out


def _merchant_from_flat(counts: list[bytes], frauds: list[bytes]) -> MerchantState:
    """Full bucket state from two HGETALL replies (flat field/value lists): ``h<hour>``, ``d<day>``,
    ``nh<hour>``, ``nd<day>`` fields of the counts hash, ``h``/``d`` of the frauds hash, each
    ``int()`` of its value; other fields (the partitions' offsets) skipped. Parsed in C."""
    m = MerchantState()
    merchant_tables(counts, (m.tx_hours, m.tx_days, m.new_hours, m.new_days))
    merchant_tables(frauds, (m.fraud_hours, m.fraud_days))
    return m


def _merchant_view(counts: bytes | list[bytes] | None, frauds: list[Any], hour: int) -> MerchantState:
    """A merchant's state from the read script's two replies (``scripts.READ_BATCH``).

    ``counts``: the packed blob, None (no counts), or the flat fields of a counts hash written by
    an engine before the blob. ``frauds``: with a reference ``hour`` (>= 0; every use of the view
    stays in that hour) the fraud window sums, else the frauds hash's flat fields. Raises
    ValueError for a blob that cannot be read.
    """
    if hour < 0:
        if isinstance(counts, bytes):
            m = MerchantState()
            counts_tables(counts, (m.tx_hours, m.tx_days, m.new_hours, m.new_days))
            merchant_tables(frauds, (m.fraud_hours, m.fraud_days))
            return m
        return _merchant_from_flat(counts or [], frauds)
    m = MerchantState()
    if isinstance(counts, bytes):
        c24, c7, c30, n24, n30 = counts_sums(counts, hour)
    elif counts:  # a counts hash: its tables, then the windows of those
        merchant_tables(counts, (m.tx_hours, m.tx_days, m.new_hours, m.new_days))
        c24, c7, c30, _, _, _, n24, n30 = window_sums(m.tx_hours, m.tx_days, m.new_hours, m.new_days, {}, {}, hour)
    else:
        c24 = c7 = c30 = n24 = n30 = 0
    m.cache_hour = hour
    m.cache = [c24, c7, c30, int(frauds[0]), int(frauds[1]), int(frauds[2]), n24, n30]
    return m


@dataclass(slots=True)
class _Read:
    """What one read call covers (everything on one instance; one hash slot on a cluster)."""

    users: list[str] = field(default_factory=list)
    merchants: list[str] = field(default_factory=list)
    hours: list[int] = field(default_factory=list)
    logs: list[tuple[int, int]] = field(default_factory=list)  # (user shard, partition)
    ranges: list[list[int]] = field(default_factory=list)


@dataclass(slots=True)
class _Write:
    """What one write call covers; ``logs`` maps (user shard, partition) to [user index, offset, ...]."""

    users: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)  # user -> 1-based index in the call
    plan_users: list[list[int]] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    merchants: list[str] = field(default_factory=list)
    plan_merchants: list[list[Any]] = field(default_factory=list)
    records: list[list[Any]] = field(default_factory=list)  # per merchant [partition, offset, hour, day, new, ...]
    logs: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    rows: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # per log, the rows of X in its order


_G = TypeVar("_G")


def _group(groups: dict[str, _G], tag: str, kind: type[_G]) -> _G:
    """The call of ``groups`` for ``tag``, made on first use (not one throw-away object per lookup)."""
    group = groups.get(tag)
    if group is None:
        group = groups[tag] = kind()
    return group


class OnlineFeatureStore:
    """Redis-backed online features; see the module doc for keys, round trips and invariants."""

    def __init__(self, settings: Settings, *, max_connections: int | None = None) -> None:
        """``max_connections``: of its Redis pool (per node on a cluster); ``redis.max_connections``
        by default."""
        self._settings = settings
        self._max_connections = max_connections or settings.redis.max_connections
        cfg = settings.redis
        self.keys = KeyLayout(cfg.key_prefix)
        self._ttl = cfg.ttl_s
        self._timeout_s = cfg.socket_timeout_ms / 1000.0
        self._cluster = cfg.cluster
        self._redis: Any = None
        self._scripts: Any = None
        self._epochs: dict[int, int] = {}     # partition -> the epoch this owner claimed
        self._committed: dict[int, int] = {}  # partition -> committed offset (replay-log floor)
        self._log = get_logger(component="feature_store")
        self.corrupt_states_total = 0
        self.corrupt_counts_total = 0   # merchant count blobs that could not be read (replaced)
        self.replays_total = 0
        self.replays_inexact_total = 0  # replayed records whose first vector was not in the log
        self.repeats_total = 0  # records given twice in one call (decided and counted once)
        self.stale_refused_total = 0    # user writes refused because a newer owner wrote them
        self.late_total = 0             # records older than the user's history (state unchanged)

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check Redis answers; raises :class:`FeatureStoreUnavailable` if not.

        The client stays usable after a failed open: later calls reconnect by themselves.
        """
        if self._redis is None:
            self._redis = make_client(self._settings, self._timeout_s, max_connections=self._max_connections)
            self._scripts = ScriptRunner(self._redis, self._cluster, {
                "read": scripts.READ_BATCH, "write": scripts.WRITE_BATCH, "labels": scripts.APPLY_LABELS,
                "claim": scripts.CLAIM},
                self._settings, self._timeout_s, self._max_connections)
        try:
            await self._redis.ping()
            if self._cluster:
                await self._scripts.load()
        except _IO_ERRORS as exc:
            raise FeatureStoreUnavailable(f"redis unreachable: {exc}") from exc

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await self._scripts.close()
            await client.aclose()

    async def ping(self) -> bool:
        """True when Redis answers now (never raises)."""
        if self._redis is None:
            return False
        try:
            return await redis_ping(self._redis)  # every master, on a cluster
        except _IO_ERRORS:
            return False

    def _client(self) -> Any:
        if self._redis is None:
            raise FeatureStoreUnavailable("feature store is not open")
        return self._redis

    def _tag(self, tag: str) -> str:
        """The group a key goes into: its hash tag on a cluster, one group on one instance."""
        return tag if self._cluster else ""

    async def _run(self, script: str, calls: list[tuple[list[str], list[Any]]], what: str) -> list[Any]:
        try:
            return await self._scripts.run(script, calls)
        except _IO_ERRORS as exc:
            raise store_error(exc, what) from exc

    # -- ownership -----------------------------------------------------------------------------

    async def claim(self, partition: int) -> int:
        """Become the owner of ``partition``: a new fencing epoch, newer than every earlier owner's.

        Every later write of this store for the partition carries it; a former owner's writes
        are refused where this owner has written.
        """
        (reply,) = await self._run("claim", [([self.keys.epoch(partition)], [self._settings.redis.ttl_s])], "claim")
        epoch = int(reply)
        self._epochs[partition] = epoch
        return epoch

    def epoch(self, partition: int) -> int | None:
        """The epoch claimed for ``partition``, or None when it was not claimed (yet)."""
        return self._epochs.get(partition)

    def release(self, partition: int) -> None:
        """No longer the owner of ``partition`` (revoked)."""
        self._epochs.pop(partition, None)
        self._committed.pop(partition, None)

    def note_committed(self, partition: int, offset: int) -> None:
        """``offset`` is committed in Kafka: records below it are never delivered again, so the
        next write trims their replay-log entries."""
        if offset > self._committed.get(partition, -1):
            self._committed[partition] = offset

    # -- the batch path ------------------------------------------------------------------------

    async def compute(self, txns: Sequence[Transaction], partition: int | Sequence[int],
                      offsets: Sequence[int], *, log: bool = True) -> np.ndarray:
        """float32 ``(len(txns), N_FEATURES)``; one read and one write round trip; state updated.

        :meth:`stage` and then its write, awaited.
        """
        X, write = await self.stage(txns, partition, offsets, log=log)
        if write is not None:
            await write()
        return X

    async def stage(self, txns: Sequence[Transaction], partition: int | Sequence[int],
                    offsets: Sequence[int], *, log: bool = True
                    ) -> tuple[np.ndarray, Callable[[], Awaitable[None]] | None]:
        """The features of :meth:`compute` from its read, and its write still to make (``None``
        when nothing is to be written), so a caller can score the features while the state is
        written. The state is updated only once the write returns: the caller makes it before
        anything else reads these users or merchants, and must not hand a decision on before.

        ``partition`` is the source partition of every record, or one partition per record: a
        batch may mix partitions (a user lives in one partition, so each user's records keep
        their order), which lets a caller amortise the two round trips over more records when
        each partition alone is slow. ``offsets`` are the records' offsets in their partitions.
        With ``log=False`` the vectors are not kept for replay (state applied after the fact,
        e.g. records decided in degraded mode).
        """
        if len(offsets) != len(txns):
            raise ValueError(f"{len(txns)} transactions but {len(offsets)} offsets")
        partitions: Sequence[int]
        if isinstance(partition, int):
            partitions = [partition] * len(txns)
        else:
            partitions = partition
            if len(partitions) != len(txns):
                raise ValueError(f"{len(txns)} transactions but {len(partitions)} partitions")
        if not txns:
            return np.empty((0, N_FEATURES), dtype=np.float32), None
        ranges: dict[tuple[int, int], list[int]] = {}  # (user shard, partition) -> [lowest, highest]
        probes: dict[str, tuple[int, int]] = {}  # user -> (partition, lowest offset in the batch)
        for txn, p, offset in zip(txns, partitions, offsets, strict=True):
            if txn.user_id not in probes:
                probes[txn.user_id] = (p, offset)
            where = (shard(txn.user_id), p)
            span = ranges.get(where)
            if span is None:
                ranges[where] = [offset, offset]
            elif offset < span[0]:
                span[0] = offset
            elif offset > span[1]:
                span[1] = offset
        states, views, sizes, logged, unreadable = await self._read(txns, ranges, probes)
        epochs = self._epochs
        rows: list[Any] = []
        dirty: dict[str, None] = {}  # users with an applied transaction, in first-seen order
        applied: list[tuple[int, str, int, int]] = []  # (row, user, partition, offset) to log
        counted: dict[str, list[Any]] = {}  # merchant -> [partition, offset, hour, day, new, ...]
        newest: dict[str, float] = {}
        first_row: dict[tuple[int, int], int] = {}  # (partition, offset) -> its first row
        for i, (txn, p, offset) in enumerate(zip(txns, partitions, offsets, strict=True)):
            earlier = first_row.setdefault((p, offset), i)
            if earlier != i:
                # The same record twice in one call: a revoked worker's batch, still queued, and
                # its successor's re-fetch of the same uncommitted offsets, coalesced. It is one
                # record: one decision, counted once (the write counts a partition's records by
                # their aggregate when the stored high-water offset is below them all).
                self.repeats_total += 1
                rows.append(rows[earlier])
                continue
            state = states[txn.user_id]
            view = views[txn.merchant_id]
            t = txn.event_time
            if state is not None and state.partition == p and offset <= state.offset:
                self.replays_total += 1  # applied before a crash: its first vector, not a new one
                first = logged.get((p, offset))
                if first is None:
                    self.replays_inexact_total += 1
                    rows.append(features_of(state, view, txn))
                else:
                    rows.append(first)
                if not is_late(state, t):
                    # counted again only where its first write did not reach the merchant (a
                    # cluster node that failed mid-batch): the high-water offset decides
                    new = 1 if is_new_customer(rows[-1]) else 0
                    counted.setdefault(txn.merchant_id, []).extend((p, offset, hour_of(t), day_of(t), new))
                    newest[txn.merchant_id] = max(newest.get(txn.merchant_id, -1.0), t)
                continue
            late = is_late(state, t)
            features, state = transition(state, view, txn)
            state.partition = p
            state.offset = offset
            state.epoch = epochs.get(p, 0)
            states[txn.user_id] = state
            dirty[txn.user_id] = None
            rows.append(features)
            if log:
                applied.append((i, txn.user_id, p, offset))
            if late:
                self.late_total += 1
                continue
            new = 1 if is_new_customer(features) else 0
            count_merchant_tx(view, t, new == 1)
            counted.setdefault(txn.merchant_id, []).extend((p, offset, hour_of(t), day_of(t), new))
            if t > newest.get(txn.merchant_id, -1.0):
                newest[txn.merchant_id] = t

        X = _matrix(rows)
        if not dirty:
            return X, None
        return X, partial(self._write, list(dirty), states, counted, newest, sizes, unreadable, applied, X)

    async def peek(self, txns: Sequence[Transaction]) -> np.ndarray:
        """The features :meth:`compute` would give, from one read and no write (POST /predict).

        Nothing is stored: neither the user state nor the merchant counts change. Within the
        call, later transactions see earlier ones as in a batch.
        """
        if not txns:
            return np.empty((0, N_FEATURES), dtype=np.float32)
        states, views, _, _, _ = await self._read(txns, {}, {})
        rows: list[list[float]] = []
        for txn in txns:
            view = views[txn.merchant_id]
            late = is_late(states[txn.user_id], txn.event_time)
            features, states[txn.user_id] = transition(states[txn.user_id], view, txn)
            if not late:
                count_merchant_tx(view, txn.event_time, is_new_customer(features))
            rows.append(features)
        return _matrix(rows)

    async def _read(self, txns: Sequence[Transaction], ranges: dict[tuple[int, int], list[int]],
                    probes: dict[str, tuple[int, int]]) -> tuple[
            dict[str, UserState | None], dict[str, MerchantState], dict[str, int],
            dict[tuple[int, int], np.ndarray], set[str]]:
        """The batch's one read: user states, merchant views, the number of fields of each
        merchant's frauds hash (its pruning), the replay-log vectors in the batch's offset
        ranges (one call, or one per slot on a cluster) and the merchants whose counts could not
        be read."""
        self._client()
        keys_of = self.keys
        # one reference event hour per merchant, or -1 when its transactions span several
        ref_hour: dict[str, int] = {}
        for txn in txns:
            hour = hour_of(txn.event_time)
            if ref_hour.setdefault(txn.merchant_id, hour) != hour:
                ref_hour[txn.merchant_id] = -1
        groups: dict[str, _Read] = {}
        for user_id in dict.fromkeys(t.user_id for t in txns):
            _group(groups, self._tag(keys_of.user_tag(user_id)), _Read).users.append(user_id)
        for merchant_id, hour in ref_hour.items():
            group = _group(groups, self._tag(keys_of.merchant_tag(merchant_id)), _Read)
            group.merchants.append(merchant_id)
            group.hours.append(hour)
        for (user_shard, p), span in ranges.items():
            group = _group(groups, self._tag(f"u{user_shard}"), _Read)
            group.logs.append((user_shard, p))
            group.ranges.append(span)
        calls: list[tuple[list[str], list[Any]]] = []
        for group in groups.values():
            keys = [keys_of.user(u) for u in group.users]
            keys.extend(key for m in group.merchants for key in keys_of.merchant_pair(m))
            keys.extend(keys_of.replay_log(user_shard, p) for user_shard, p in group.logs)
            log_index = {where: r for r, where in enumerate(group.logs, start=1)}
            user_probes = []
            for u in group.users:
                probe = probes.get(u)
                if probe is None:
                    user_probes.append([0, -1, 0])
                else:
                    user_probes.append([log_index.get((shard(u), probe[0]), 0), probe[0], probe[1]])
            calls.append((keys, [len(group.users), len(group.merchants), orjson.dumps(group.hours),
                                 orjson.dumps(group.ranges), orjson.dumps(user_probes)]))
        replies_per_call = await self._run("read", calls, "read")

        states: dict[str, UserState | None] = {}
        views: dict[str, MerchantState] = {}
        sizes: dict[str, int] = {}  # merchant -> fields of its frauds hash
        logged: dict[tuple[int, int], np.ndarray] = {}
        unreadable: set[str] = set()
        for group, replies in zip(groups.values(), replies_per_call, strict=True):
            for user_id, blob in zip(group.users, replies, strict=False):
                states[user_id] = self._decode(user_id, blob or None)
            i = len(group.users)
            for merchant_id, hour in zip(group.merchants, group.hours, strict=True):
                counts, frauds = replies[i], replies[i + 1]
                i += 2
                try:
                    views[merchant_id] = _merchant_view(counts, frauds, hour)
                except ValueError as exc:
                    # unreadable counts are no counts (the batch's write replaces them)
                    self.corrupt_counts_total += 1
                    self._log.warning("merchant_counts_unreadable", merchant_id=merchant_id, error=str(exc))
                    views[merchant_id] = _merchant_view(None, frauds, hour)
                    unreadable.add(merchant_id)
                sizes[merchant_id] = int(frauds[3]) if hour >= 0 else len(frauds) // 2
            for (_, p), members in zip(group.logs, replies[i:], strict=True):
                for member in members:
                    if len(member) == 8 + _VECTOR_BYTES:
                        offset = _OFFSET.unpack_from(member)[0]
                        logged[(p, offset)] = np.frombuffer(member, dtype=np.float32, offset=8)
        return states, views, sizes, logged, unreadable

    async def _write(self, users: list[str], states: dict[str, UserState | None],
                     counted: dict[str, list[Any]], newest: dict[str, float],
                     sizes: dict[str, int], unreadable: set[str], applied: list[tuple[int, str, int, int]],
                     X: np.ndarray) -> None:
        """The batch's one write (see ``scripts.WRITE_BATCH`` for the argument layout): one call,
        or one per slot on a cluster, each applied wholly or not at all."""
        keys_of = self.keys
        groups: dict[str, _Write] = {}
        for user_id in users:
            state = states[user_id]
            assert state is not None
            group = _group(groups, self._tag(keys_of.user_tag(user_id)), _Write)
            group.index[user_id] = len(group.users) + 1
            group.users.append(user_id)
            blob = encode_state(state)
            group.plan_users.append([state.partition, state.epoch, len(blob)])
            group.blobs.append(blob)
        for merchant_id, entries in counted.items():
            n_frauds = sizes[merchant_id]
            hour = hour_of(newest[merchant_id])
            day = hour // 24
            group = _group(groups, self._tag(keys_of.merchant_tag(merchant_id)), _Write)
            group.merchants.append(merchant_id)
            group.plan_merchants.append([_increments(entries),
                                         # 0: compacted now, so counts it could not read are replaced
                                         0 if merchant_id in unreadable else _MAX_COUNT_FIELDS,
                                         hour - _KEEP_COUNT_HOURS, day - _KEEP_COUNT_DAYS,
                                         1 if n_frauds > _MAX_FRAUD_FIELDS else 0,
                                         hour - _KEEP_FRAUD_HOURS, day - _KEEP_FRAUD_DAYS])
            group.records.append(entries)
        for row, user_id, p, offset in applied:
            user_shard = shard(user_id)
            group = _group(groups, self._tag(f"u{user_shard}"), _Write)
            log = group.logs.get((user_shard, p))
            if log is None:
                log = group.logs[(user_shard, p)] = []
                group.rows[(user_shard, p)] = []
            log.extend((group.index[user_id], offset))
            group.rows[(user_shard, p)].append(row)
        calls: list[tuple[list[str], list[Any]]] = []
        for group in groups.values():
            keys = [keys_of.user(u) for u in group.users]
            for m in group.merchants:
                keys.extend(keys_of.merchant_pair(m))
                keys.append(keys_of.merchant_offsets(m))
            plan_logs = []
            members: list[bytes] = []
            if group.logs:
                # every log's members packed at once, then cut per log (in the logs' order)
                rows = list(chain.from_iterable(group.rows.values()))
                packed = np.empty(len(rows), dtype=_MEMBER)
                packed["offset"] = list(chain.from_iterable(flat[1::2] for flat in group.logs.values()))
                packed["vector"] = X[rows]
                buffer = packed.tobytes()
                at, size = 0, _MEMBER.itemsize
                for (user_shard, p), flat in group.logs.items():
                    keys.append(keys_of.replay_log(user_shard, p))
                    plan_logs.append([self._committed.get(p, -1), flat])
                    end = at + size * (len(flat) // 2)
                    members.append(buffer[at:end])
                    at = end
            plan = {"u": group.plan_users, "m": group.plan_merchants, "r": plan_logs, "s": _MEMBER.itemsize}
            calls.append((keys, [self._ttl, len(group.users), len(group.merchants), orjson.dumps(plan),
                                 orjson.dumps(group.records), b"".join(group.blobs), *members]))
        stale = written = reset = 0
        for reply in await self._run("write", calls, "write"):
            written += int(reply[0])
            stale += int(reply[1])
            reset += int(reply[3])
        if reset:  # read as no counts above already (and counted there)
            self._log.warning("merchant_counts_replaced", merchants=reset)
        if stale:
            self.stale_refused_total += stale
            self._log.warning("stale_writer_refused", users=stale, written=written)

    @staticmethod
    def compute_degraded(txns: Sequence[Transaction]) -> np.ndarray:
        """Transaction-only features (Redis down): see ``definition.transaction_only_features``."""
        if not txns:
            return np.empty((0, N_FEATURES), dtype=np.float32)
        return np.array([transaction_only_features(t) for t in txns], dtype=np.float32)

    async def apply_labels(self, labels: Sequence[Label]) -> list[int]:
        """Record labels into the merchant fraud buckets, one script call per 1,000 labels (per
        merchant shard on a cluster).

        For each transaction the label with the latest ``labeled_at`` stands (a chargeback after
        a "not fraud" review flips it; an older or repeated label changes nothing). Returns one
        status per label: 0 nothing changed, 1 new, 2 verdict flipped, 3 confirmed.
        """
        if not labels:
            return []
        self._client()
        keys_of = self.keys
        groups: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(self._tag(keys_of.merchant_tag(label.merchant_id)), []).append(i)
        calls: list[tuple[list[str], list[Any]]] = []
        order: list[list[int]] = []
        for indexes in groups.values():
            for start in range(0, len(indexes), _MAX_LABELS_PER_CALL):
                chunk = indexes[start:start + _MAX_LABELS_PER_CALL]
                keys: list[str] = []
                args: list[Any] = [self._ttl, KEEP_LABEL_MS]
                for i in chunk:
                    label = labels[i]
                    at = label.labeled_at
                    keys.append(keys_of.label_marks(label.merchant_id))
                    keys.append(keys_of.merchant_frauds(label.merchant_id))
                    args.extend((label.transaction_id, round(at * 1000), 1 if label.is_fraud else 0,
                                 f"h{hour_of(at)}", f"d{day_of(at)}"))
                calls.append((keys, args))
                order.append(chunk)
        statuses = [0] * len(labels)
        for chunk, reply in zip(order, await self._run("labels", calls, "label write"), strict=True):
            for i, status in zip(chunk, reply, strict=True):
                statuses[i] = int(status)
        return statuses

    async def user_state(self, user_id: str) -> UserState | None:
        """The stored state of one user (for tests and debugging)."""
        try:
            blob = await self._client().get(self.keys.user(user_id))
        except _IO_ERRORS as exc:
            raise store_error(exc, "read") from exc
        return self._decode(user_id, blob if isinstance(blob, bytes) else None)

    def _decode(self, user_id: str, blob: bytes | None) -> UserState | None:
        if blob is None:
            return None
        try:
            return decode_state(blob)
        except StateDecodeError as exc:
            # A blob we cannot read is treated as no history (and overwritten by this batch).
            self.corrupt_states_total += 1
            self._log.warning("user_state_unreadable", user_id=user_id, error=str(exc))
            return None
