"""The A/B ledger: what each model decided and what the delayed labels said, by event-time bucket.

Every decision adds to the bucket of its transaction's event time, under its *member*: the role,
variant and model that scored it (``d:A/v1`` decided, ``s:C/v3`` scored as a shadow, ``d:A/v1-fallback``
decided degraded). A label adds, later, to the bucket of the decision it confirms. Fields of a
bucket hash:

| field | counts |
|---|---|
| ``n`` / ``f`` | decisions / flagged (``is_fraud``) |
| ``h0`` .. ``h19`` | the score histogram, 20 bins of width 0.05 |
| ``tp`` / ``fn`` | labelled frauds flagged / missed |
| ``fp`` / ``tn`` | labelled legitimate transactions flagged / not flagged |
| ``p:<member>`` | labelled frauds the other member scored too (pairs) |
| ``x:<member>`` | ... of which this member flagged and the other missed (McNemar's discordant pairs) |
| ``gc<k>`` / ``gm<k>`` | labelled frauds flagged / missed, of cards in group ``k`` |
| ``gx<k>:<member>`` | discordant pairs (``x:``) of cards in group ``k`` |

The card groups (``CARD_GROUPS`` of them, ``card_group``: a stable hash of the ``user_id``) let the
report's tests treat a card's frauds as one cluster: a stolen card's spree is several frauds that a
model tends to catch or miss together, not independent trials (``fraudactors.ab.stats``).

Keys (all under the ``{ab}`` hash tag: one slot, one script call per flush, also on a cluster):

| key | holds |
|---|---|
| ``<prefix>{ab}:i`` | sorted set: ``<bucket>:<member>`` scored by bucket |
| ``<prefix>{ab}:t`` | the newest event time recorded (the ledger's clock) |
| ``<prefix>{ab}:b:<bucket>:<member>`` | one bucket of one member (hash above) |
| ``<prefix>{ab}:w:<writer>`` | the number of the newest payload applied from one engine process |

Memory is bounded by time and models, never by decisions: buckets older than ``ab.window_s``
before the newest event time are deleted by the same script that adds (event time: a backfill of
last year keeps a window of last year). A flipped label takes its earlier verdict back out.

A flush is applied once however often it is sent: each process (writer) numbers its payloads and
sends them one at a time, a failed one again as it was (its reply may have been lost after Redis
applied it), and the script skips a payload whose number it has applied. The counts are evidence,
not the books: a record replayed after a crash counts its decision again, and increments buffered
in a replica are lost if it is killed within a flush interval (0.2 s).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from fraudactors.features.scripts import CHECK_TYPES

HIST_BINS = 20
# Labelled frauds are also counted per group of cards (see the module docstring): enough groups
# for a variance with 63 degrees of freedom, few enough to keep a bucket's hash small.
CARD_GROUPS = 64

# KEYS: index (zset), clock (string), then one bucket hash per entry, then (with a payload number)
# the writer's key (string). ARGV: bucket_s, buckets to keep, the newest event time of this call
# ("" if none), the bucket key base ("<prefix>{ab}:b:"), a JSON array of [bucket, member, [field,
# increment, ...]] aligned with KEYS[3..], the keys' TTL in seconds, and optionally the payload's
# number (ARGV[7]). Adds what is inside the kept window, drops the rest, deletes buckets that fell
# out of it. Returns the number of entries applied, or -1 for a payload whose number is not above
# the writer's newest applied (a resend of a call that landed: nothing is done). The TTL (refreshed
# on every write) only collects a ledger nobody writes any more, e.g. under a retired key prefix,
# and the writer's key of a process that stopped without removing it. A call without a number
# (engines before 2026-12-08) is applied without a check.
AB_ADD = "#!lua\n" + CHECK_TYPES + """
local bucket_s, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local entries = cjson.decode(ARGV[5])
local ttl = tonumber(ARGV[6])
local number, buckets = nil, #KEYS - 2
if ARGV[7] then number, buckets = tonumber(ARGV[7]), #KEYS - 3 end
if not bucket_s or bucket_s <= 0 or not keep or not ttl or ttl <= 0 or (ARGV[7] and not number)
    or #entries ~= buckets then
  return redis.error_reply('INVALID arguments')
