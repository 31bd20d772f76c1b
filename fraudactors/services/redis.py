"""The embedded Redis-protocol server: valkey-server (or redis-server), no persistence, loopback."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fraudactors.services.binaries import resolve_redis
from fraudactors.services.embedded import EmbeddedService


class EmbeddedRedis(EmbeddedService):
    name = "redis"

    def __init__(self, binary: str | None = None, *, port: int | None = None, start_timeout_s: float = 30.0,
                 stop_grace_s: float = 5.0) -> None:
        super().__init__(binary or resolve_redis(), port=port, start_timeout_s=start_timeout_s,
                         stop_grace_s=stop_grace_s)
        self._data_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def argv(self, port: int) -> Sequence[str]:
        return [self.binary, "--port", str(port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning",
                "--dir", str(self.working_dir())]

    def working_dir(self) -> Path:
        """A directory of its own for every start, removed at the stop: a server made a replica (a
        failover test) saves the data it syncs, and any server loads a dump.rdb it finds there at
        start -- never in the caller's directory, never from an earlier run."""
        self._remove_data_dir()
        self._data_dir = Path(tempfile.mkdtemp(prefix="fraudactors-redis-"))
        return self._data_dir

    async def stop(self) -> None:
        await super().stop()
        self._remove_data_dir()

    def stop_sync(self) -> None:
        super().stop_sync()
        self._remove_data_dir()

    def _remove_data_dir(self) -> None:
        data_dir, self._data_dir = self._data_dir, None
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)

    async def check(self, budget_s: float) -> None:
        """A real PING."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url, socket_timeout=budget_s, socket_connect_timeout=budget_s)
        try:
            if not await client.ping():
                raise RuntimeError("PING did not return PONG")
        finally:
            await client.aclose()
