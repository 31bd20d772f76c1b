"""An embedded Redis Cluster: N masters of the same valkey-server / redis-server on loopback.

Each node runs with ``cluster-enabled yes`` (no persistence; its ``nodes.conf`` lives in a private
temporary directory, so a stopped node restarts on the same port as the same node with the same
slots). The 16,384 slots are split evenly across the masters and the nodes are introduced to each
other (``CLUSTER MEET``) from Python; ready means every node reports ``cluster_state:ok`` and
knows every other. ``cluster-require-full-coverage no``: while a master is down, the others keep
serving their slots. For the demo (``fraudactors demo --redis-cluster N``) and the tests.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from fraudactors.errors import ServiceError
from fraudactors.services.binaries import resolve_redis
from fraudactors.services.process import free_port
from fraudactors.services.redis import EmbeddedRedis

SLOTS = 16384


class EmbeddedRedisNode(EmbeddedRedis):
    name = "redis-node"

    def __init__(self, directory: Path, binary: str | None = None, *, node_timeout_ms: int = 2000) -> None:
        super().__init__(binary, stop_grace_s=2.0)
        self._dir = directory
        self._node_timeout_ms = node_timeout_ms
        # The cluster bus port is chosen, not left to the default port + 10000 (which may be taken,
        # or past 65535 for a high free port); a restart keeps it.
        self.bus_port = free_port(self.host)

    def working_dir(self) -> Path:
        return self._dir  # the cluster's own, kept across a node's restart (its nodes-<port>.conf)

    def argv(self, port: int) -> Sequence[str]:
        return [*super().argv(port), "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self._node_timeout_ms),
                "--cluster-require-full-coverage", "no",
                # a replica (add_replica) syncs at once, not after the default 5 s wait for others
                "--repl-diskless-sync-delay", "0"]


class EmbeddedRedisCluster:
    """``masters`` cluster nodes; ``url`` names the first (clients discover the rest)."""

    def __init__(self, masters: int = 3, binary: str | None = None, *, start_timeout_s: float = 30.0) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.masters = masters
        self._binary = binary or resolve_redis()
        self._start_timeout_s = start_timeout_s
        self._tmp: Path | None = None
        self.nodes: list[EmbeddedRedisNode] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[str]:
        return [f"{node.host}:{node.port}" for node in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes if node.pid is not None]

    def slot_range(self, index: int) -> tuple[int, int]:
        """The slots master ``index`` was given: ``[first, last]``."""
        return index * SLOTS // self.masters, (index + 1) * SLOTS // self.masters - 1

    def _new_nodes(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="fraudactors-cluster-"))
        for i in range(self.masters):
            directory = self._tmp / f"node{i}"
            directory.mkdir()
            self.nodes.append(EmbeddedRedisNode(directory, self._binary))

    async def start(self) -> Self:
        self._new_nodes()
        try:
            for node in self.nodes:
                await node.start()
            await self._form()
        except BaseException:
            await self.stop()
            raise
        return self

    def start_sync(self) -> Self:
        """From synchronous code with no event loop running (the nodes die with the thread that
        started them, so a fixture starts them on its own thread)."""
        self._new_nodes()
        try:
            for node in self.nodes:
                node.start_sync()
            asyncio.run(self._form())
        except BaseException:
            self.stop_sync()
            raise
        return self

    def stop_sync(self) -> None:
        for node in reversed(self.nodes):
            node.stop_sync()
        self.nodes.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def _form(self) -> None:
        first = self.nodes[0]
        for i, node in enumerate(self.nodes):
            low, high = self.slot_range(i)
            await self._command(node, "CLUSTER", "ADDSLOTSRANGE", low, high)
        for node in self.nodes[1:]:
            await self._command(first, "CLUSTER", "MEET", node.host, node.port, node.bus_port)
        await self.wait_ok()

    async def wait_ok(self, timeout_s: float | None = None) -> None:
        """Until every running node says ``cluster_state:ok`` and knows all the others."""
        try:
            async with asyncio.timeout(timeout_s or self._start_timeout_s):
                while True:
                    ok = True
                    for node in self.nodes:
                        if not node.running:
                            continue
                        info = (await self._command(node, "CLUSTER", "INFO")).decode()
                        fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
                        if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) \
                                < self.masters:
                            ok = False
                            break
                    if ok:
                        return
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise ServiceError("the embedded Redis cluster did not reach cluster_state:ok") from None

    async def stop(self) -> None:
        for node in reversed(self.nodes):
            await node.stop()
        self.nodes.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def add_node(self) -> EmbeddedRedisNode:
        """A node without slots joins the cluster (a master to migrate slots to, or to make a
        replica of); it is ``nodes[-1]``. Returns once every running node knows it and says
        ``cluster_state:ok``."""
        assert self._tmp is not None, "start the cluster first"
        directory = self._tmp / f"node{len(self.nodes)}"
        directory.mkdir()
        node = EmbeddedRedisNode(directory, self._binary)
        await node.start()
        self.nodes.append(node)
        try:
            await self._command(self.nodes[0], "CLUSTER", "MEET", node.host, node.port, node.bus_port)
            async with asyncio.timeout(self._start_timeout_s):
                while True:
                    if await self._knows_everyone():
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise ServiceError("the embedded Redis cluster did not take in its new node") from None
        return node

    async def _knows_everyone(self) -> bool:
        for node in self.nodes:
            if node.running:
                info = (await self._command(node, "CLUSTER", "INFO")).decode()
                fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
                if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) < len(self.nodes):
                    return False
        return True

    async def add_replica(self, master: int) -> EmbeddedRedisNode:
        """A new node replicating master ``master``; returns once it holds the master's data (its
        link is up), so stopping the master then makes it fail over: ``cluster-node-timeout`` later
        the replica is the slots' master."""
        node = await self.add_node()
        await self._command(node, "CLUSTER", "REPLICATE", await self.node_id(self.nodes[master]))
        try:
            async with asyncio.timeout(self._start_timeout_s):
                while True:
                    if (await self._command(node, "INFO", "replication")).get("master_link_status") == "up":
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise ServiceError("the embedded Redis replica did not sync with its master") from None
        return node

    async def node_id(self, node: EmbeddedRedisNode) -> str:
        return (await self._command(node, "CLUSTER", "MYID")).decode()

    async def migrate_slot(self, slot: int, source: int, target: int, *, keys_per_step: int = 10,
                           pause: float = 0.0) -> int:
        """Move ``slot`` from master ``source`` to master ``target`` the way ``redis-cli --cluster
        reshard`` does (IMPORTING / MIGRATING, MIGRATE in steps, SETSLOT NODE on every node), while
        clients keep running: they meet ASK during the move and MOVED after. Returns keys moved."""
        src, dst = self.nodes[source], self.nodes[target]
        src_id, dst_id = await self.node_id(src), await self.node_id(dst)
        await self._command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        await self._command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while True:
            keys = await self._command(src, "CLUSTER", "GETKEYSINSLOT", slot, keys_per_step)
            if not keys:
                break
            await self._command(src, "MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            if pause:
                await asyncio.sleep(pause)
        for node in self.nodes:
            await self._command(node, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    @staticmethod
    async def _command(node: EmbeddedRedisNode, *args: Any) -> Any:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(node.url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            return await client.execute_command(*args)
        finally:
            await client.aclose()
