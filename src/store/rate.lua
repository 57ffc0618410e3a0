-- The rate limits of one route (or one route and client key) in Redis, on Redis's own clock:
-- one or several quotas, which a request takes its place in all at once, or in none.
--
-- KEYS[1]  set while the route is closed by a server's 429
-- then, for each quota q (from 0), KEYS[2 + 3q] to KEYS[4 + 3q]:
--          a sorted set of places held: member -> until when (microseconds)
--          (sliding window: every request holding a place; GCRA: requests in flight);
--          GCRA's theoretical arrival time (microseconds);
--          a server's sliding window for one client: units per bucket of a sixteenth of the
--          period (a hash: bucket index -> count), a few bytes at any quota
-- ARGV     op ('acquire' | 'hit' | 'release' | 'abandon' | 'cancel' | 'correct'), in-flight
--          lease (microseconds), member, span (release: how long a 429 closes the route, 0
--          for none; abandon: how long the request is held as in flight; correct: when the
--          request was counted, on this clock), channel, number of quotas,
--          then for each quota 9 arguments: algorithm ('window' | 'gcra'), count, period,
--          margin, interval, burst (times in microseconds), whether a request may cost other
--          than one unit (1 or 0), units the request took, units it turned out to cost
--          (release, correct; the same otherwise)
--
-- Returns {admitted (1 or 0), wait in microseconds (-1: until a response)}; an admitted `hit`
-- returns {1, reset in microseconds, remaining} of the first quota, for the response's
-- `RateLimit` field, and the time it was counted.
--
-- The semantics are the in-memory limiter's (see `limiter`): a client's request holds its
-- units from its send until `period + margin` after its response (sliding window), or is
-- counted its units' intervals ahead while in flight and pushes the TAT that many intervals
-- past its response (GCRA); a server's request (`hit`) is counted once, at once. A place held
-- by a request in flight expires after the lease, so a process that dies frees what it held. A
-- request given up on after its send (`abandon`) counts as answered at the end of its hold;
-- one never sent (`cancel`) gives its place back as if it had never taken it. A request that
-- costs more than one unit holds a place named `member#units`; one whose cost is corrected
-- when answered holds its true cost from then on.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local op, lease, base_member = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local span, channel, n = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local block_key = KEYS[1]

local quotas = {}
for q = 0, n - 1 do
  local a = 7 + 9 * q
  local quota = {
    algorithm = ARGV[a],
    count = tonumber(ARGV[a + 1]),
    period = tonumber(ARGV[a + 2]),
    margin = tonumber(ARGV[a + 3]),
    interval = tonumber(ARGV[a + 4]),
    burst = tonumber(ARGV[a + 5]),
    -- Only a quota whose requests may cost other than one unit has places of several units.
    weighted = ARGV[a + 6] == '1',
    units = tonumber(ARGV[a + 7]),
    cost = tonumber(ARGV[a + 8]),
    holders = KEYS[2 + 3 * q],
    tat_key = KEYS[3 + 3 * q],
    buckets = KEYS[4 + 3 * q],
  }
  -- A cost counts as at most the quota's capacity (its count, or a paced quota's burst): a
  -- garbage usage figure closes the quota for a period at most.
  local capacity = quota.count
  if quota.algorithm == 'gcra' then
    capacity = quota.burst
  end
  quota.cost = math.min(quota.cost, capacity)
  -- Keys expire once nothing in them can matter any more.
  quota.idle_ms = math.ceil((lease + quota.period + quota.margin
    + quota.interval * math.max(quota.burst, quota.units)) / 1000) + 1000
  quotas[q + 1] = quota
end

-- Numbers are formatted by hand: Lua's default keeps 14 digits, and these have 16.
local function int(x)
  return string.format('%.0f', x)
end

-- The name of a place of `units`: the request's own, with its units if more than one.
local function named(units)
  if units == 1 then
    return base_member
  end
  return base_member .. '#' .. units
end

-- The units a place holds, from its name.
local function units_of(member)
  local units = string.match(member, '#(%d+)$')
  if units then
    return tonumber(units)
  end
  return 1
end

-- A sliding window's place held by a request in flight ends on an odd microsecond, one whose
-- end is known (answered, or abandoned until a known time) on an even one: a request waiting
-- for it then knows whether to wait for a release or for a time.
local function in_flight_until(x)
  return x - x % 2 + 1
end
local function settled_until(x)
  return x - x % 2
end

-- Keeps `key` at least `ms` longer, never shortening what an earlier hold asked for.
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

local function get_tat(quota)
  return tonumber(redis.call('GET', quota.tat_key) or '0')
end

-- Stores a TAT, kept until it lies in the past, and the usual idle time.
local function set_tat(quota, tat)
  local ms = math.max(quota.idle_ms, math.ceil((tat - now) / 1000) + 1000)
  redis.call('SET', quota.tat_key, int(tat), 'PX', ms)
end

