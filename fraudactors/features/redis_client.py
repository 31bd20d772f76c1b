"""Redis clients from settings: one instance, or a Redis Cluster (``redis.cluster``).

Every component that talks to the online state builds its client here, so a deployment switches
between a single Redis and a cluster with one setting. On a cluster the client discovers the
nodes from ``redis.url`` (and ``redis.cluster_nodes`` if that one is down), follows ``MOVED`` and
``ASK`` redirections itself, and keeps serving the slots of the masters that answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from hiredis import pack_command as _hiredis_pack
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fraudactors.settings import Settings

Client = aioredis.Redis | RedisCluster
# What a Redis client raises for a failed call. The cluster client raises RedisClusterException,
# which is not a RedisError, when it cannot reach any node ("Redis Cluster cannot be connected"):
# an outage like any other, never a reason for an actor to crash.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException)

class PackedConnection(aioredis.Connection):
    """redis-py's asyncio connection with each command packed by hiredis (C). redis-py packs in
    Python, joining its buffer once per argument: a script call with ~600 keys took ~1.2 ms to pack
    (hiredis: ~0.18 ms, the same bytes), 5 % of the engine's CPU in ``bench drain``."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if b" " in first if isinstance(first, bytes) else " " in str(first):
            return super().pack_command(*args)  # "SCRIPT LOAD"-style names are split by redis-py
        try:
            return [_hiredis_pack(args)]
        except (TypeError, UnicodeError):
            return super().pack_command(*args)  # raises as redis-py does


def _connection(url: str) -> dict[str, Any]:
    """``connection_class`` for a plain TCP url (TLS and unix sockets keep redis-py's own)."""
    return {"connection_class": PackedConnection} if urlsplit(url).scheme == "redis" else {}


def make_client(settings: Settings, timeout_s: float, *, retry: bool = False,
                max_connections: int | None = None) -> Any:
    """A client with ``timeout_s`` for connects and replies; ``retry=False``: never re-send by itself
    (a write whose reply was lost may have been applied: the caller decides). Its pool holds
    ``max_connections`` (default ``redis.max_connections``) at most, per node on a cluster: one
    call more is refused at once (``MaxConnectionsError``), so a caller that can have more calls in
    flight bounds them itself."""
    cfg = settings.redis
    common: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                              "max_connections": max_connections or cfg.max_connections}
    if not retry:
        common["retry"] = Retry(NoBackoff(), 0)
    if not cfg.cluster:
        return aioredis.Redis.from_url(cfg.url, decode_responses=False, health_check_interval=0, **common,
                                       **_connection(cfg.url))
    nodes = []
    for node in cfg.cluster_nodes:
        host, _, port = node.rpartition(":")
        nodes.append(ClusterNode(host, int(port)))
    return RedisCluster.from_url(cfg.url, startup_nodes=nodes or None, require_full_coverage=False,
                                 decode_responses=False, **common)


async def ping(client: Any) -> bool:
    """PING one Redis, or every master of a cluster: a cluster with one master hung or gone is not
    up for the feature store (nearly every batch touches its slots), though the others answer.

    One Redis must also be a master: a former master demoted to a replica (a failover the address
    has not followed yet) answers PING but refuses every write (READONLY), so the store would go
    up and down again with every batch. Where ROLE is not allowed (a managed service may rename
    it), PING decides."""
    if isinstance(client, RedisCluster):
        return bool(await client.ping(target_nodes=RedisCluster.PRIMARIES))
    if not await client.ping():
        return False
    try:
        role = await client.execute_command("ROLE")
    except ResponseError:
        return True
    first = role[0] if isinstance(role, list | tuple) and role else role
    return first in (b"master", "master")


def _redirected(reply: Exception) -> bool:
    """A slot moving: MOVED, ASK or TRYAGAIN. redis-py 5 gives a plain (non-cluster) client these as
    a bare ResponseError (checked with 5.0.8), so the reply's text is read too."""
    if isinstance(reply, MovedError | AskError | TryAgainError):
        return True
    return isinstance(reply, ResponseError) and str(reply).startswith(("MOVED ", "ASK ", "TRYAGAIN"))


