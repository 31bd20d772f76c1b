"""``fraudactors run`` with a password in the Redis URL and a /predict token: both work, and
neither appears in anything the process writes."""

from __future__ import annotations

import asyncio
import signal

import orjson
import redis.asyncio as aioredis
from engine_helpers import EngineProcess, engine_env

from fraudactors.settings import Settings

PASSWORD = "planted-redis-pw-7c1e"
TOKEN = "planted-predict-token-91d0"


async def _predict(port: int, authorization: str | None) -> int:
    body = orjson.dumps({"transaction_id": "s-1", "user_id": "u-1", "amount": 10.0,
                         "timestamp": "2026-11-28T21:00:00+00:00"})
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /predict HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        status_line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    return int(status_line.split()[1])


async def test_run_logs_neither_the_redis_password_nor_the_predict_token(engine_settings: Settings,
                                                                        fresh_redis: object) -> None:
    url: str = fresh_redis.url  # type: ignore[attr-defined]
    client = aioredis.from_url(url)
    try:
        await client.config_set("requirepass", PASSWORD)
    finally:
        await client.aclose()
    secret_url = url.replace("redis://", f"redis://:{PASSWORD}@")
    proc = EngineProcess(engine_env(engine_settings, FRAUDACTORS_REDIS__URL=secret_url,
                                    FRAUDACTORS_HTTP__PREDICT_TOKEN=TOKEN))
    await proc.start()
    try:
        port = (await proc.wait_event("engine_ready", timeout_s=60))["port"]  # Redis answered: the password works
        assert PASSWORD not in repr(proc.lines), "the start-up log shows the Redis password"
        assert await _predict(port, None) == 401
        assert await _predict(port, f"Bearer {TOKEN}") == 200
        await proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout_s=30) == 0
    finally:
        await proc.kill()
    starting = proc.events("engine_starting")
    assert starting and starting[0]["settings"]["redis"]["url"] == url.replace("redis://", "redis://:***@")
    assert starting[0]["settings"]["http"]["predict_token"] == "***"
    everything = repr(proc.lines)
    assert PASSWORD not in everything
    assert TOKEN not in everything
