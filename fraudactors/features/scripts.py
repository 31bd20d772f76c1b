"""The Lua scripts of the online store (key layout: ``keys.py``).

A merchant's transaction counts are buckets by event hour and day (integers since the epoch),
also those of new customers (cards that had not used the merchant), appended to one string per
merchant (``COUNTS_CODEC``); beside them a hash of the highest offset already counted per
partition (what makes the counts idempotent under replay and under a fenced-off writer). Engines
before the string kept one hash of fields ``h<hour>``, ``d<day>``, ``nh<hour>``, ``nd<day>``,
``o<partition>``, which the read script reads and the write script converts. The frauds hash has
fields ``h<hour>`` / ``d<day>`` of the labels' report times; its window arithmetic in
``READ_BATCH`` mirrors ``definition._recompute`` exactly (the parity tests compare the two; keep
them in step), the transaction counts' windows are summed by the client.

Every script that writes starts with ``#!lua`` (no ``allow-oom`` flag), so a server out of
memory refuses it before it runs instead of failing at its first write, and each one checks
the types of its keys and arguments before its first write: an error leaves nothing half
applied. The scripts return ``INVALID ...`` errors for bad input, which the store reports as
deterministic (not an outage).
"""

from __future__ import annotations

# Shared by the writing scripts: fail before any write when a key has the wrong type.
CHECK_TYPES = """
local function check_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then
    return redis.error_reply('INVALID WRONGTYPE ' .. key .. ' is a ' .. t .. ', expected ' .. want)
  end
  return nil
end
"""

# The packed counts of one merchant (the value of its counts key), version 2: a version byte (2),
# then entries of 13 bytes, little-endian (B kind, i4 bucket, i8 count): kind 1 an event hour's
# transactions, 2 an event day's, 3 and 4 the same of new customers. A bucket may have several
# entries: its count is their sum. A write appends its increments (APPEND: Redis copies a few
# bytes, no Lua value per bucket) and compacts the string -- one entry per bucket, the buckets out
# of every window dropped -- once it holds more than its bound of entries. The read script returns
# the string as it is and the client sums the windows (``_kernel.counts_sums``). The high-water
# offsets per partition, which make the counts idempotent, are a hash beside it
# (``{m<shard>}:o:<merchant>``, field = partition). decode_counts: the four tables {bucket -> count}
# of a string, or nil when this codec did not write it; count_bytes: the entries of four tables;
# counts_from_hash: the tables and the offsets of a counts hash of an engine before the string.
COUNTS_CODEC = """
local COUNTS_VERSION, COUNTS_ENTRY, COUNTS_CHUNK = 2, 13, 200
local COUNTS_HEAD = string.char(COUNTS_VERSION)
local COUNT_KIND = {h = 1, d = 2, nh = 3, nd = 4}
local function decode_counts(blob)
  if string.byte(blob, 1) ~= COUNTS_VERSION or (#blob - 1) % COUNTS_ENTRY ~= 0 then return nil end
  local tables, at, left = {{}, {}, {}, {}}, 2, (#blob - 1) / COUNTS_ENTRY
  while left > 0 do
    local chunk = math.min(left, COUNTS_CHUNK)
    local v = {struct.unpack('<' .. string.rep('Bi4i8', chunk), blob, at)}
    for x = 1, 3 * chunk, 3 do
      local t = tables[v[x]]
      if not t then return nil end
      t[v[x + 1]] = (t[v[x + 1]] or 0) + v[x + 2]
    end
    at = v[3 * chunk + 1]
    left = left - chunk
  end
  return tables
end
local function count_bytes(tables)
  local parts = {}
  for kind = 1, 4 do
    local flat = {}
    for bucket, n in pairs(tables[kind]) do
      flat[#flat + 1] = kind
      flat[#flat + 1] = bucket
      flat[#flat + 1] = n
    end
    for x = 1, #flat, 3 * COUNTS_CHUNK do
      local hi = math.min(x + 3 * COUNTS_CHUNK - 1, #flat)
      parts[#parts + 1] = struct.pack('<' .. string.rep('Bi4i8', (hi - x + 1) / 3), unpack(flat, x, hi))
    end
  end
  return table.concat(parts)
end
local function counts_from_hash(flat)
  local tables, offsets = {{}, {}, {}, {}}, {}
  for i = 1, #flat, 2 do
    local kind, n = string.match(flat[i], '^(%a+)(-?%d+)$')
    local v = tonumber(flat[i + 1])
    if v and COUNT_KIND[kind] then
      tables[COUNT_KIND[kind]][tonumber(n)] = v
    elseif v and kind == 'o' then
      offsets[tonumber(n)] = v
    end
  end
  return tables, offsets
end
"""

