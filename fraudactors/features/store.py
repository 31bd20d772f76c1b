"""The online feature store: per-user state and merchant buckets in Redis.

Per micro-batch, :meth:`OnlineFeatureStore.compute` makes exactly two round trips:

1. one read pipeline: the state blob of every distinct user in the batch and, for every
   distinct merchant, its transaction-count hash and its fraud-label hash;
2. one write pipeline in ``MULTI``/``EXEC`` (all or nothing): the updated user blobs (``SET ..
   EX ttl``), the merchant count increments (``HINCRBY`` on event hour/day buckets), expiry, and
   the removal of buckets that fell out of every window.

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
the same ``MULTI``/``EXEC``). Its feature vector may then differ from the first scoring (the state
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

Redis errors and timeouts raise :class:`FeatureStoreUnavailable` (retriable); nothing is
written by a batch that failed. The client does not retry on its own, so a lost ``EXEC`` reply is
never applied twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from fraudactors.errors import FeatureStoreUnavailable
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
# window any more and are deleted. The margins beyond the windows (24h / today, 30d) absorb
# partitions that lag behind others in event time: the fraud buckets, which must stay exact,
# keep 8 days of hours (they are sparse: only hours with a reported fraud), the counts 3 days.
_STALE_COUNT_HOURS = 72
_STALE_COUNT_DAYS = 33
_STALE_FRAUD_HOURS = 8 * 24
_STALE_FRAUD_DAYS = 40

_APPLY_LABEL = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  if ARGV[4] == '1' then
    redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
    redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
    redis.call('EXPIRE', KEYS[2], ARGV[1])
  end
  return 1
end
return 0
"""

_IO_ERRORS = (RedisError, OSError, TimeoutError)


def _merchant_from_hashes(counts: dict[bytes, bytes], frauds: dict[bytes, bytes]) -> MerchantState:
    m = MerchantState()
    for target_h, target_d, data in ((m.tx_hours, m.tx_days, counts), (m.fraud_hours, m.fraud_days, frauds)):
        for key, value in data.items():
            try:
                bucket = int(key[1:])
                n = int(value)
            except ValueError:
                continue
            if key[:1] == b"h":
                target_h[bucket] = n
            elif key[:1] == b"d":
                target_d[bucket] = n
    return m


def _stale_fields(data: dict[bytes, bytes], newest: float, keep_hours: int, keep_days: int) -> list[bytes]:
    oldest_hour = hour_of(newest) - keep_hours
    oldest_day = day_of(newest) - keep_days
    stale = []
    for key in data:
        try:
            bucket = int(key[1:])
        except ValueError:
            stale.append(key)
            continue
        if (key[:1] == b"h" and bucket < oldest_hour) or (key[:1] == b"d" and bucket < oldest_day):
            stale.append(key)
    return stale


