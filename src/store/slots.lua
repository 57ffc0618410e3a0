-- A plan's job slots in Redis, on Redis's own clock.
--
-- KEYS[1]  sorted set of slots held: member -> lease expiry (microseconds). Members are
--          'c:<n>' (a create sent, its outcome not known yet), 'u:<n>' (the same create, whose
--          outcome will never be read: the server may have made a job) and 'j:<job id>'.
-- KEYS[2]  sorted set of the jobs known to be over: id -> when it is forgotten. Bounded in
--          time (the lease) and count (ARGV[3]), so that a job completed before its create
--          was bound, or listed active by a stale list, never takes a slot again.
-- KEYS[3]  hash of when each slot held was taken (microseconds): what a reconcile judges a
--          hold's age by, whatever lease the process that took it uses.
-- ARGV[1]  op, ARGV[2] channel, ARGV[3] how many finished ids are remembered, then by op:
--   acquire   limit, lease, member[, n]     -> {1, 0} taken, or {0, wait until a lease ends}:
--                                            n slots at once (default 1), held as member,
--                                            member/2 .. member/n (a batch create), or none
--   bind      member, job id, lease[, member, job id]...
--                                           (each create slot made this job)
--   unknown   member, lease[, member]...    (the creates' outcome will never be read)
--   release   member...                     (creates over without a job)
--   remove    member, message               (published if the member held a slot)
--   active    job id, lease                 (a job seen active: holds a slot if not yet)
--   reconcile age, lease, active ids...     (every job the server counts, as listed at the
--                                            latest `age` ago: older jobs and unknown
--                                            outcomes not in it are gone; creates in flight
--                                            cannot be in a list, and are never touched)
-- Every slot given back publishes a message on the channel: 'released', or 'done:<id>' for a
-- job, so that the process holding it locally lets it go too.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local held, done, since, op, channel = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2]
local remembered = tonumber(ARGV[3])

local function int(x)
  return string.format('%.0f', x)
end

-- Keeps the keys at least a lease longer, never shortening what a process with a longer
-- lease asked for.
local function keep(lease)
  local ttl = math.ceil(lease / 1000) + 1000
  for _, key in ipairs({held, done, since}) do
    local left = redis.call('PTTL', key)
    if left ~= -2 and left < ttl then
      redis.call('PEXPIRE', key, int(ttl))
    end
  end
end

-- `member` holds a slot, taken now, until `lease` from now (if it holds none yet).
local function hold(member, lease)
  if redis.call('ZADD', held, 'NX', int(now + lease), member) == 1 then
    redis.call('HSET', since, member, int(now))
    return true
  end
  return false
end

-- `member` gives its slot back.
local function unhold(member)
  redis.call('HDEL', since, member)
  return redis.call('ZREM', held, member) == 1
end

local function is_done(id)
  return redis.call('ZSCORE', done, id) ~= false
end

-- Job `id` is over: remembered for `lease`, the oldest forgotten past the bound.
local function remember_done(id, lease)
  redis.call('ZADD', done, int(now + lease), id)
  local extra = redis.call('ZCARD', done) - remembered
  if extra > 0 then
    redis.call('ZREMRANGEBYRANK', done, 0, extra - 1)
  end
end

for _, member in ipairs(redis.call('ZRANGEBYSCORE', held, '-inf', int(now))) do
  unhold(member)
end
redis.call('ZREMRANGEBYSCORE', done, '-inf', int(now))

if op == 'acquire' then
  local limit, lease, member = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
  local n = tonumber(ARGV[7] or '1')
  local count = redis.call('ZCARD', held)
  if count + n <= limit then
    hold(member, lease)
    for k = 2, n do
      hold(member .. '/' .. k, lease)
    end
    keep(lease)
    return {1, 0}
  end
  -- The holds that must end before n are free: wait for the earliest of them (at least).
  local first = redis.call('ZRANGE', held, 0, 0, 'WITHSCORES')
  local wait = 1
  if first[2] then
    wait = math.max(tonumber(first[2]) - now, 1)
  end
  return {0, wait}
elseif op == 'bind' then
  local lease = tonumber(ARGV[6])
  local function bind(token, id)
    unhold(token)
    if is_done(id) then
      -- Completed before its create was bound (a webhook faster than the create's answer):
      -- the slot is free, and the creator lets go of the job it just bound.
      redis.call('PUBLISH', channel, 'done:' .. id)
    elseif not hold('j:' .. id, lease) then
      redis.call('PUBLISH', channel, 'released')
    end
  end
  bind(ARGV[4], ARGV[5])
  for i = 7, #ARGV - 1, 2 do
    bind(ARGV[i], ARGV[i + 1])
  end
  keep(lease)
elseif op == 'unknown' then
  local lease = tonumber(ARGV[5])
  local function unknown(token)
    if unhold(token) then
      hold('u:' .. string.sub(token, 3), lease)
    end
  end
  unknown(ARGV[4])
  for i = 6, #ARGV do
    unknown(ARGV[i])
  end
  keep(lease)
elseif op == 'release' then
  for i = 4, #ARGV do
    if unhold(ARGV[i]) then
      redis.call('PUBLISH', channel, 'released')
    end
  end
elseif op == 'remove' then
  local member = ARGV[4]
  local removed = unhold(member)
  if string.sub(member, 1, 2) == 'j:' then
    local lease = tonumber(ARGV[6])
    remember_done(string.sub(member, 3), lease)
    keep(lease)
  end
  if removed then
    redis.call('PUBLISH', channel, ARGV[5])
  end
elseif op == 'active' then
  local id, lease = ARGV[4], tonumber(ARGV[5])
  if is_done(id) then
    -- A stale sighting: whoever took it locally lets it go.
    redis.call('PUBLISH', channel, 'done:' .. id)
  else
    hold('j:' .. id, lease)
    keep(lease)
  end
elseif op == 'reconcile' then
  local as_of, lease = now - tonumber(ARGV[4]), tonumber(ARGV[5])
  local active = {}
  for i = 6, #ARGV do
    active[ARGV[i]] = true
  end
  local holds = redis.call('ZRANGE', held, 0, -1, 'WITHSCORES')
  for i = 1, #holds, 2 do
    local member = holds[i]
    local taken = tonumber(redis.call('HGET', since, member) or holds[i + 1])
    local kind, name = string.sub(member, 1, 2), string.sub(member, 3)
    if taken < as_of and kind == 'j:' and not active[name] then
      unhold(member)
      remember_done(name, lease)
      redis.call('PUBLISH', channel, 'done:' .. name)
    elseif taken < as_of and kind == 'u:' then
      unhold(member)
      redis.call('PUBLISH', channel, 'released')
    end
  end
  for id in pairs(active) do
    if is_done(id) then
      redis.call('PUBLISH', channel, 'done:' .. id)
    else
      hold('j:' .. id, lease)
    end
  end
  keep(lease)
end
return {1, 0}