# KEYS: the user keys, then (counts key, frauds key) per merchant, then one replay-log key per
# partition of the batch.
# ARGV: number of user keys, number of merchants, a JSON array of one reference hour per merchant
# (>= 0 when all the batch's transactions of that merchant fall in that event hour, -1
# otherwise), a JSON array of [lowest, highest] offset of the batch per replay-log key, and a JSON
# array of one probe per user: [its replay-log key's index (0: none), its partition, the lowest
# offset of its records in the batch]. A replay log is read only when a user's stored blob says
# a record of the batch was applied already (a replay: rare), so a normal batch reads none.
# Returns the user blobs (false when absent), then per merchant its counts -- the packed blob
# (false when absent; see COUNTS_CODEC), or the flat field/value list of a counts hash written by
# an engine before the blob (the next write converts it) -- and its frauds: with a reference hour
# {frauds today before the hour, frauds 7 past days, frauds 30 past days, number of fraud fields},
# else the frauds hash as a flat field/value list; then per replay-log key the logged members
# with a score (offset) in the batch's range. The counts' window sums are the client's (compiled:
# a Lua table per hash field made the read script the store's largest cost in Redis).
READ_BATCH = """
local n_users = tonumber(ARGV[1])
local n_merchants = tonumber(ARGV[2])
local out = {}
for i = 1, n_users do
  out[i] = redis.call('GET', KEYS[i])
end
local hours = cjson.decode(ARGV[3])
-- Bucket numbers of the frauds hashes' fields, parsed once per call: the merchants of a batch
-- share most of their field names (the same hours and days), so a table lookup replaces a
-- string.sub and a tonumber per field. false: not a bucket of that kind.
local hour_n, day_n = {}, {}
local function parse(field)
  local kind, n = string.byte(field, 1), tonumber(string.sub(field, 2))
  hour_n[field] = kind == 104 and n or false
  day_n[field] = kind == 100 and n or false
end
for j = 1, n_merchants do
  local k = n_users + 2 * j - 1
  -- the counts: a packed blob (GET), or a hash of an engine before it (HGETALL; any other type fails)
  local c = redis.pcall('GET', KEYS[k])
  if type(c) == 'table' and c['err'] then c = redis.call('HGETALL', KEYS[k]) end
  local f = redis.call('HGETALL', KEYS[k + 1])
  local hour = hours[j]
  out[k] = c
  if hour < 0 then
    out[k + 1] = f
  else
    local day = math.floor(hour / 24)
    local ft, f7, f30 = 0, 0, 0
    for i = 1, #f, 2 do
      local field = f[i]
      local h = hour_n[field]
      if h == nil then
        parse(field)
        h = hour_n[field]
      end
      if h then
        if h >= day * 24 and h < hour then ft = ft + (tonumber(f[i + 1]) or 0) end
      else
        local d = day_n[field]
        if d and d >= day - 30 and d < day then
          local v = tonumber(f[i + 1]) or 0
          f30 = f30 + v
          if d >= day - 7 then f7 = f7 + v end
        end
      end
    end
    out[k + 1] = {ft, f7, f30, #f / 2}
  end
end
local ranges = cjson.decode(ARGV[4])
local probes = cjson.decode(ARGV[5])
local need = {}
for i = 1, n_users do
  local blob, probe = out[i], probes[i]
  if blob and probe and probe[1] > 0 then
    local version, part, offset = string.byte(blob, 1), nil, nil
    if version >= 2 and version <= 4 and #blob >= 21 then
      local _, _, _, p, _, o = struct.unpack('<BBbi4I4i8', blob)
      part, offset = p, o
    elseif version == 1 and #blob >= 17 then
      local _, _, _, p, o = struct.unpack('<BBbi4i8', blob)
      part, offset = p, o
    end
    if part == probe[2] and offset >= probe[3] then need[probe[1]] = true end
  end
end
local base = n_users + 2 * n_merchants
for r = 1, #ranges do
  if need[r] then
    out[base + r] = redis.call('ZRANGEBYSCORE', KEYS[base + r], ranges[r][1], ranges[r][2])
  else
    out[base + r] = {}
  end
end
return out
"""

