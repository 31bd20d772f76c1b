"""The Lua scripts of the online store: one call per read, per write, per label batch.

Hash fields are buckets named ``h<hour>`` / ``d<day>`` (integers since the epoch). The window
arithmetic in ``READ_BATCH`` mirrors ``definition._recompute`` exactly (the parity tests
compare the two); keep them in step.
"""

from __future__ import annotations

# KEYS: the user keys, then (counts key, frauds key) per merchant.
# ARGV: number of user keys, then a JSON array of one reference hour per merchant: >= 0 when all
# the batch's transactions of that merchant fall in that event hour, -1 otherwise.
# (Arguments are few and packed: redis-py's per-argument encoding is the cost on this path.)
# Returns the user blobs (nil when absent) and, per merchant, either
#   {c24, c7, c30, frauds today before the hour, frauds 7 past days, frauds 30 past days} and
#   {number of count fields, number of fraud fields}       (reference hour given), or
#   the counts hash and the frauds hash as flat field/value lists                (-1).
READ_BATCH = """
local n_users = tonumber(ARGV[1])
local out = {}
for i = 1, n_users do
  out[i] = redis.call('GET', KEYS[i])
end
local hours = cjson.decode(ARGV[2])
local j = 0
for k = n_users + 1, #KEYS, 2 do
  local c = redis.call('HGETALL', KEYS[k])
  local f = redis.call('HGETALL', KEYS[k + 1])
  j = j + 1
  local hour = hours[j]
  if hour < 0 then
    out[k] = c
    out[k + 1] = f
  else
    local day = math.floor(hour / 24)
    local c24, c7, c30, ft, f7, f30 = 0, 0, 0, 0, 0, 0
    for i = 1, #c, 2 do
      local kind = string.byte(c[i], 1)
      local n = tonumber(string.sub(c[i], 2))
      local v = tonumber(c[i + 1])
      if n and v then
        if kind == 104 then
          if n >= hour - 23 and n <= hour then c24 = c24 + v end
        elseif kind == 100 and n >= day - 29 and n <= day then
          c30 = c30 + v
          if n >= day - 6 then c7 = c7 + v end
        end
      end
    end
    for i = 1, #f, 2 do
      local kind = string.byte(f[i], 1)
      local n = tonumber(string.sub(f[i], 2))
      local v = tonumber(f[i + 1])
      if n and v then
        if kind == 104 then
          if n >= day * 24 and n < hour then ft = ft + v end
        elseif kind == 100 and n >= day - 30 and n < day then
          f30 = f30 + v
          if n >= day - 7 then f7 = f7 + v end
        end
      end
    end
    out[k] = {c24, c7, c30, ft, f7, f30}
    out[k + 1] = {#c / 2, #f / 2}
  end
end
return out
"""

# KEYS: the user keys, then (counts key, frauds key) per merchant.
# ARGV: ttl, number of users, a JSON plan with one entry per merchant
#   [[field, increment, field, increment, ...], prune counts (0/1), oldest hour, oldest day,
#    prune frauds (0/1), oldest hour, oldest day],
# then the user blobs. Runs atomically: either the whole batch is applied or none of it.
WRITE_BATCH = """
local ttl = ARGV[1]
local n_users = tonumber(ARGV[2])
local plan = cjson.decode(ARGV[3])
for i = 1, n_users do
  redis.call('SET', KEYS[i], ARGV[3 + i], 'EX', ttl)
end
local function prune(key, oldest_hour, oldest_day)
  local fields = redis.call('HKEYS', key)
  local dead = {}
  for _, field in ipairs(fields) do
    local kind = string.byte(field, 1)
    local n = tonumber(string.sub(field, 2))
    if n == nil or (kind == 104 and n < oldest_hour) or (kind == 100 and n < oldest_day)
        or (kind ~= 104 and kind ~= 100) then
      dead[#dead + 1] = field
    end
  end
  for i = 1, #dead, 500 do
    redis.call('HDEL', key, unpack(dead, i, math.min(i + 499, #dead)))
  end
end
for j, p in ipairs(plan) do
  local counts = KEYS[n_users + 2 * j - 1]
  local frauds = KEYS[n_users + 2 * j]
  local inc = p[1]
  for x = 1, #inc, 2 do
    redis.call('HINCRBY', counts, inc[x], inc[x + 1])
  end
  redis.call('EXPIRE', counts, ttl)
  if p[2] == 1 then prune(counts, p[3], p[4]) end
  if p[5] == 1 then prune(frauds, p[6], p[7]) end
end
return n_users
"""

# KEYS: (applied marker, frauds key) per label. ARGV: ttl, then (day field, hour field, is_fraud)
# per label. A label applies once per transaction_id (SET NX); returns how many were new.
APPLY_LABELS = """
local ttl = ARGV[1]
local applied = 0
for i = 1, #KEYS / 2 do
  local a = 2 + (i - 1) * 3
  if redis.call('SET', KEYS[2 * i - 1], '1', 'NX', 'EX', ttl) then
    applied = applied + 1
    if ARGV[a + 2] == '1' then
      redis.call('HINCRBY', KEYS[2 * i], ARGV[a], 1)
      redis.call('HINCRBY', KEYS[2 * i], ARGV[a + 1], 1)
      redis.call('EXPIRE', KEYS[2 * i], ttl)
    end
  end
end
return applied
"""