end
local writer = KEYS[#KEYS]
if number then
  local err = check_type(writer, 'string')
  if err then return err end
  local done = tonumber(redis.call('GET', writer) or '')
  if done and number <= done then return -1 end
end
local err = check_type(KEYS[1], 'zset') or check_type(KEYS[2], 'string')
if err then return err end
for i = 3, buckets + 2 do
  err = check_type(KEYS[i], 'hash')
  if err then return err end
end
local now = tonumber(redis.call('GET', KEYS[2]) or '')
local t = tonumber(ARGV[3])
if t and (not now or t > now) then
  redis.call('SET', KEYS[2], ARGV[3])
  now = t
end
local floor = -1e18
if now then floor = math.floor(now / bucket_s) - keep end
local applied = 0
for i, e in ipairs(entries) do
  if e[1] > floor then
    local kv = e[3]
    for j = 1, #kv, 2 do
      redis.call('HINCRBY', KEYS[i + 2], kv[j], kv[j + 1])
    end
    redis.call('EXPIRE', KEYS[i + 2], ttl)
    redis.call('ZADD', KEYS[1], e[1], e[1] .. ':' .. e[2])
    applied = applied + 1
  end
end
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', floor)
for _, m in ipairs(old) do
  redis.call('DEL', ARGV[4] .. m)
end
if #old > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', floor)
end
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ttl) end
end
if number then redis.call('SET', writer, ARGV[7], 'EX', ttl) end
return applied
"""


def member(role: str, variant: str, model: str) -> str:
    """``d:A/v1`` (decided) or ``s:C/v3`` (shadow)."""
    return f"{role}:{variant}/{model}"


def parse_member(name: str) -> tuple[str, str, str]:
    """(role, variant, model) of a member name."""
    role, _, rest = name.partition(":")
    variant, _, model = rest.partition("/")
    return role, variant, model


def bin_index(probability: float) -> int:
    """The score histogram's bin of a probability (``HIST_BINS`` equal bins of [0, 1])."""
    return min(max(int(probability * HIST_BINS), 0), HIST_BINS - 1)


BIN_FIELDS = tuple(f"h{i}" for i in range(HIST_BINS))


class LedgerKeys:
    __slots__ = ("base", "clock", "index", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.index = f"{prefix}{{ab}}:i"
        self.clock = f"{prefix}{{ab}}:t"
        self.base = f"{prefix}{{ab}}:b:"

    def bucket(self, bucket: int, name: str) -> str:
        return f"{self.base}{bucket}:{name}"

    def writer(self, writer: str) -> str:
        """The key of one writer's newest applied payload number (see AB_ADD)."""
        return f"{self.prefix}{{ab}}:w:{writer}"


class Deltas:
    """Increments not yet in Redis: {(bucket, member): {field: increment}} and the newest event time.
    Bounded by buckets x members x fields, whatever the traffic."""

    __slots__ = ("counts", "newest")

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], dict[str, int]] = {}
        self.newest: float | None = None

    def __bool__(self) -> bool:
        return bool(self.counts)

    def add(self, bucket: int, name: str, field_name: str, increment: int = 1) -> None:
        fields = self.counts.get((bucket, name))
        if fields is None:
            fields = self.counts[(bucket, name)] = {}
        fields[field_name] = fields.get(field_name, 0) + increment

    def saw(self, event_time: float) -> None:
        if self.newest is None or event_time > self.newest:
            self.newest = event_time

    def take(self) -> Deltas:
        """Hand over everything (self is empty afterwards)."""
        out = Deltas()
        out.counts, out.newest = self.counts, self.newest
        self.counts, self.newest = {}, None
        return out

    def call(self, keys: LedgerKeys, bucket_s: int, keep: int, ttl_s: int, writer: str | None = None,
             number: int | None = None) -> tuple[list[str], list[Any]]:
        """The AB_ADD call for these increments: (keys, args); ``ttl_s``: see AB_ADD. With ``writer``
        and ``number`` (the payload's number, increasing per writer) the script applies the call
        once however often it is sent."""
        items = [(bucket, name, fields) for (bucket, name), fields in self.counts.items()]
        call_keys = [keys.index, keys.clock, *(keys.bucket(b, n) for b, n, _ in items)]
        entries = [[b, n, [x for kv in fields.items() for x in kv]] for b, n, fields in items]
        newest = "" if self.newest is None else repr(self.newest)
        args: list[Any] = [bucket_s, keep, newest, keys.base, orjson.dumps(entries), ttl_s]
        if writer is not None and number is not None:
            call_keys.append(keys.writer(writer))
            args.append(number)
        return call_keys, args