# KEYS: the user keys, then (counts key, frauds key, offsets key) per merchant, then one replay-log key per
# partition of the batch.
# ARGV: ttl, number of users, number of merchants, a JSON plan, the merchants' records as JSON,
# the user blobs concatenated, then per replay-log key its members concatenated (each of the
# plan's member size, in the order of that key's records). Few large arguments rather than one per
# record: the client's cost is per argument. The plan:
#   "u": per user [partition, epoch, blob length] of the writer;
#   "m": per merchant [[partition, lowest offset, highest offset, records, kind, bucket, n, ...] per
#        partition (the batch's count increments of that partition, aggregated; the kinds of
#        COUNTS_CODEC), the most
#        entries the counts keep before the buckets older than the next two (hour, day) go,
#        oldest hour, oldest day, prune frauds (0/1), oldest hour, oldest day];
#   "r": per replay-log key [committed floor (-1: none), [user index, offset, ...]];
#   "s": the size of a replay-log member.
# The merchants' records: per merchant [partition, offset, hour, day, new customer 0/1, ...] in offset order per
# partition, decoded only when a merchant's stored high-water offset of a partition reaches into
# the batch's offsets (a replay, or a writer fenced off after counting): those partitions are then
# counted record by record, every other one by its aggregated increments (the same result).
# The blobs written are state_codec version 4; a stored one of version 2, 3 or 4 has its
# partition and epoch at the same place of the header, version 1 has no epoch (read as 0); only the header
# is read (GETRANGE).
# Fencing: a user blob whose stored partition equals the writer's and whose stored epoch is
# newer than the writer's belongs to a newer owner: it is not overwritten, and the records of
# that user are not logged. Merchant counts take a record only when its offset is above the
# high-water offset of its partition in that merchant's counts.
# The counts are written as a packed blob (COUNTS_CODEC); a counts hash of an engine before it is
# read and replaced by its blob; a blob that cannot be read is replaced by this batch's counts.
# Returns {users written, users refused as stale, merchant records counted, count blobs replaced
# because they could not be read}.
WRITE_BATCH = "#!lua\n" + COUNTS_CODEC + """
local ttl = tonumber(ARGV[1])
local n_users = tonumber(ARGV[2])
local n_merchants = tonumber(ARGV[3])
local ok, plan = pcall(cjson.decode, ARGV[4])
if not ttl or not n_users or not n_merchants or not ok or type(plan) ~= 'table' then
  return redis.error_reply('INVALID arguments')
end
local users, merchants, logs, size = plan['u'], plan['m'], plan['r'], plan['s']
if type(users) ~= 'table' or #users ~= n_users or type(merchants) ~= 'table' or #merchants ~= n_merchants
    or type(logs) ~= 'table' or #KEYS ~= n_users + 3 * n_merchants + #logs or type(size) ~= 'number' then
  return redis.error_reply('INVALID plan does not match the keys')
end
if #ARGV ~= 6 + #logs then
  return redis.error_reply('INVALID argument count')
end
for r = 1, #logs do
  if type(logs[r]) ~= 'table' or type(logs[r][2]) ~= 'table' or #logs[r][2] % 2 ~= 0
      or #ARGV[6 + r] ~= size * #logs[r][2] / 2 then
    return redis.error_reply('INVALID replay plan')
  end
end
local blobs = {}
local at = 1
for i = 1, n_users do
  local u = users[i]
  if type(u) ~= 'table' or type(u[3]) ~= 'number' then return redis.error_reply('INVALID user plan') end
  local blob = string.sub(ARGV[6], at, at + u[3] - 1)
  at = at + u[3]
  if #blob < 23 or string.byte(blob, 1) ~= 4 then
    return redis.error_reply('INVALID state blob for ' .. KEYS[i])
  end
  blobs[i] = blob
end
if at ~= #ARGV[6] + 1 then return redis.error_reply('INVALID state blobs') end
for j = 1, n_merchants do
  local p = merchants[j]
  if type(p) ~= 'table' or type(p[1]) ~= 'table' or #p ~= 7 then
    return redis.error_reply('INVALID merchant plan for ' .. KEYS[n_users + 3 * j - 2])
  end
  for _, g in ipairs(p[1]) do
    if type(g) ~= 'table' or #g < 4 or (#g - 4) % 3 ~= 0 then
      return redis.error_reply('INVALID merchant plan for ' .. KEYS[n_users + 3 * j - 2])
    end
  end
end

-- Phase 1, reads only: everything the writes depend on, which also proves every key has the
-- type the writes expect (a read of the wrong type fails here, before any write).
local function read(command, key, ...)
  local reply = redis.pcall(command, key, ...)
  if type(reply) == 'table' and reply['err'] then
    return nil, redis.error_reply('INVALID WRONGTYPE ' .. key .. ': ' .. reply['err'])
  end
  return reply, nil
end
local old = {}
for i = 1, n_users do
  local reply, err = read('GETRANGE', KEYS[i], 0, 20)
  if err then return err end
  old[i] = reply
end
local marks = {}
local state = {}    -- merchant -> 'append' (its string), 'new' (none yet), 'hash' (an engine before), 'reset'
local legacy = {}   -- merchant -> {tables, offsets} of its counts hash
local overlap = {}  -- merchant -> {partition -> true} counted record by record
local records = nil
for j = 1, n_merchants do
  local counts, frauds, offsets = KEYS[n_users + 3 * j - 2], KEYS[n_users + 3 * j - 1], KEYS[n_users + 3 * j]
  local head = redis.pcall('GETRANGE', counts, 0, 0)
  if type(head) == 'table' and head['err'] then
    local flat, err = read('HGETALL', counts)  -- a counts hash of an engine before the string
    if err then return err end
    legacy[j] = {counts_from_hash(flat)}
    state[j] = 'hash'
  elseif head == '' then
    state[j] = 'new'
  elseif head == COUNTS_HEAD then
    state[j] = 'append'
  else
    state[j] = 'reset'  -- a string this codec did not write: replaced by this batch's counts
  end
  local parts, seen = {}, {}
  for _, g in ipairs(merchants[j][1]) do
    if not seen[g[1]] then
      seen[g[1]] = true
      parts[#parts + 1] = g[1]
    end
  end
  marks[j] = {}
  if #parts > 0 then
    local reply, err = read('HMGET', offsets, unpack(parts))
    if err then return err end
    for i, part in ipairs(parts) do
      marks[j][part] = math.max(tonumber(reply[i]) or -1, legacy[j] and legacy[j][2][part] or -1)
    end
  end
  for _, g in ipairs(merchants[j][1]) do
    if g[2] <= marks[j][g[1]] then
      overlap[j] = overlap[j] or {}
      overlap[j][g[1]] = true
    end
  end
  if merchants[j][5] == 1 then
    local _, err = read('HLEN', frauds)
    if err then return err end
  end
end
if next(overlap) then
  local decoded
  ok, decoded = pcall(cjson.decode, ARGV[5])
  if not ok or type(decoded) ~= 'table' or #decoded ~= n_merchants then
    return redis.error_reply('INVALID merchant records')
  end
  for j in pairs(overlap) do
    if type(decoded[j]) ~= 'table' or #decoded[j] % 5 ~= 0 then
      return redis.error_reply('INVALID merchant records for ' .. KEYS[n_users + 3 * j - 2])
    end
  end
  records = decoded
end
local highest = {}
local base = n_users + 3 * n_merchants
for r = 1, #logs do
  local top, err = read('ZRANGE', KEYS[base + r], -1, -1, 'WITHSCORES')
  if err then return err end
  highest[r] = top[2] and tonumber(top[2]) or -1
end

-- The merchants' increments and new high-water offsets, before the first write.
local increments, offsets_set = {}, {}
local counted = 0
for j = 1, n_merchants do
  local p = merchants[j]
  local high, add = {}, {{}, {}, {}, {}}
  for part, mark in pairs(marks[j]) do high[part] = mark end
  local slow = overlap[j]
  for _, g in ipairs(p[1]) do
    local part = g[1]
    if not (slow and slow[part]) then
      -- every record of this partition is above the high-water offset: all of them count
      for x = 5, #g, 3 do
        local t, bucket, n = add[g[x]], g[x + 1], g[x + 2]
        if not t or type(bucket) ~= 'number' or type(n) ~= 'number' then
          return redis.error_reply('INVALID merchant count ' .. tostring(g[x]) .. ' ' .. tostring(bucket))
        end
        t[bucket] = (t[bucket] or 0) + n
      end
      counted = counted + g[4]
      if g[3] > high[part] then high[part] = g[3] end
    end
  end
  if slow then
    local entries = records[j]
    for x = 1, #entries, 5 do
      local part, offset = entries[x], entries[x + 1]
      if slow[part] then
        local mark = high[part]
        if offset > mark then
          local hour, day = entries[x + 2], entries[x + 3]
          add[1][hour] = (add[1][hour] or 0) + 1
          add[2][day] = (add[2][day] or 0) + 1
          if entries[x + 4] == 1 then
            add[3][hour] = (add[3][hour] or 0) + 1
            add[4][day] = (add[4][day] or 0) + 1
          end
          counted = counted + 1
          mark = offset
        end
        high[part] = mark
      end
    end
  end
  if state[j] == 'hash' then  -- the whole hash becomes a string, with the batch's increments
    local tables = legacy[j][1]
    for kind = 1, 4 do
      for bucket, n in pairs(add[kind]) do tables[kind][bucket] = (tables[kind][bucket] or 0) + n end
    end
    add = tables
    for part, mark in pairs(legacy[j][2]) do
      if high[part] == nil or mark > high[part] then high[part] = mark end
    end
  end
  increments[j] = count_bytes(add)
  local hw = {}
  for part, mark in pairs(high) do
    if mark >= 0 and (state[j] == 'hash' or mark > marks[j][part]) then
      hw[#hw + 1] = part
      hw[#hw + 1] = mark
    end
  end
  offsets_set[j] = hw
end

-- Phase 2: writes
local refused = {}
local written, stale = 0, 0
for i = 1, n_users do
  local blob = old[i]
  local mine = users[i]
  if #blob >= 11 then
    local version = string.byte(blob, 1)
    local part, epoch = -1, 0
    if version >= 2 and version <= 4 then
      local _, _, _, p, e = struct.unpack('<BBbi4I4', blob)
      part, epoch = p, e
    elseif version == 1 then
      local _, _, _, p = struct.unpack('<BBbi4', blob)
      part = p
    end
    if part == mine[1] and epoch > mine[2] then refused[i] = true end
  end
  if refused[i] then
    stale = stale + 1
  else
    redis.call('SET', KEYS[i], blobs[i], 'EX', ttl)
    written = written + 1
  end
end

for r = 1, #logs do
  local key = KEYS[base + r]
  local floor, entries = logs[r][1], logs[r][2]
  local packed = ARGV[6 + r]
  local adds = {}
  for x = 1, #entries, 2 do
    if not refused[entries[x]] then
      local offset = entries[x + 1]
      if offset <= highest[r] then redis.call('ZREMRANGEBYSCORE', key, offset, offset) end
      local start = (x - 1) / 2 * size
      adds[#adds + 1] = offset
      adds[#adds + 1] = string.sub(packed, start + 1, start + size)
    end
  end
  for x = 1, #adds, 1000 do
    redis.call('ZADD', key, unpack(adds, x, math.min(x + 999, #adds)))
  end
  if floor >= 0 then redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. floor) end
  redis.call('EXPIRE', key, ttl)
end

local function prune(key, oldest_hour, oldest_day)
  local fields = redis.call('HKEYS', key)
  local dead = {}
  for _, field in ipairs(fields) do
    local kind = string.byte(field, 1)
    local n = tonumber(string.sub(field, 2))
    if kind == 110 then  -- nh<hour> / nd<day>: the new customers' buckets, pruned like h / d
      kind, n = string.byte(field, 2), tonumber(string.sub(field, 3))
    end
    if kind ~= 111 and (n == nil or (kind == 104 and n < oldest_hour) or (kind == 100 and n < oldest_day)
        or (kind ~= 104 and kind ~= 100)) then
      dead[#dead + 1] = field
    end
  end
  for i = 1, #dead, 500 do
    redis.call('HDEL', key, unpack(dead, i, math.min(i + 499, #dead)))
  end
end
-- A merchant's counts once they hold more than their bound of entries: one entry per bucket,
-- without the buckets older than the oldest hour / day any window reaches. A string with the
-- codec's head and length but an entry of no kind (corrupted in Redis) is replaced by the
-- batch's increments.
local reset = 0
local function compact(key, oldest_hour, oldest_day, appended)
  local tables = decode_counts(redis.call('GET', key))
  if not tables then
    reset = reset + 1
    redis.call('SET', key, COUNTS_HEAD .. appended, 'KEEPTTL')
    return
  end
  for kind, oldest in ipairs({oldest_hour, oldest_day, oldest_hour, oldest_day}) do
    for bucket in pairs(tables[kind]) do
      if bucket < oldest then tables[kind][bucket] = nil end
    end
  end
  redis.call('SET', key, COUNTS_HEAD .. count_bytes(tables), 'KEEPTTL')
end
for j = 1, n_merchants do
  local counts, frauds, offsets = KEYS[n_users + 3 * j - 2], KEYS[n_users + 3 * j - 1], KEYS[n_users + 3 * j]
  local p = merchants[j]
  local appended = increments[j]
  if state[j] == 'append' then
    local length = redis.call('APPEND', counts, appended)
    if (length - 1) % COUNTS_ENTRY ~= 0 then  -- not a length this codec writes: replaced
      reset = reset + 1
      redis.call('SET', counts, COUNTS_HEAD .. appended)
    elseif (length - 1) / COUNTS_ENTRY > p[2] then
      compact(counts, p[3], p[4], appended)
    end
    redis.call('EXPIRE', counts, ttl)
  else
    if state[j] == 'reset' then reset = reset + 1 end
    redis.call('SET', counts, COUNTS_HEAD .. appended, 'EX', ttl)
    if state[j] == 'hash' and (#appended / COUNTS_ENTRY) > p[2] then compact(counts, p[3], p[4], appended) end
  end
  local hw = offsets_set[j]
  for x = 1, #hw, 500 do
    redis.call('HSET', offsets, unpack(hw, x, math.min(x + 499, #hw)))
  end
  redis.call('EXPIRE', offsets, ttl)
  if p[5] == 1 then prune(frauds, p[6], p[7]) end
end
return {written, stale, counted, reset}
"""