-- The places held at `quota` now, oldest end first, and their units: every member is read
-- only when a place may hold more than one unit.
local function held(quota)
  redis.call('ZREMRANGEBYSCORE', quota.holders, '-inf', int(now))
  if quota.weighted then
    local raw = redis.call('ZRANGE', quota.holders, 0, -1, 'WITHSCORES')
    local places, total = {}, 0
    for i = 1, #raw, 2 do
      local units = units_of(raw[i])
      places[#places + 1] = {tonumber(raw[i + 1]), units}
      total = total + units
    end
    return total, places
  end
  return redis.call('ZCARD', quota.holders), nil
end

-- When the `needed`-th unit held at `quota` frees up (oldest end first).
local function frees_at(quota, needed, places)
  if places == nil then
    local raw = redis.call('ZRANGE', quota.holders, needed - 1, needed - 1, 'WITHSCORES')
    return tonumber(raw[2])
  end
  local freed = 0
  for _, place in ipairs(places) do
    freed = freed + place[2]
    if freed >= needed then
      return place[1]
    end
  end
  return nil
end

if op == 'cancel' then
  -- Admitted but never sent: the places are given back as if they had never been taken.
  local released = false
  for _, quota in ipairs(quotas) do
    if redis.call('ZREM', quota.holders, named(quota.units)) == 1 then
      released = true
    end
  end
  if released then
    redis.call('PUBLISH', channel, 'released')
  end
  return {1, 0}
end

-- Counts a request answered at `answered` with its true cost in `quota`.
local function answer(quota, answered, hold_until)
  local member = named(quota.units)
  -- A request that took nothing has no place to find: what it turned out to cost is counted
  -- all the same.
  local took_nothing = quota.units == 0
  if quota.algorithm == 'window' then
    if took_nothing or redis.call('ZSCORE', quota.holders, member) then
      if not took_nothing and quota.cost ~= quota.units then
        redis.call('ZREM', quota.holders, member)
      end
      if quota.cost > 0 then
        redis.call('ZADD', quota.holders, int(hold_until), named(quota.cost))
      end
      extend(quota.holders, math.max(quota.idle_ms, math.ceil((hold_until - now) / 1000) + 1000))
    end
  elseif (took_nothing or redis.call('ZREM', quota.holders, member) == 1) and quota.cost > 0 then
    local tat = get_tat(quota)
    tat = math.max(tat, answered + quota.margin) + quota.interval * quota.cost
    set_tat(quota, tat)
  end
end

if op == 'abandon' then
  -- Given up on after its send: the server may still count it until the hold ends, so it
  -- holds its places as if answered then.
  local answered = now + span
  for _, quota in ipairs(quotas) do
    answer(quota, answered, settled_until(answered + quota.period + quota.margin))
  end
  redis.call('PUBLISH', channel, 'released')
  return {1, 0}
end

if op == 'release' then
  if span > 0 then
    local block_ms = math.ceil(span / 1000)
    if redis.call('PTTL', block_key) < block_ms then
      redis.call('SET', block_key, '1', 'PX', block_ms)
    end
  end
  for _, quota in ipairs(quotas) do
    answer(quota, now, settled_until(now + quota.period + quota.margin))
  end
  redis.call('PUBLISH', channel, 'released')
  return {1, 0}
end

-- A server's client, in 16 buckets of a sixteenth of the period, as in memory (see
-- `limiter::keyed`): the buckets still counted, oldest first, and their total.
local function bucket_width(quota)
  return math.ceil(quota.period / 16)