def card_group(user_id: str) -> int:
    """The card group of ``user_id``: the same in every process and release (CRC-32, not ``hash``)."""
    return zlib.crc32(user_id.encode()) % CARD_GROUPS


def label_deltas(deltas: Deltas, bucket: int, said: Mapping[str, bool], is_fraud: bool, flipped: bool,
                 group: int) -> None:
    """A label's increments for the decision it confirms: ``said`` is each member's is_fraud,
    ``group`` the card's group (``card_group``); a flipped verdict first takes the opposite
    verdict's increments back out."""
    verdicts = [(not is_fraud, -1), (is_fraud, 1)] if flipped else [(is_fraud, 1)]
    for fraud, sign in verdicts:
        for name, flagged in said.items():
            deltas.add(bucket, name, ("tp" if flagged else "fn") if fraud else ("fp" if flagged else "tn"), sign)
            if not fraud:
                continue
            deltas.add(bucket, name, f"gc{group}" if flagged else f"gm{group}", sign)
            for other, other_flagged in said.items():
                if other == name:
                    continue
                deltas.add(bucket, name, f"p:{other}", sign)
                if flagged and not other_flagged:
                    deltas.add(bucket, name, f"x:{other}", sign)
                    deltas.add(bucket, name, f"gx{group}:{other}", sign)


# -- reading ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class Window:
    """The ledger's buckets over a window of event time, per member."""

    newest: float | None  # the ledger's clock: the newest event time recorded
    bucket_s: int
    start_bucket: int | None
    buckets: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)


def _int_fields(raw: Mapping[Any, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in raw.items():
        out[k.decode() if isinstance(k, bytes) else str(k)] = int(v)
    return out


async def read_window(client: Any, keys: LedgerKeys, bucket_s: int, window_s: float) -> Window:
    """The buckets of the last ``window_s`` of event time (ending at the ledger's clock)."""
    raw_now = await client.get(keys.clock)
    if raw_now is None:
        return Window(None, bucket_s, None)
    newest = float(raw_now)
    start = math.floor((newest - window_s) / bucket_s) + 1
    members = await client.zrangebyscore(keys.index, start, "+inf")
    names = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
    window = Window(newest, bucket_s, start)
    if not names:
        return window
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.base + name)
    for name, raw in zip(names, await pipe.execute(), strict=True):
        bucket_text, _, who = name.partition(":")
        window.buckets.setdefault(who, {})[int(bucket_text)] = _int_fields(raw or {})
    return window


def decision_deltas(deltas: Deltas, tally: Mapping[tuple[int, str, bool, int], int]) -> None:
    """Decisions' increments from their tally: how many decisions each model (member) made per
    (bucket, member, flagged, score bin) -- a decision counts in ``n``, in ``f`` when flagged, and
    in its score's bin (``bin_index``)."""
    for (bucket, name, flagged, score), n in tally.items():
        deltas.add(bucket, name, "n", n)
        if flagged:
            deltas.add(bucket, name, "f", n)
        deltas.add(bucket, name, BIN_FIELDS[score], n)
