-- One client's job slots in Redis, for a plan enforced by a fleet of servers (server mode of
-- ConcurrencyLimitByPlan), on Redis's own clock. Apart from slots.lua (a client's own plan).
--
-- KEYS[1]  sorted set of the client's slots held: member -> lease expiry (microseconds).
--          Members are 'c:<n>' (a create sent, not yet answered), 'u:<n>' (its outcome
--          unknown: the application may have made a job) and 'j:<job id>'.
-- KEYS[2]  sorted set of ids completed while a create was in flight, before an answer
--          showed them: id -> when it is forgotten; at most 8.
-- ARGV[1]  op, then by op:
--   take      limit, lease, member    -> {1, 0} taken, or {0, held}: the client holds `held`
--                                        slots, its plan's limit or more
--   failed    member                  (the create made nothing)
--   unknown   member, lease           (the create's outcome is unknown)
--   bind      member, id, lease, ended (the create made job id; `ended` 1 if its answer
--                                        showed it terminal) -> {1, 1} held, {1, 0} ended
--   end       id, lease, remember     -> {1, 1} a held job ended, {1, 0} none (remembered,
--                                        with `remember` 1, while a create is in flight)
--   reconcile age, lease, id...       (the client's jobs running as of `age` ago: other jobs
--                                        and unknown outcomes taken before then are given back)
--   held                              -> {1, held}
-- Every reply is two integers, as the store's other scripts answer.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local held, early, op = KEYS[1], KEYS[2], ARGV[1]

local function int(x)
  return string.format('%.0f', x)
end

local function keep(lease)
  local ttl = math.ceil(lease / 1000) + 1000
  for _, key in ipairs({held, early}) do
    local left = redis.call('PTTL', key)
    if left ~= -2 and left < ttl then
      redis.call('PEXPIRE', key, int(ttl))
    end
  end
end

redis.call('ZREMRANGEBYSCORE', held, '-inf', int(now))
redis.call('ZREMRANGEBYSCORE', early, '-inf', int(now))

if op == 'take' then
  local limit, lease, member = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
  local count = redis.call('ZCARD', held)
  if count >= limit then
    return {0, count}
  end
  redis.call('ZADD', held, int(now + lease), 'c:' .. member)
  keep(lease)
  return {1, 0}
elseif op == 'failed' then
  redis.call('ZREM', held, 'c:' .. ARGV[2])
  return {1, 0}
elseif op == 'unknown' then
  local member, lease = ARGV[2], tonumber(ARGV[3])
  if redis.call('ZREM', held, 'c:' .. member) == 1 then
    redis.call('ZADD', held, int(now + lease), 'u:' .. member)
    keep(lease)
  end
  return {1, 0}
elseif op == 'bind' then
  local member, id, lease, ended = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5] == '1'
  if redis.call('ZREM', held, 'c:' .. member) == 0 then
    -- Its lease ran out meanwhile: nothing held to bind.
    return {1, 0}
  end
  if ended or redis.call('ZREM', early, id) == 1 then
    return {1, 0}
  end
  if redis.call('ZADD', held, int(now + lease), 'j:' .. id) == 0 then
    -- The same job again (a replayed create): one slot, its lease renewed.
    keep(lease)
    return {1, 0}
  end
  keep(lease)
  return {1, 1}
elseif op == 'end' then
  local id, lease = ARGV[2], tonumber(ARGV[3])
  if redis.call('ZREM', held, 'j:' .. id) == 1 then
    return {1, 1}
  end
  if ARGV[4] ~= '1' then
    return {1, 0}
  end
  local creates = redis.call('ZRANGE', held, 0, -1)
  for _, member in ipairs(creates) do
    if string.sub(member, 1, 2) == 'c:' then
      redis.call('ZADD', early, int(now + lease), id)
      local extra = redis.call('ZCARD', early) - 8
      if extra > 0 then
        redis.call('ZREMRANGEBYRANK', early, 0, extra - 1)
      end
      keep(lease)
      break
    end
  end
  return {1, 0}
elseif op == 'reconcile' then
  -- A hold whose lease began (score - lease) after the list was read is left alone.
  local listed, lease = now - tonumber(ARGV[2]), tonumber(ARGV[3])
  local active = {}
  for i = 4, #ARGV do
    active['j:' .. ARGV[i]] = true
  end
  local holds = redis.call('ZRANGE', held, 0, -1, 'WITHSCORES')
  for i = 1, #holds, 2 do
    local member, taken = holds[i], tonumber(holds[i + 1]) - lease
    local kind = string.sub(member, 1, 2)
    if taken < listed and (kind == 'u:' or (kind == 'j:' and not active[member])) then
      redis.call('ZREM', held, member)
    end
  end
  return {1, 0}
elseif op == 'held' then
  return {1, redis.call('ZCARD', held)}
end
return redis.error_reply('unknown op ' .. tostring(op))