# KEYS: (label-marks hash, frauds hash) per label (both of the label's merchant).
# ARGV: ttl, how long (ms of labeled_at) a mark is kept, then (transaction_id, labeled_at in ms,
# is_fraud 0/1, hour field, day field) per label.
# The label with the latest labeled_at stands for its transaction. Its mark, field
# "l<transaction_id>" of the merchant's marks hash, holds "labeled_at_ms|is_fraud|hour|day" (the
# buckets of the counted fraud report). A new fraud label counts in its own hour/day buckets; a
# later label with the same verdict changes nothing; a later "not fraud" takes the counted
# report back out of its buckets; a later "fraud" after a "not fraud" counts in its own buckets.
# An older or equal labeled_at changes nothing. Marks whose labeled_at is more than the keep
# time before the hash's newest mark are pruned (event time: they are past every window; the
# merchant's own newest, so one merchant's mis-dated label cannot prune another's) whenever the
# call's new marks take the hash past a multiple of 64 fields. Returns one status per label:
# 0 nothing changed, 1 new, 2 verdict flipped, 3 confirmed (same verdict, later).
APPLY_LABELS = "#!lua\n" + CHECK_TYPES + """
local ttl, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
if not ttl or not keep or #KEYS % 2 ~= 0 or #ARGV ~= 2 + 5 * #KEYS / 2 then
  return redis.error_reply('INVALID arguments')
end
for i = 1, #KEYS / 2 do
  local a = 3 + (i - 1) * 5
  local err = check_type(KEYS[2 * i - 1], 'hash') or check_type(KEYS[2 * i], 'hash')
  if err then return err end
  local at = tonumber(ARGV[a + 1])
  if not at or (ARGV[a + 2] ~= '0' and ARGV[a + 2] ~= '1') then
    return redis.error_reply('INVALID label arguments')
  end
end
local status = {}
local grown = {}
for i = 1, #KEYS / 2 do
  local a = 3 + (i - 1) * 5
  local marks, frauds = KEYS[2 * i - 1], KEYS[2 * i]
  local field = 'l' .. ARGV[a]
  local at, fraud, hour, day = tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local old = redis.call('HGET', marks, field)
  local result = 0
  if not old then
    result = 1
  else
    local old_at, old_fraud, old_hour, old_day = string.match(old, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    old_at = tonumber(old_at) or 0
    if at <= old_at then
      result = 0
    elseif fraud == old_fraud then
      result = 3
      hour, day = old_hour, old_day
    else
      result = 2
      if old_fraud == '1' then
        for _, bucket in ipairs({old_hour, old_day}) do
          local v = tonumber(redis.call('HGET', frauds, bucket))
          if v and v > 1 then
            redis.call('HINCRBY', frauds, bucket, -1)
          elseif v then
            redis.call('HDEL', frauds, bucket)
          end
        end
      end
    end
  end
  if (result == 1 or result == 2) and fraud == '1' then
    redis.call('HINCRBY', frauds, hour, 1)
    redis.call('HINCRBY', frauds, day, 1)
    redis.call('EXPIRE', frauds, ttl)
  end
  if result ~= 0 then
    if fraud ~= '1' then hour, day = '', '' end
    redis.call('HSET', marks, field, ARGV[a + 1] .. '|' .. fraud .. '|' .. hour .. '|' .. day)
    redis.call('EXPIRE', marks, ttl)
    if result == 1 then grown[marks] = (grown[marks] or 0) + 1 end
  end
  status[i] = result
end
for marks, added in pairs(grown) do
  local size = redis.call('HLEN', marks)
  if math.floor(size / 64) > math.floor((size - added) / 64) then
    local flat = redis.call('HGETALL', marks)
    local newest = 0
    for x = 2, #flat, 2 do
      local at = tonumber(string.match(flat[x], '^([^|]*)'))
      if at and at > newest then newest = at end
    end
    local oldest = newest - keep
    local dead = {}
    for x = 1, #flat, 2 do
      local at = tonumber(string.match(flat[x + 1], '^([^|]*)'))
      if not at or at < oldest then dead[#dead + 1] = flat[x] end
    end
    for x = 1, #dead, 500 do
      redis.call('HDEL', marks, unpack(dead, x, math.min(x + 499, #dead)))
    end
  end
end
return status
"""

