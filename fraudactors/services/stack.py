"""Broker and Redis together, for ``fraudactors demo`` and the tests."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

from fraudactors.services.binaries import resolve_redis, resolve_tansu
from fraudactors.services.broker import EmbeddedBroker
from fraudactors.services.redis import EmbeddedRedis
from fraudactors.services.redis_cluster import EmbeddedRedisCluster
from fraudactors.settings import Settings


class EmbeddedStack:
    """Starts both services concurrently; stops both, whatever happened.

    ``stack.settings`` is the given settings pointed at the embedded services, with
    ``enable_idempotence`` off (Tansu rejects InitProducerId).
    """

    def __init__(self, settings: Settings, *, redis_cluster: int = 0) -> None:
        timeout = settings.services.start_timeout_s
        # Resolve both binaries before starting anything: a missing one fails fast, naming the setting.
        self.broker = EmbeddedBroker(resolve_tansu(settings.services.tansu_bin), start_timeout_s=timeout)
        self.redis: EmbeddedRedis | EmbeddedRedisCluster
        if redis_cluster:
            self.redis = EmbeddedRedisCluster(redis_cluster, resolve_redis(settings.services.redis_bin),
                                              start_timeout_s=timeout)
        else:
            self.redis = EmbeddedRedis(resolve_redis(settings.services.redis_bin), start_timeout_s=timeout)
        self._base = settings
        self.settings = settings

    @property
    def pids(self) -> dict[str, int | None]:
        if isinstance(self.redis, EmbeddedRedisCluster):
            return {"broker": self.broker.pid, **{f"redis-{i}": pid for i, pid in enumerate(self.redis.pids)}}
        return {"broker": self.broker.pid, "redis": self.redis.pid}

    def describe_redis(self) -> str:
        if isinstance(self.redis, EmbeddedRedisCluster):
            return f"{self.redis.masters}-master cluster, pids {self.redis.pids}, {', '.join(self.redis.startup_nodes)}"
        return f"pid {self.redis.pid} on {self.redis.url}"

    async def start(self) -> Self:
        try:
            results = await asyncio.gather(self.broker.start(), self.redis.start(), return_exceptions=True)
        except BaseException:  # cancelled while starting: one may already be up
            await self.stop()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]
        self.settings = self._base.replace(
            kafka={"bootstrap_servers": self.broker.bootstrap_servers, "enable_idempotence": False},
            redis=({"url": self.redis.url, "cluster": True, "cluster_nodes": self.redis.startup_nodes}
                   if isinstance(self.redis, EmbeddedRedisCluster) else {"url": self.redis.url}),
        )
        return self

    async def stop(self) -> None:
        # Shielded so an interrupted caller still reaps both children.
        await asyncio.shield(asyncio.gather(self.broker.stop(), self.redis.stop()))

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