class OnlineFeatureStore:
    """Redis-backed online features; see the module doc for keys, round trips and exactness."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        cfg = settings.redis
        self._prefix = cfg.key_prefix
        self._ttl = cfg.ttl_s
        self._timeout_s = cfg.socket_timeout_ms / 1000.0
        self._redis: aioredis.Redis | None = None
        self._apply_label: Any = None
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
            self._apply_label = self._redis.register_script(_APPLY_LABEL)
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

    async def compute(self, txns: Sequence[Transaction], partition: int, offsets: Sequence[int]) -> np.ndarray:
        """float32 ``(len(txns), N_FEATURES)``; one read and one write round trip; state updated."""
        if len(offsets) != len(txns):
            raise ValueError(f"{len(txns)} transactions but {len(offsets)} offsets")
        if not txns:
            return np.empty((0, N_FEATURES), dtype=np.float32)
        client = self._client()
        users = list(dict.fromkeys(t.user_id for t in txns))
        merchants = list(dict.fromkeys(t.merchant_id for t in txns))

        try:
            async with client.pipeline(transaction=False) as pipe:
                for user_id in users:
                    pipe.get(self.user_key(user_id))
                for merchant_id in merchants:
                    pipe.hgetall(self.merchant_counts_key(merchant_id))
                    pipe.hgetall(self.merchant_frauds_key(merchant_id))
                replies = await pipe.execute()
        except _IO_ERRORS as exc:
            raise FeatureStoreUnavailable(f"redis read failed: {type(exc).__name__}: {exc}") from exc

        states: dict[str, UserState | None] = {}
        for user_id, blob in zip(users, replies, strict=False):
            states[user_id] = self._decode(user_id, blob)
        views: dict[str, MerchantState] = {}
        raw_hashes: dict[str, tuple[dict[bytes, bytes], dict[bytes, bytes]]] = {}
        base = len(users)
        for i, merchant_id in enumerate(merchants):
            counts, frauds = replies[base + 2 * i], replies[base + 2 * i + 1]
            raw_hashes[merchant_id] = (counts, frauds)
            views[merchant_id] = _merchant_from_hashes(counts, frauds)

        rows: list[list[float]] = []
        dirty: set[str] = set()
        increments: dict[str, dict[str, int]] = {}
        newest: dict[str, float] = {}
        for txn, offset in zip(txns, offsets, strict=True):
            state = states[txn.user_id]
            view = views[txn.merchant_id]
            if state is not None and state.partition == partition and offset <= state.offset:
                rows.append(features_of(state, view, txn))  # already applied before a crash
                continue
            features, state = transition(state, view, txn)
            state.partition = partition
            state.offset = offset
            states[txn.user_id] = state
            dirty.add(txn.user_id)
            rows.append(features)
            t = txn.event_time
            count_merchant_tx(view, t)
            inc = increments.setdefault(txn.merchant_id, {})
            for field in (f"h{hour_of(t)}", f"d{day_of(t)}"):
                inc[field] = inc.get(field, 0) + 1
            if t > newest.get(txn.merchant_id, -1.0):
                newest[txn.merchant_id] = t

        if dirty:
            try:
                async with client.pipeline(transaction=True) as pipe:
                    ttl = self._ttl
                    for user_id in dirty:
                        state = states[user_id]
                        assert state is not None
                        pipe.set(self.user_key(user_id), encode_state(state), ex=ttl)
                    for merchant_id, inc in increments.items():
                        key = self.merchant_counts_key(merchant_id)
                        for field, n in inc.items():
                            pipe.hincrby(key, field, n)
                        pipe.expire(key, ttl)
                        counts, frauds = raw_hashes[merchant_id]
                        t = newest[merchant_id]
                        stale = _stale_fields(counts, t, _STALE_COUNT_HOURS, _STALE_COUNT_DAYS)
                        if stale:
                            pipe.hdel(key, *stale)
                        stale = _stale_fields(frauds, t, _STALE_FRAUD_HOURS, _STALE_FRAUD_DAYS)
                        if stale:
                            pipe.hdel(self.merchant_frauds_key(merchant_id), *stale)
                    await pipe.execute()
            except _IO_ERRORS as exc:
                raise FeatureStoreUnavailable(f"redis write failed: {type(exc).__name__}: {exc}") from exc
        return np.array(rows, dtype=np.float32)

    def compute_degraded(self, txns: Sequence[Transaction]) -> np.ndarray:
        """Transaction-only features (Redis down): see ``definition.transaction_only_features``."""
        if not txns:
            return np.empty((0, N_FEATURES), dtype=np.float32)
        return np.array([transaction_only_features(t) for t in txns], dtype=np.float32)

    async def apply_labels(self, labels: Sequence[Label]) -> None:
        """Record fraud labels into the merchant buckets, in one pipeline; idempotent per
        ``transaction_id`` (the first label applied for a transaction wins)."""
        if not labels:
            return
        client = self._client()
        ttl = str(self._ttl)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for label in labels:
                    at = label.labeled_at
                    await self._apply_label(
                        keys=[self.label_key(label.transaction_id), self.merchant_frauds_key(label.merchant_id)],
                        args=[ttl, f"d{day_of(at)}", f"h{hour_of(at)}", "1" if label.is_fraud else "0"],
                        client=pipe,
                    )
                await pipe.execute()
        except _IO_ERRORS as exc:
            raise FeatureStoreUnavailable(f"redis label write failed: {type(exc).__name__}: {exc}") from exc

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