# KEYS: the partition's epoch key; ARGV: its TTL (an epoch key that expired is one Redis lost: the
# clock below recovers it). A new fencing epoch for its next owner: one more than the last, and at least the Redis server's clock in seconds. The clock keeps epochs rising when the counter
# itself was lost (a Redis restarted empty or from an older snapshot, a failover that lost the last
# INCR) while engines still hold epochs they claimed before: a new owner's epoch is then still the
# newest. Seconds fit the blobs' 32-bit epoch field until 2106.
CLAIM = "#!lua\n" + CHECK_TYPES + """
local err = check_type(KEYS[1], 'string')
if err then return err end
local ttl = tonumber(ARGV[1])
if not ttl or ttl <= 0 then return redis.error_reply('INVALID arguments') end
local epoch = redis.call('INCR', KEYS[1])
local now = tonumber(redis.call('TIME')[1])
if epoch < now then
  redis.call('SET', KEYS[1], now)
  epoch = now
end
redis.call('EXPIRE', KEYS[1], ttl)
return epoch
"""

# KEYS: one outcome list per decision (the user's). ARGV: ttl, the list cap, "1" to skip an entry
# its list already holds (a resend of a call that failed: it may have landed) or "0", then one
# entry "<transaction_id>\x1f<bucket>\t<member>=<0|1>,...\t<merchant_id>" per key (engine/labels.py
# Said). Each list keeps the user's newest entries. The check (LPOS over at most cap entries) is
# asked for on resends only: asked always, it cost 0.1-0.9 us more per entry, up to a fifth of the
# script's time (docs/benchmarks.md).
RECORD_OUTCOMES = "#!lua\n" + CHECK_TYPES + """
local ttl, cap, again = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
if not ttl or not cap or #ARGV ~= 3 + #KEYS then return redis.error_reply('INVALID arguments') end
for i, key in ipairs(KEYS) do
  local err = check_type(key, 'list')
  if err then return err end
end
for i, key in ipairs(KEYS) do
  local entry = ARGV[i + 3]
  if not (again and redis.call('LPOS', key, entry)) then
    if redis.call('LPUSH', key, entry) > cap then redis.call('LTRIM', key, 0, cap - 1) end
  end
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""

# KEYS: per label, its user's outcome list and its user's placements hash (one slot). ARGV: the
# transaction_id of each label. Returns two values per label: the rest of the outcome entry after
# "<transaction_id>\\x1f" (bucket, flags, merchant) or, in an entry of the engines before the
# merchant was kept, after "<transaction_id>\\t" (false when not remembered); then the merchant the
# transaction's labels were placed at (RECORD_PLACEMENTS; false when none was recorded). (The new
# separator keeps the lookup of the engines before the merchant was kept from matching the new
# entries, which they would misread, after a rollback: it counts their labels as unmatched.) A key
# of another type is read as absent.
LOOKUP_OUTCOMES = """
local out = {}
for i = 1, #ARGV do
  local key, placements = KEYS[2 * i - 1], KEYS[2 * i]
  local found = false
  if redis.call('TYPE', key)['ok'] == 'list' then
    local n = #ARGV[i] + 1
    local now, before = ARGV[i] .. '\\31', ARGV[i] .. '\\t'
    for _, entry in ipairs(redis.call('LRANGE', key, 0, -1)) do
      local head = string.sub(entry, 1, n)
      if head == now or head == before then
        found = string.sub(entry, n + 1)
        break
      end
    end
  end
  local placed = false
  if redis.call('TYPE', placements)['ok'] == 'hash' then
    local value = redis.call('HGET', placements, ARGV[i])
    if value then placed = string.match(value, '^[^|]*|(.*)$') or false end
  end
  out[2 * i - 1], out[2 * i] = found, placed
