-- One rate limit (a route, or a route and client key) in Redis, on Redis's own clock.
--
-- KEYS[1]  sorted set of places held: member -> until when (microseconds)
--          (sliding window: every request holding a place; GCRA: requests in flight)
-- KEYS[2]  GCRA's theoretical arrival time (microseconds)
-- KEYS[3]  set while the route is closed by a server's 429
-- KEYS[4]  a server's sliding window for one client: requests per bucket of a sixteenth of
--          the period (a hash: bucket index -> count), a few bytes at any quota
-- ARGV     op ('acquire' | 'hit' | 'release' | 'abandon' | 'cancel'), algorithm ('window' |
--          'gcra'), count, period, margin, interval, burst, in-flight lease (all times in
--          microseconds), member, span (release: how long a 429 closes the route, 0 for none;
--          abandon: how long the request is held as in flight), channel
--
-- Returns {admitted (1 or 0), wait in microseconds (-1: until a response)}; an admitted `hit`
-- returns {1, reset in microseconds, remaining}, for the response's `RateLimit` field.
--
-- The semantics are the in-memory limiter's (see `limiter`): a client's request holds its
-- place from its send until `period + margin` after its response (sliding window), or is
-- counted one emission interval ahead while in flight and pushes the TAT one interval past
-- its response (GCRA); a server's request (`hit`) is counted once, at once. A place held by a
-- request in flight expires after the lease, so a process that dies frees what it held. A
-- request given up on after its send (`abandon`) counts as answered at the end of its hold;
-- one never sent (`cancel`) gives its place back as if it had never taken it.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local op, algorithm = ARGV[1], ARGV[2]
local count, period, margin = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local interval, burst, lease = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local member = ARGV[9]
local holders, tat_key, block_key = KEYS[1], KEYS[2], KEYS[3]
-- Keys expire once nothing in them can matter any more.
local idle_ms = math.ceil((lease + period + margin + interval * burst) / 1000) + 1000

-- Numbers are formatted by hand: Lua's default keeps 14 digits, and these have 16.
local function int(x)
  return string.format('%.0f', x)
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

-- How long a TAT must be kept: until it lies in the past, and the usual idle time.
local function tat_ms(tat)
  return math.max(idle_ms, math.ceil((tat - now) / 1000) + 1000)
end

if op == 'cancel' then
  -- Admitted but never sent: the place is given back as if it had never been taken.
  if redis.call('ZREM', holders, member) == 1 then
    redis.call('PUBLISH', ARGV[11], 'released')
  end
  return {1, 0}
end

if op == 'abandon' then
  -- Given up on after its send: the server may still count it until the hold ends, so it
  -- holds its place as if answered then.
  local answered = now + tonumber(ARGV[10])
  if algorithm == 'window' then
    if redis.call('ZSCORE', holders, member) then
      local held = settled_until(answered + period + margin)
      redis.call('ZADD', holders, int(held), member)
      extend(holders, math.ceil((held - now) / 1000) + 1000)
    end
  elseif redis.call('ZREM', holders, member) == 1 then
    -- Pushed now from the end of the hold: as safe as counting it in flight until then.
    local tat = tonumber(redis.call('GET', tat_key) or '0')
    tat = math.max(tat, answered + margin) + interval
    redis.call('SET', tat_key, int(tat), 'PX', tat_ms(tat))
  end
  redis.call('PUBLISH', ARGV[11], 'released')
  return {1, 0}
end

if op == 'release' then
  local block = tonumber(ARGV[10])
  if block > 0 then
    local block_ms = math.ceil(block / 1000)
    if redis.call('PTTL', block_key) < block_ms then
      redis.call('SET', block_key, '1', 'PX', block_ms)
    end
  end
  if algorithm == 'window' then
    if redis.call('ZSCORE', holders, member) then
      redis.call('ZADD', holders, int(settled_until(now + period + margin)), member)
      extend(holders, idle_ms)
    end
  elseif redis.call('ZREM', holders, member) == 1 then
    local tat = tonumber(redis.call('GET', tat_key) or '0')
    tat = math.max(tat, now + margin) + interval
    redis.call('SET', tat_key, int(tat), 'PX', tat_ms(tat))
  end
  redis.call('PUBLISH', ARGV[11], 'released')
  return {1, 0}