class ScriptRunner:
    """Runs Lua scripts by name, one call per hash-slot group, in one round trip per node.

    On one instance the caller merges its groups into a single call (a script may touch keys of
    any slot there). On a cluster every call's keys share a slot: the calls are grouped by the
    master that owns the slot and each group goes out as one pipeline on a connection to that
    master (redis-py's cluster pipeline refuses EVALSHA), all masters at once. A call answered
    with MOVED, ASK or TRYAGAIN (a slot moving) is sent again through the cluster client, which
    follows the redirection and refreshes its slot map; a script missing on a node (a restart, or
    a master added after the scripts were loaded) is loaded on every node and the call sent
    again. Replies come back in call order.

    A node that cannot be reached fails the whole run (the caller's outage path), and the cluster
    client is told -- a PING to that node through it, which on failure asks for a fresh slot map
    (redis-py 5 closes and rebuilds the whole cluster client instead) -- so that once a replica has
    taken over the dead master's slots, the next run goes to it. The node connections are this
    runner's own, so the cluster client would otherwise never learn of the failure and keep routing
    to the dead master for good. A refused connection is told before the error goes up (its PING
    fails at once); a node that timed out hangs, and its PING would wait out a second socket
    timeout before the caller heard of the outage, so it goes out in the background instead (one
    at a time per node, cancelled by :meth:`close`): the slot map is asked for when it times out,
    as before, and the caller's error comes one timeout sooner.
    """

    def __init__(self, client: Any, cluster: bool, scripts: dict[str, str], settings: Settings | None = None,
                 timeout_s: float = 1.0, max_connections: int | None = None) -> None:
        import hashlib

        self._client = client
        self._max_connections = max_connections or (settings.redis.max_connections if settings else None)
        self.cluster = cluster
        self._settings = settings
        self._timeout_s = timeout_s
        self._texts = scripts
        self._shas = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in scripts.items()}
        self._registered = {name: client.register_script(text) for name, text in scripts.items()} \
            if not cluster else {}
        self._nodes: dict[str, Any] = {}  # node name -> a plain client to that node
        self._pings: dict[str, asyncio.Task[None]] = {}  # node name -> its PING in the background

    async def load(self) -> None:
        for text in self._texts.values():
            if self.cluster:
                await self._client.execute_command("SCRIPT LOAD", text, target_nodes=RedisCluster.ALL_NODES)
            else:
                await self._client.script_load(text)

    async def close(self) -> None:
        pings, self._pings = list(self._pings.values()), {}
        for task in pings:
            task.cancel()
        await asyncio.gather(*pings, return_exceptions=True)
        nodes, self._nodes = self._nodes, {}
        for client in nodes.values():
            await client.aclose()

    async def run(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        if not self.cluster:
            script = self._registered[name]
            return [await script(keys=keys, args=args) for keys, args in calls]
        sha = self._shas[name]
        await self._client.initialize()  # the slot map (a no-op once known)
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, (keys, _) in enumerate(calls):
            node = self._client.get_node_from_key(keys[0])
            groups.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(calls)

        async def send(node: Any, indexes: list[int]) -> None:
            pipe = self._node_client(node).pipeline(transaction=False)
            for i in indexes:
                keys, args = calls[i]
                pipe.evalsha(sha, len(keys), *keys, *args)
            try:
                results = await pipe.execute(raise_on_error=False)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                await self._node_failed(node, hung=isinstance(exc, RedisTimeoutError | TimeoutError))
                raise
            for i, reply in zip(indexes, results, strict=True):
                replies[i] = reply

        await asyncio.gather(*(send(node, indexes) for node, indexes in groups.values()))
        loaded = False
        for i, reply in enumerate(replies):
            if not isinstance(reply, Exception):
                continue
            if isinstance(reply, NoScriptError) and not loaded:
                await self.load()
                loaded = True
            elif not isinstance(reply, NoScriptError) and not _redirected(reply):
                raise reply
            keys, args = calls[i]
            try:
                replies[i] = await self._client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # redirected to a node that joined after the scripts were loaded
                await self.load()
                replies[i] = await self._client.evalsha(sha, len(keys), *keys, *args)
        return replies

    async def _node_failed(self, node: Any, *, hung: bool) -> None:
        """Tell the cluster client that ``node`` failed (see the class docstring)."""
        stale = self._nodes.pop(node.name, None)
        if stale is not None:
            await stale.aclose()
        if not hung:
            await self._ping(node)
        elif node.name not in self._pings:
            task = self._pings[node.name] = asyncio.create_task(self._ping(node))
            task.add_done_callback(lambda done: self._pings.pop(node.name) if self._pings.get(node.name) is done
                                   else None)

    async def _ping(self, node: Any) -> None:
        with contextlib.suppress(*CLIENT_ERRORS, OSError):
            await self._client.execute_command("PING", target_nodes=node)

    def _node_client(self, node: Any) -> Any:
        client = self._nodes.get(node.name)
        if client is None:
            assert self._settings is not None
            url = urlsplit(self._settings.redis.url)
            netloc = url.netloc.rsplit("@", 1)[0] + "@" if "@" in url.netloc else ""
            address = urlunsplit((url.scheme, f"{netloc}{node.host}:{node.port}", "", "", ""))
            client = self._nodes[node.name] = aioredis.Redis.from_url(
                address, socket_timeout=self._timeout_s, socket_connect_timeout=self._timeout_s,
                retry=Retry(NoBackoff(), 0), decode_responses=False, health_check_interval=0,
                max_connections=self._max_connections, **_connection(address))
        return client