end
return out
"""

# KEYS: the placements hash of each label's user ("<prefix>{u<shard>}:lp:<user_id>", the user's
# slot). ARGV: ttl, keep (ms of labeled_at), cap, then (transaction_id, labeled_at in ms, merchant)
# per key. Field "<transaction_id>", value "<labeled_at_ms>|<merchant>": the merchant the
# transaction's labels count at, written once the label is applied. The first merchant recorded
# stands (a transaction's labels go to one merchant); a later label only raises the time. When a
# call's new fields take a hash past a multiple of 64, fields more than keep before its newest are
# pruned (the label marks' keep: past it a later verdict changes no feature) and then the oldest
# beyond cap: at most cap + 63 fields per user, whatever the label rate. A key of another type is
# left alone (not a placement hash: never overwritten). Returns the number of fields written.
RECORD_PLACEMENTS = """#!lua
local ttl, keep, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not ttl or not keep or not cap or #ARGV ~= 3 + 3 * #KEYS then
  return redis.error_reply('INVALID arguments')
end
local written = 0
local grown = {}
for i, key in ipairs(KEYS) do
  local a = 4 + (i - 1) * 3
  local t = redis.call('TYPE', key)['ok']
  local at = tonumber(ARGV[a + 1])
  if at and (t == 'none' or t == 'hash') then
    local old = redis.call('HGET', key, ARGV[a])
    if not old then
      redis.call('HSET', key, ARGV[a], ARGV[a + 1] .. '|' .. ARGV[a + 2])
      grown[key] = (grown[key] or 0) + 1
      written = written + 1
    else
      local old_at, merchant = string.match(old, '^([^|]*)|(.*)$')
      if not tonumber(old_at) or tonumber(old_at) < at then
        redis.call('HSET', key, ARGV[a], ARGV[a + 1] .. '|' .. (merchant or ARGV[a + 2]))
      end
    end
    redis.call('EXPIRE', key, ttl)
  end
end
for key, added in pairs(grown) do
  local size = redis.call('HLEN', key)
  if math.floor(size / 64) > math.floor((size - added) / 64) then
    local flat = redis.call('HGETALL', key)
    local newest = 0
    for x = 2, #flat, 2 do
      local at = tonumber(string.match(flat[x], '^([^|]*)'))
      if at and at > newest then newest = at end
    end
    local dead, kept = {}, {}
    for x = 1, #flat, 2 do
      local at = tonumber(string.match(flat[x + 1], '^([^|]*)'))
      if not at or at < newest - keep then
        dead[#dead + 1] = flat[x]
      else
        kept[#kept + 1] = {at, flat[x]}
      end
    end
    if #kept > cap then
      table.sort(kept, function(p, q) return p[1] < q[1] end)
      for x = 1, #kept - cap do dead[#dead + 1] = kept[x][2] end
    end
    for x = 1, #dead, 500 do
      redis.call('HDEL', key, unpack(dead, x, math.min(x + 499, #dead)))
    end
  end
end
return written
"""