end
local function counted(quota)
  local w = bucket_width(quota)
  local index = math.floor(now / w)
  local buckets, total, stale = {}, 0, {}
  local raw = redis.call('HGETALL', quota.buckets)
  for i = 1, #raw, 2 do
    local b, units = tonumber(raw[i]), tonumber(raw[i + 1])
    if b < index - 16 then
      stale[#stale + 1] = raw[i]
    else
      buckets[#buckets + 1] = {b, units}
      total = total + units
    end
  end
  if #stale > 0 then
    redis.call('HDEL', quota.buckets, unpack(stale))
  end
  table.sort(buckets, function(x, y) return x[1] < y[1] end)
  return buckets, total, index, w
end

if op == 'correct' then
  -- A server's request counted at `span` turned out to cost `cost`: the difference is
  -- counted from now on (more), or given back in the bucket it was counted in, or older ones
  -- (less), so that no unit counts for less time than it should.
  for _, quota in ipairs(quotas) do
    local diff = quota.cost - quota.units
    if quota.algorithm == 'window' and diff ~= 0 then
      local buckets, _, index, w = counted(quota)
      if diff > 0 then
        redis.call('HINCRBY', quota.buckets, int(index), diff)
        redis.call('PEXPIRE', quota.buckets, math.ceil(17 * w / 1000) + 1000)
      else
        local left = -diff
        local at = math.floor(span / w)
        for i = #buckets, 1, -1 do
          local bucket = buckets[i]
          if left > 0 and bucket[1] <= at and bucket[2] > 0 then
            local take = math.min(left, bucket[2])
            redis.call('HINCRBY', quota.buckets, int(bucket[1]), -take)
            left = left - take
          end
        end
      end
    elseif diff ~= 0 then
      -- More is counted whether or not the TAT is still kept; less only from one that is.
      local tat = get_tat(quota)
      if diff > 0 or tat > now then
        tat = math.max(tat, now) + diff * quota.interval
        if tat > now then
          set_tat(quota, tat)
        else
          redis.call('DEL', quota.tat_key)
        end
      end
    end
  end
  return {1, 0}
end

local blocked = redis.call('PTTL', block_key)
if blocked > 0 then
  return {0, blocked * 1000}
end

-- Whether `quota` admits the request now: nil if so, else the wait (-1: until a release).
-- What it decided is kept in `quota` for `take`.
local function check(quota)
  -- What costs nothing takes nothing, but is held back by a full quota (a cost corrected
  -- upwards) as a request of one unit would be.
  local units = math.max(quota.units, 1)
  if op == 'hit' and quota.algorithm == 'window' then
    local buckets, total, index, w = counted(quota)
    quota.index, quota.w, quota.total, quota.oldest = index, w, total, buckets[1]
    if total + units <= quota.count then
      return nil
    end
    -- Refused: admitted once the oldest buckets free enough.
    local freed = 0
    for _, bucket in ipairs(buckets) do
      freed = freed + bucket[2]
      if total - freed + units <= quota.count then
        return math.max((bucket[1] + 17) * w - now, 1)
      end
    end
    return 1
  end
  if op == 'hit' then
    local tat = get_tat(quota)
    local base = math.max(tat, now)
    local admit_at = base + (units - 1) * quota.interval - (quota.burst - 1) * quota.interval
    quota.base = base
    if admit_at <= now then
      return nil
    end
    return admit_at - now
  end
  local total, places = held(quota)
  if quota.algorithm == 'window' then
    if total + units <= quota.count then
      return nil
    end
    -- The place that frees the last unit needed is ours. One held by a request in flight
    -- frees at its response, which may come at any moment: the lease is only an upper
    -- bound, so the wait is "until a release", which wakes waiters, rather than a time that
    -- would turn a short wait into a refusal. One answered or abandoned frees at a known time.
    local at = frees_at(quota, total + units - quota.count, places)
    if at == nil or (at % 2 == 1 and at - quota.period - quota.margin > now) then
      return -1
    end
    return math.max(at - now, 1)
  end
  local slack = quota.burst - units - total
  if slack < 0 then
    return -1
  end
  local admit_at = get_tat(quota) - slack * quota.interval
  if admit_at <= now then
    return nil
  end
  return admit_at - now
end

-- Takes the request's units at `quota`, which admitted it.
local function take(quota)
  local units = quota.units
  if units == 0 then
    return
  end
  if op == 'hit' and quota.algorithm == 'window' then
    redis.call('HINCRBY', quota.buckets, int(quota.index), units)
    redis.call('PEXPIRE', quota.buckets, math.ceil(17 * quota.w / 1000) + 1000)
    return
  end
  if op == 'hit' then
    local tat = quota.base + units * quota.interval
    -- A server's client holds nothing in flight: kept until its TAT lies in the past.
    redis.call('SET', quota.tat_key, int(tat), 'PX', int(math.ceil((tat - now) / 1000) + 1000))
    quota.tat = tat
    return
  end
  local hold = now + lease
  if quota.algorithm == 'window' then
    hold = in_flight_until(now + lease + quota.period + quota.margin)
  end
  redis.call('ZADD', quota.holders, int(hold), named(units))
  extend(quota.holders, quota.idle_ms)
end

-- Every quota must admit the request; the wait is the latest any quota names, or, when
-- none names a time, until a release.
local wait = nil
for _, quota in ipairs(quotas) do
  local w = check(quota)
  if w ~= nil and (wait == nil or wait == -1 or (w ~= -1 and w > wait)) then
    wait = w
  end
end
if wait ~= nil then
  return {0, wait}
end
for _, quota in ipairs(quotas) do
  take(quota)
end
if op ~= 'hit' then
  return {1, 0}
end
-- What remains of the first quota, and when: everything counted is gone, or (none left) a
-- place frees.
local first = quotas[1]
if first.algorithm == 'window' then
  local total = first.total + first.units
  local remaining, reset = math.max(0, first.count - total), (first.index + 17) * first.w - now
  if remaining == 0 and first.oldest then
    reset = (first.oldest[1] + 17) * first.w - now
  end
  return {1, int(reset), remaining, int(now)}
end
local tat, interval, burst = first.tat or first.base, first.interval, first.burst
local remaining = math.max(0, math.floor((now + burst * interval - tat) / interval))
local reset = tat - now
if remaining == 0 then
  reset = tat - (burst - 1) * interval - now
end
return {1, int(reset), remaining, int(now)}