end

local blocked = redis.call('PTTL', block_key)
if blocked > 0 then
  return {0, blocked * 1000}
end
redis.call('ZREMRANGEBYSCORE', holders, '-inf', int(now))

if op == 'hit' and algorithm == 'window' then
  -- A server's client: counts in 16 buckets of a sixteenth of the period, as in memory (see
  -- `limiter::keyed`), so a client costs the same few bytes at any quota. A request counts
  -- for its bucket and the 16 after it; it is admitted while fewer than `count` are counted.
  local buckets = KEYS[4]
  local w = math.ceil(period / 16)
  local index = math.floor(now / w)
  local counted, total, stale = {}, 0, {}
  local raw = redis.call('HGETALL', buckets)
  for i = 1, #raw, 2 do
    local b, n = tonumber(raw[i]), tonumber(raw[i + 1])
    if b < index - 16 then
      stale[#stale + 1] = raw[i]
    else
      counted[#counted + 1] = {b, n}
      total = total + n
    end
  end
  if #stale > 0 then
    redis.call('HDEL', buckets, unpack(stale))
  end
  table.sort(counted, function(x, y) return x[1] < y[1] end)
  if total < count then
    redis.call('HINCRBY', buckets, int(index), 1)
    redis.call('PEXPIRE', buckets, math.ceil(17 * w / 1000) + 1000)
    -- What remains, and when: everything counted is gone, or (none left) a place frees.
    local remaining, reset = count - total - 1, (index + 17) * w - now
    if remaining == 0 and counted[1] then
      reset = (counted[1][1] + 17) * w - now
    end
    return {1, int(reset), remaining}
  end
  -- Refused: admitted once the oldest buckets free enough.
  local freed = 0
  for _, bucket in ipairs(counted) do
    freed = freed + bucket[2]
    if total - freed < count then
      return {0, math.max((bucket[1] + 17) * w - now, 1)}
    end
  end
  return {0, 1}
end

if algorithm == 'window' then
  local n = redis.call('ZCARD', holders)
  if n < count then
    local hold = now + period
    if op ~= 'hit' then
      hold = in_flight_until(now + lease + period + margin)
    end
    redis.call('ZADD', holders, int(hold), member)
    extend(holders, idle_ms)
    if op == 'hit' then
      -- What remains, and when: everything counted is gone, or (none left) a place frees.
      local remaining, reset = count - n - 1, period
      if remaining == 0 then
        reset = tonumber(redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')[2]) - now
      end
      return {1, int(reset), remaining}
    end
    return {1, 0}
  end
  -- The (n - count + 1)-th place to free up is ours. One held by a request in flight frees
  -- at its response, which may come at any moment: the lease is only an upper bound, so the
  -- wait is "until a release", which wakes waiters, rather than a time that would turn a
  -- short wait into a refusal. One answered or abandoned frees at a known time.
  local at = tonumber(redis.call('ZRANGE', holders, n - count, n - count, 'WITHSCORES')[2])
  if at % 2 == 1 and at - period - margin > now then
    return {0, -1}
  end
  return {0, math.max(at - now, 1)}
end

local tat = tonumber(redis.call('GET', tat_key) or '0')
if op == 'hit' then
  local base = math.max(tat, now)
  local admit_at = base - (burst - 1) * interval
  if admit_at <= now then
    tat = base + interval
    -- A server's client holds nothing in flight: kept until its TAT lies in the past.
    redis.call('SET', tat_key, int(tat), 'PX', int(math.ceil((tat - now) / 1000) + 1000))
    local remaining = math.max(0, math.floor((now + burst * interval - tat) / interval))
    local reset = tat - now
    if remaining == 0 then
      reset = tat - (burst - 1) * interval - now
    end
    return {1, int(reset), remaining}
  end
  return {0, admit_at - now}
end
local in_flight = redis.call('ZCARD', holders)
local slack = burst - 1 - in_flight
if slack < 0 then
  return {0, -1}
end
local admit_at = tat - slack * interval
if admit_at <= now then
  redis.call('ZADD', holders, int(now + lease), member)
  extend(holders, idle_ms)
  return {1, 0}
end
return {0, admit_at - now}
