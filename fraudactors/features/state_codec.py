"""Compact binary encoding of :class:`UserState` for Redis (the online state blob).

Layout (little-endian): a fixed header ``<BBbiIqH`` = format version, flags (bit 0: seen abroad),
last ``is_international`` (-1 none, 0, 1), last applied partition, the writer's fencing epoch,
last applied offset, number of events ``n``; then ``n`` float64 event times, ``n`` float64 amounts (exact round trip, so the
online features equal the offline ones bit for bit); then ``[merchants, categories]`` as JSON,
each in LRU order.

The write script (``scripts.WRITE_BATCH``) reads the partition and epoch of a stored blob with
Lua's ``struct.unpack('<BBbi4I4i8H', blob)``: keep the two in step. Version 1 blobs (no epoch)
are still read, as epoch 0.
"""

from __future__ import annotations

import struct
import sys
from array import array

import orjson

from fraudactors.features.definition import UserState

VERSION = 2
_HEADER = struct.Struct("<BBbiIqH")
_HEADER_V1 = struct.Struct("<BBbiqH")
_LITTLE = sys.byteorder == "little"


class StateDecodeError(ValueError):
    """A stored blob that is not a state this version can read."""


def encode_state(state: UserState) -> bytes:
    times = array("d", state.times)
    amounts = array("d", state.amounts)
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        times.byteswap()
        amounts.byteswap()
    last = -1 if state.last_international is None else int(state.last_international)
    header = _HEADER.pack(VERSION, 1 if state.seen_international else 0, last,
                          state.partition, state.epoch, state.offset, len(times))
    tail = orjson.dumps([list(state.merchants), list(state.categories)])
    return b"".join((header, times.tobytes(), amounts.tobytes(), tail))


def decode_state(blob: bytes) -> UserState:
    try:
        if blob[:1] == b"\x01":
            version, flags, last, partition, offset, n = _HEADER_V1.unpack_from(blob)
            epoch, start = 0, _HEADER_V1.size
        else:
            version, flags, last, partition, epoch, offset, n = _HEADER.unpack_from(blob)
            start = _HEADER.size
    except struct.error:
        raise StateDecodeError("truncated header") from None
    if version != VERSION and version != 1:
        raise StateDecodeError(f"unknown state version {version}")
    mid = start + 8 * n
    end = mid + 8 * n
    if len(blob) < end:
        raise StateDecodeError("truncated events")
    view = memoryview(blob)
    times = array("d")
    times.frombytes(view[start:mid])
    amounts = array("d")
    amounts.frombytes(view[mid:end])
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        times.byteswap()
        amounts.byteswap()
    try:
        merchants, categories = orjson.loads(view[end:])
    except (orjson.JSONDecodeError, ValueError, TypeError):
        raise StateDecodeError("bad seen-sets") from None
    return UserState(
        times=times.tolist(),
        amounts=amounts.tolist(),
        merchants=dict.fromkeys(merchants),
        categories=dict.fromkeys(categories),
        seen_international=bool(flags & 1),
        last_international=None if last < 0 else bool(last),
        partition=partition,
        offset=offset,
        epoch=epoch,
    )
