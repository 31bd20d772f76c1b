"""The Redis key layout of the online state, designed for one instance and for a Redis Cluster.

Every key carries a hash tag (``{...}``) naming the unit that one script must touch atomically,
so the same keys work on a single Redis and on a cluster (where a script may only touch keys of
one hash slot):

| key | holds | tag |
|---|---|---|
| ``<prefix>{u<shard>}:<user_id>`` | the user's state blob (``state_codec``) | user shard |
| ``<prefix>{u<shard>}:o:<user_id>`` | what each variant said about the user's last decisions, and their merchants | user shard |
| ``<prefix>{u<shard>}:lp:<user_id>`` | hash: the merchant each of the user's labelled transactions counts at, pruned by ``labeled_at`` | user shard |
| ``<prefix>{u<shard>}:rl:<partition>`` | replay log: feature vectors of the shard's records not yet committed | user shard |
| ``<prefix>{p<partition>}:ep`` | the partition's fencing epoch (raised on every claim: ``scripts.CLAIM``) | partition |
| ``<prefix>{m<shard>}:c:<merchant_id>`` | merchant transaction counts by event hour/day (also new customers'), one packed string of appended entries (``scripts.COUNTS_CODEC``) | merchant shard |
| ``<prefix>{m<shard>}:o:<merchant_id>`` | hash: per partition, the highest offset counted in the merchant's counts | merchant shard |
| ``<prefix>{m<shard>}:f:<merchant_id>`` | merchant fraud-label counts by ``labeled_at`` hour/day | merchant shard |
| ``<prefix>{m<shard>}:lb:<merchant_id>`` | hash: the label standing for each of the merchant's transactions (``l<transaction_id>``), pruned by ``labeled_at`` | merchant shard |

A shard is ``crc32(id) % STATE_SHARDS`` of the user or merchant: it depends on the entity alone
(not on the Kafka partition), so repartitioning the topic keeps every history, and
``POST /predict`` and the label consumer find a user's state without knowing partitions. What a
write must change atomically -- a user's blob and its replay-log entry, a merchant's counts --
shares a shard's slot, so on a cluster one batch is at most ``2 * STATE_SHARDS`` script calls,
sent as one pipeline per node. ``STATE_SHARDS`` is part of the layout: changing it orphans the
state.

Nothing is keyed by decision: memory grows with users, merchants, labels and the uncommitted
records of each partition, never with the number of decisions.
"""

from __future__ import annotations

import zlib

STATE_SHARDS = 64


def shard(entity_id: str) -> int:
    return zlib.crc32(entity_id.encode("utf-8")) % STATE_SHARDS


user_shard = shard


class KeyLayout:
    """Key names under one prefix (``redis.key_prefix``)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("redis.key_prefix must not contain '{' or '}' (they are hash tags)")
        self.prefix = prefix

    def user(self, user_id: str) -> str:
        return f"{self.prefix}{{u{shard(user_id)}}}:{user_id}"

    def outcomes(self, user_id: str) -> str:
        return f"{self.prefix}{{u{shard(user_id)}}}:o:{user_id}"

    def placements(self, user_id: str) -> str:
        return f"{self.prefix}{{u{shard(user_id)}}}:lp:{user_id}"

    def replay_log(self, user_shard: int, partition: int) -> str:
        return f"{self.prefix}{{u{user_shard}}}:rl:{partition}"

    def epoch(self, partition: int) -> str:
        return f"{self.prefix}{{p{partition}}}:ep"

    def merchant_counts(self, merchant_id: str) -> str:
        return f"{self.prefix}{{m{shard(merchant_id)}}}:c:{merchant_id}"

    def merchant_frauds(self, merchant_id: str) -> str:
        return f"{self.prefix}{{m{shard(merchant_id)}}}:f:{merchant_id}"

    def merchant_offsets(self, merchant_id: str) -> str:
        return f"{self.prefix}{{m{shard(merchant_id)}}}:o:{merchant_id}"

    def merchant_pair(self, merchant_id: str) -> tuple[str, str]:
        """(counts, frauds): the two keys a batch reads and writes per merchant."""
        return self.merchant_counts(merchant_id), self.merchant_frauds(merchant_id)

    def label_marks(self, merchant_id: str) -> str:
        return f"{self.prefix}{{m{shard(merchant_id)}}}:lb:{merchant_id}"

    @staticmethod
    def user_tag(user_id: str) -> str:
        return f"u{shard(user_id)}"

    @staticmethod
    def merchant_tag(merchant_id: str) -> str:
        return f"m{shard(merchant_id)}"
