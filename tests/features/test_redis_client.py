"""The feature store's Redis client packs commands with hiredis: the same bytes as redis-py."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from fraudactors.features.redis_client import PackedConnection, make_client
from fraudactors.settings import Settings

ARGS = [
    ("EVALSHA", "a" * 40, 3, "fa:u:{u1}:c-1", "fa:m:{m2}:m-7:c", "é-key", 604800, 2, -1, b"[1,2,[3]]", b"\x00\xff" * 4000),
    ("SET", b"k", 1.5, "EX", 10),
    ("SET", "k", -0.0),
    ("SCRIPT LOAD", "return 1"),  # a two-word name: split as redis-py does
    (b"CONFIG GET", b"maxmemory"),
]


@pytest.mark.parametrize("args", ARGS)
def test_packed_commands_are_the_bytes_redis_py_sends(args: tuple[object, ...]) -> None:
    ours = b"".join(PackedConnection().pack_command(*args))
    theirs = b"".join(aioredis.Connection().pack_command(*args))
    assert ours == theirs


async def test_the_store_client_uses_it_and_round_trips(settings: Settings) -> None:
    client = make_client(settings, 5.0)
    try:
        assert client.connection_pool.connection_class is PackedConnection
        await client.set("packed:é", b"\x00\xff" * 4000, ex=60)
        assert await client.get("packed:é") == b"\x00\xff" * 4000
        assert await client.eval("return {KEYS[1], ARGV[1], ARGV[2]}", 1, "packed:k", 7, b"v") == [
            b"packed:k", b"7", b"v"]
    finally:
        await client.aclose()
