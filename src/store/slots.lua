-- A plan's job slots in Redis, on Redis's own clock.
--
-- KEYS[1]  sorted set of slots held: member -> lease expiry (microseconds). Members are
--          'c:<token>' (a create sent, its job id not known yet) and 'j:<job id>'.
-- ARGV[1]  op, ARGV[2] channel, then by op:
--   acquire   limit, lease, member          -> {1, 0} taken, or {0, wait until a lease ends}
--   bind      token member, job id, lease   (the create made this job)
--   remove    member, message               (published if the member held a slot)
--   active    job id, lease                 (a job seen active: holds a slot if not yet)
--   reconcile age, lease, active ids...     (every job the server counts, as listed `age`
--                                            ago: older holds not in it are gone)
-- Every slot given back publishes a message on the channel: 'released', or 'done:<id>' for a
-- job, so that the process holding it locally lets it go too.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local held, op, channel = KEYS[1], ARGV[1], ARGV[2]

local function int(x)
  return string.format('%.0f', x)
end

local function keep(lease)
  redis.call('PEXPIRE', held, math.ceil(lease / 1000) + 1000)
end

redis.call('ZREMRANGEBYSCORE', held, '-inf', int(now))

if op == 'acquire' then
  local limit, lease, member = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  if redis.call('ZCARD', held) < limit then
    redis.call('ZADD', held, int(now + lease), member)
    keep(lease)
    return {1, 0}
  end
  local first = redis.call('ZRANGE', held, 0, 0, 'WITHSCORES')
  return {0, math.max(tonumber(first[2]) - now, 1)}
elseif op == 'bind' then
  local token, job, lease = ARGV[3], 'j:' .. ARGV[4], tonumber(ARGV[5])
  redis.call('ZREM', held, token)
  if redis.call('ZADD', held, 'NX', int(now + lease), job) == 0 then
    redis.call('PUBLISH', channel, 'released')
  end
  keep(lease)
elseif op == 'remove' then
  if redis.call('ZREM', held, ARGV[3]) == 1 then
    redis.call('PUBLISH', channel, ARGV[4])
  end
elseif op == 'active' then
  local lease = tonumber(ARGV[4])
  redis.call('ZADD', held, 'NX', int(now + lease), 'j:' .. ARGV[3])
  keep(lease)
elseif op == 'reconcile' then
  local as_of, lease = now - tonumber(ARGV[3]), tonumber(ARGV[4])
  local active = {}
  for i = 5, #ARGV do
    active['j:' .. ARGV[i]] = true
  end
  local holds = redis.call('ZRANGE', held, 0, -1, 'WITHSCORES')
  for i = 1, #holds, 2 do
    local member, taken = holds[i], tonumber(holds[i + 1]) - lease
    if taken < as_of and not active[member] then
      redis.call('ZREM', held, member)
      if string.sub(member, 1, 2) == 'j:' then
        redis.call('PUBLISH', channel, 'done:' .. string.sub(member, 3))
      else
        redis.call('PUBLISH', channel, 'released')
      end
    end
  end
  for member in pairs(active) do
    redis.call('ZADD', held, 'NX', int(now + lease), member)
  end
  keep(lease)
end
return {1, 0}
