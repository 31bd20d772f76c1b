"""Redis clients from settings: one instance, or a Redis Cluster (``redis.cluster``).

Every component that talks to the online state builds its client here, so a deployment switches
between a single Redis and a cluster with one setting. On a cluster the client discovers the
nodes from ``redis.url`` (and ``redis.cluster_nodes`` if that one is down), follows ``MOVED`` and
``ASK`` redirections itself, and keeps serving the slots of the masters that answer.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fraudactors.settings import Settings

Client = aioredis.Redis | RedisCluster


def make_client(settings: Settings, timeout_s: float, *, retry: bool = False) -> Any:
    """A client with ``timeout_s`` for connects and replies; ``retry=False``: never re-send by itself
    (a write whose reply was lost may have been applied: the caller decides)."""
    cfg = settings.redis
    common: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if not retry:
        common["retry"] = Retry(NoBackoff(), 0)
    if not cfg.cluster:
        return aioredis.Redis.from_url(cfg.url, decode_responses=False, health_check_interval=0, **common)
    nodes = []
    for node in cfg.cluster_nodes:
        host, _, port = node.rpartition(":")
        nodes.append(ClusterNode(host, int(port)))
    return RedisCluster.from_url(cfg.url, startup_nodes=nodes or None, require_full_coverage=False,
                                 decode_responses=False, **common)


class ScriptRunner:
    """Runs Lua scripts by name: one call per hash-slot group, all groups in one round trip per node.

    On one instance the groups are merged by the caller into a single call (a script may touch
    keys of any slot there); on a cluster each call's keys share a slot, and the calls go out as a
    pipeline, one round trip per node. Replies come back in call order; a script missing on a
    node (a new node, a restart) is loaded on every node and the calls sent once more.
    """

    def __init__(self, client: Any, cluster: bool, scripts: dict[str, str]) -> None:
        import hashlib

        self._client = client
        self.cluster = cluster
        self._texts = scripts
        self._shas = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in scripts.items()}
        self._registered = {name: client.register_script(text) for name, text in scripts.items()} \
            if not cluster else {}

    async def load(self) -> None:
        for text in self._texts.values():
            if self.cluster:
                await self._client.execute_command("SCRIPT LOAD", text, target_nodes=RedisCluster.ALL_NODES)
            else:
                await self._client.script_load(text)

    async def run(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        if not self.cluster:
            script = self._registered[name]
            return [await script(keys=keys, args=args) for keys, args in calls]
        from redis.exceptions import NoScriptError

        for attempt in (0, 1):
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(self._shas[name], len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
            failed = [r for r in replies if isinstance(r, Exception)]
            if not failed:
                return list(replies)
            if attempt == 0 and any(isinstance(r, NoScriptError) or "NOSCRIPT" in str(r) for r in failed):
                await self.load()
                continue
            raise failed[0]
        raise AssertionError("unreachable")  # pragma: no cover
