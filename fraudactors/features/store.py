"""The online feature store: per-user state and merchant buckets in Redis.

Per micro-batch, :meth:`OnlineFeatureStore.compute` makes exactly two round trips, each one
server-side script call (one command: redis-py's per-command cost, not Redis, is what limits a
pipeline of hundreds of small commands on two cores):

1. a read script: the state blob of every distinct user in the batch and, for every distinct
   merchant, its window sums at the batch's event hour (summed in Redis from the hour/day buckets:
   six numbers instead of a hash to parse in Python), or its whole bucket hashes when the batch
   spans several event hours of that merchant;
2. a write script, atomic like ``MULTI``/``EXEC``: the updated user blobs (``SET .. EX ttl``),
   the merchant count increments (``HINCRBY`` on event hour/day buckets), expiry, and, once a
   hash has grown past its bound, the removal of buckets that fell out of every window.

The scripts touch keys of many users and merchants, so they need a single Redis (or Valkey)
instance, not a cluster.

In between, the batch is computed sequentially in Python by
:func:`fraudactors.features.definition.transition` (the same function training uses) with the
states in memory, so two transactions of one user in a batch see each other.

Keys (all under ``settings.redis.key_prefix``, all with ``settings.redis.ttl_s``):
``u:{user_id}`` user state blob (:mod:`state_codec`), ``mc:{merchant_id}`` hash of transaction
counts (``h<hour>``/``d<day>`` since the epoch, by event time), ``mf:{merchant_id}`` hash of fraud
label counts (``h<hour>``/``d<day>`` of ``labeled_at``), ``lb:{transaction_id}`` marks a label as
applied.

Crash replay: a user's blob records the last applied ``(partition, offset)``. A record whose
offset is at or below it (same partition) was already applied (its batch's write committed
before a crash, but its Kafka offset did not): it is scored from the current state and not
counted again, neither into the user's state nor into the merchant counts (those were written in
the same atomic write). Its feature vector may then differ from the first scoring (the state
already holds it); the decision is a repeat the downstream drops by ``transaction_id``.

Exactness under concurrency (one writer per partition, many partitions at once):

- exact: every user feature (one partition owns a user) and the merchant fraud counts
  ``merchant_fraud_count_7d/30d`` (labels are applied idempotently, counted from the hour after
  ``labeled_at``), given the labels were applied before the transaction is scored and no
  partition lags more than 7 days of event time behind another one writing the same merchant
  (older fraud hour buckets are pruned);
- eventually consistent: ``merchant_tx_count_24h/7d/30d`` and the fraud rates that divide by them,
  because other partitions increment the same merchant buckets between our read and write; they
  equal the offline values when one writer processes a merchant's transactions in time order.

Redis errors and timeouts raise :class:`FeatureStoreUnavailable` (retriable). The write is one
atomic script, so a batch is applied wholly or not at all; the client never re-sends on its own
(a write whose reply was lost may have been applied: calling ``compute`` again with the same
offsets is safe, the replay check skips what was applied). Records scored in degraded mode
instead are not added to any state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from fraudactors.errors import FeatureStoreUnavailable
from fraudactors.features import scripts
from fraudactors.features.definition import (
    N_FEATURES,
    MerchantState,
    UserState,
    count_merchant_tx,
    day_of,
    features_of,
    hour_of,
    transaction_only_features,
    transition,
)
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
_MAX_COUNT_FIELDS = 96
_KEEP_FRAUD_HOURS = 8 * 24
_KEEP_FRAUD_DAYS = 40
_MAX_FRAUD_FIELDS = 320
# Redis runs one script at a time: big label batches are split to keep each call short.
_MAX_LABELS_PER_CALL = 1000

_IO_ERRORS = (RedisError, OSError, TimeoutError)


def _merchant_from_flat(counts: list[bytes], frauds: list[bytes]) -> MerchantState:
    """Full bucket state from two HGETALL replies (flat field/value lists)."""
    m = MerchantState()
    for target_h, target_d, flat in ((m.tx_hours, m.tx_days, counts), (m.fraud_hours, m.fraud_days, frauds)):
        for i in range(0, len(flat) - 1, 2):
            key = flat[i]
            try:
                bucket = int(key[1:])
                n = int(flat[i + 1])
            except ValueError:
                continue
            if key[:1] == b"h":
                target_h[bucket] = n
            elif key[:1] == b"d":
                target_d[bucket] = n
    return m


def _merchant_from_sums(hour: int, sums: list[int]) -> MerchantState:
    """Bucket state holding only the window sums at ``hour`` (every use stays in that hour)."""
    m = MerchantState()
    m.cache_hour = hour
    m.cache = [int(v) for v in sums]
    return m


class OnlineFeatureStore:
    """Redis-backed online features; see the module doc for keys, round trips and exactness."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        cfg = settings.redis
        self._prefix = cfg.key_prefix
        self._ttl = cfg.ttl_s
        self._timeout_s = cfg.socket_timeout_ms / 1000.0
        self._redis: aioredis.Redis | None = None
        self._read_batch: Any = None
        self._write_batch: Any = None
        self._apply_labels: Any = None
        self._log = get_logger(component="feature_store")
        self.corrupt_states_total = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check Redis answers; raises :class:`FeatureStoreUnavailable` if not.

        The client stays usable after a failed open: later calls reconnect by themselves.
        """
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(
                self._settings.redis.url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
                health_check_interval=0,
            )
            self._read_batch = self._redis.register_script(scripts.READ_BATCH)
            self._write_batch = self._redis.register_script(scripts.WRITE_BATCH)
            self._apply_labels = self._redis.register_script(scripts.APPLY_LABELS)
        try:
            await self._redis.ping()
        except _IO_ERRORS as exc:
            raise FeatureStoreUnavailable(f"redis unreachable: {exc}") from exc

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()

    async def ping(self) -> bool:
        """True when Redis answers now (never raises)."""
        if self._redis is None:
            return False
        try:
            return bool(await self._redis.ping())
        except _IO_ERRORS:
            return False

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise FeatureStoreUnavailable("feature store is not open")
        return self._redis

    # -- keys ----------------------------------------------------------------------------------

    def user_key(self, user_id: str) -> str:
        return f"{self._prefix}u:{user_id}"

    def merchant_counts_key(self, merchant_id: str) -> str:
        return f"{self._prefix}mc:{merchant_id}"

    def merchant_frauds_key(self, merchant_id: str) -> str:
        return f"{self._prefix}mf:{merchant_id}"

    def label_key(self, transaction_id: str) -> str:
        return f"{self._prefix}lb:{transaction_id}"

    # -- the batch path ------------------------------------------------------------------------

    async def compute(self, txns: Sequence[Transaction], partition: int | Sequence[int],
                      offsets: Sequence[int]) -> np.ndarray:
        """float32 ``(len(txns), N_FEATURES)``; one read and one write round trip; state updated.

        ``partition`` is the source partition of every record, or one partition per record: a
        batch may mix partitions (a user lives in one partition, so each user's records keep
        their order), which lets a caller amortise the two round trips over more records when
        each partition alone is slow. ``offsets`` are the records' offsets in their partitions.
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
            return np.empty((0, N_FEATURES), dtype=np.float32)
        states, views, sizes = await self._read(txns)
        rows: list[list[float]] = []
        dirty: dict[str, None] = {}  # users with an applied transaction, in first-seen order
        increments: dict[str, dict[str, int]] = {}
        newest: dict[str, float] = {}
        for txn, partition, offset in zip(txns, partitions, offsets, strict=True):
            state = states[txn.user_id]
            view = views[txn.merchant_id]
            if state is not None and state.partition == partition and offset <= state.offset:
                rows.append(features_of(state, view, txn))  # already applied before a crash
                continue
            features, state = transition(state, view, txn)
            state.partition = partition
            state.offset = offset
            states[txn.user_id] = state
            dirty[txn.user_id] = None
            rows.append(features)
            t = txn.event_time
            count_merchant_tx(view, t)
            inc = increments.setdefault(txn.merchant_id, {})
            for field in (f"h{hour_of(t)}", f"d{day_of(t)}"):
                inc[field] = inc.get(field, 0) + 1
            if t > newest.get(txn.merchant_id, -1.0):
                newest[txn.merchant_id] = t

        if dirty:
            await self._write([(u, states[u]) for u in dirty], increments, newest, sizes)
        return np.array(rows, dtype=np.float32)

    async def peek(self, txns: Sequence[Transaction]) -> np.ndarray:
        """The features :meth:`compute` would give, from one read and no write (POST /predict).

        Nothing is stored: neither the user state nor the merchant counts change. Within the
        call, later transactions see earlier ones as in a batch.
        """
        if not txns:
            return np.empty((0, N_FEATURES), dtype=np.float32)
        states, views, _ = await self._read(txns)
        rows: list[list[float]] = []
        for txn in txns:
            view = views[txn.merchant_id]
            features, states[txn.user_id] = transition(states[txn.user_id], view, txn)
            count_merchant_tx(view, txn.event_time)
            rows.append(features)
        return np.array(rows, dtype=np.float32)

    async def _read(self, txns: Sequence[Transaction]) -> tuple[
            dict[str, UserState | None], dict[str, MerchantState], dict[str, tuple[int, int]]]:
        """The batch's one read: user states, merchant views and merchant hash sizes."""
        self._client()
        users = list(dict.fromkeys(t.user_id for t in txns))
        # one reference event hour per merchant, or -1 when its transactions span several
        ref_hour: dict[str, int] = {}
        for txn in txns:
            hour = hour_of(txn.event_time)
            if ref_hour.setdefault(txn.merchant_id, hour) != hour:
                ref_hour[txn.merchant_id] = -1
        keys = [self.user_key(u) for u in users]
        for merchant_id in ref_hour:
            keys.append(self.merchant_counts_key(merchant_id))
            keys.append(self.merchant_frauds_key(merchant_id))
        try:
            replies = await self._read_batch(keys=keys, args=[len(users), orjson.dumps(list(ref_hour.values()))])
        except _IO_ERRORS as exc:
            raise FeatureStoreUnavailable(f"redis read failed: {type(exc).__name__}: {exc}") from exc

        states: dict[str, UserState | None] = {}
        for user_id, blob in zip(users, replies, strict=False):
            states[user_id] = self._decode(user_id, blob)
        views: dict[str, MerchantState] = {}
        sizes: dict[str, tuple[int, int]] = {}
        i = len(users)
        for merchant_id, hour in ref_hour.items():
            first, second = replies[i], replies[i + 1]
            i += 2
            if hour >= 0:
                views[merchant_id] = _merchant_from_sums(hour, first)
                sizes[merchant_id] = (int(second[0]), int(second[1]))
            else:
                views[merchant_id] = _merchant_from_flat(first, second)
                sizes[merchant_id] = (len(first) // 2, len(second) // 2)
        return states, views, sizes

    async def _write(self, users: list[tuple[str, UserState | None]], increments: dict[str, dict[str, int]],
                     newest: dict[str, float], sizes: dict[str, tuple[int, int]]) -> None:
        """The batch's one atomic write (see ``scripts.WRITE_BATCH`` for the argument layout)."""
        keys = [self.user_key(user_id) for user_id, _ in users]
        plan: list[list[Any]] = []
        for merchant_id, inc in increments.items():
            keys.append(self.merchant_counts_key(merchant_id))
            keys.append(self.merchant_frauds_key(merchant_id))
            n_counts, n_frauds = sizes[merchant_id]
            hour = hour_of(newest[merchant_id])
            day = hour // 24
            plan.append([[x for item in inc.items() for x in item],
                         1 if n_counts + len(inc) > _MAX_COUNT_FIELDS else 0,
                         hour - _KEEP_COUNT_HOURS, day - _KEEP_COUNT_DAYS,
                         1 if n_frauds > _MAX_FRAUD_FIELDS else 0,
                         hour - _KEEP_FRAUD_HOURS, day - _KEEP_FRAUD_DAYS])
        args: list[Any] = [self._ttl, len(users), orjson.dumps(plan)]
        for _, state in users:
            assert state is not None
            args.append(encode_state(state))
        try:
            await self._write_batch(keys=keys, args=args)
        except _IO_ERRORS as exc:
            raise FeatureStoreUnavailable(f"redis write failed: {type(exc).__name__}: {exc}") from exc

    def compute_degraded(self, txns: Sequence[Transaction]) -> np.ndarray:
        """Transaction-only features (Redis down): see ``definition.transaction_only_features``."""
        if not txns:
            return np.empty((0, N_FEATURES), dtype=np.float32)
        return np.array([transaction_only_features(t) for t in txns], dtype=np.float32)

    async def apply_labels(self, labels: Sequence[Label]) -> int:
        """Record fraud labels into the merchant buckets in one script call (per 1,000 labels);
        idempotent per ``transaction_id`` (the first label applied for a transaction wins).
        Returns how many labels were new."""
        if not labels:
            return 0
        self._client()
        applied = 0
        for start in range(0, len(labels), _MAX_LABELS_PER_CALL):
            keys: list[str] = []
            args: list[Any] = [self._ttl]
            for label in labels[start:start + _MAX_LABELS_PER_CALL]:
                at = label.labeled_at
                keys.append(self.label_key(label.transaction_id))
                keys.append(self.merchant_frauds_key(label.merchant_id))
                args.append(f"d{day_of(at)}")
                args.append(f"h{hour_of(at)}")
                args.append(1 if label.is_fraud else 0)
            try:
                applied += int(await self._apply_labels(keys=keys, args=args))
            except _IO_ERRORS as exc:
                raise FeatureStoreUnavailable(f"redis label write failed: {type(exc).__name__}: {exc}") from exc
        return applied

    async def user_state(self, user_id: str) -> UserState | None:
        """The stored state of one user (for tests and debugging)."""
        try:
            blob = await self._client().get(self.user_key(user_id))
        except _IO_ERRORS as exc:
            raise FeatureStoreUnavailable(f"redis read failed: {exc}") from exc
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
