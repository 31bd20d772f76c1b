"""The Redis key layout of the online state, designed for one instance and for a Redis Cluster.

Every key carries a hash tag (``{...}``) naming the unit that one script must touch atomically,
so the same keys work on a single Redis and on a cluster (where a script may only touch keys of
one hash slot):

| key | holds | tag |
|---|---|---|
| ``<prefix>{u<shard>}:<user_id>`` | the user's state blob (``state_codec``) | user shard |
| ``<prefix>{u<shard>}:o:<user_id>`` | what each variant said about the user's last decisions | user shard |
| ``<prefix>{p<partition>}:ep`` | the partition's fencing epoch (``INCR`` on every claim) | partition |
| ``<prefix>{p<partition>}:rl`` | replay log: the feature vectors of records not yet committed | partition |
| ``<prefix>{m:<merchant_id>}:c`` | merchant transaction counts by event hour/day + per-partition high-water offsets | merchant |
| ``<prefix>{m:<merchant_id>}:f`` | merchant fraud-label counts by ``labeled_at`` hour/day | merchant |
| ``<prefix>{m:<merchant_id>}:lb`` | hash: the label standing for each of the merchant's transactions (``l<transaction_id>``), pruned by ``labeled_at`` | merchant |

A user's shard is ``crc32(user_id) % STATE_SHARDS``: it depends on the user alone (not on the
Kafka partition), so repartitioning the topic keeps every user's history, and
``POST /predict`` and the label consumer find a user's state without knowing partitions.
``STATE_SHARDS`` is part of the layout: changing it orphans the state.

Nothing is keyed by decision: memory grows with users, merchants, labels and the uncommitted
records of each partition, never with the number of decisions.
"""

from __future__ import annotations

import zlib

STATE_SHARDS = 64


def user_shard(user_id: str) -> int:
    return zlib.crc32(user_id.encode("utf-8")) % STATE_SHARDS


class KeyLayout:
    """Key names under one prefix (``redis.key_prefix``)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("redis.key_prefix must not contain '{' or '}' (they are hash tags)")
        self.prefix = prefix

    def user(self, user_id: str) -> str:
        return f"{self.prefix}{{u{user_shard(user_id)}}}:{user_id}"

    def outcomes(self, user_id: str) -> str:
        return f"{self.prefix}{{u{user_shard(user_id)}}}:o:{user_id}"

    def epoch(self, partition: int) -> str:
        return f"{self.prefix}{{p{partition}}}:ep"

    def replay_log(self, partition: int) -> str:
        return f"{self.prefix}{{p{partition}}}:rl"

    def merchant_counts(self, merchant_id: str) -> str:
        return f"{self.prefix}{{m:{merchant_id}}}:c"

    def merchant_frauds(self, merchant_id: str) -> str:
        return f"{self.prefix}{{m:{merchant_id}}}:f"

    def label_marks(self, merchant_id: str) -> str:
        return f"{self.prefix}{{m:{merchant_id}}}:lb"
