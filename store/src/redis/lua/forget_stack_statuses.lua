-- Forgets the statuses of some environments for an edge stack.
-- ARGV: stack id, its status hash, its counts hash, env key prefix (as in
--       record_stack_statuses.lua), then the env ids.
-- Reply: how many there were.
local base, counts, envs = ARGV[2], ARGV[3], ARGV[4]
local forgotten = 0
for i = 5, #ARGV do
  local env = ARGV[i]
  local old = redis.call('HGET', base, env)
  if old then
    local oc, ov = string.match(old, '^(%d+)|(%d+)|')
    redis.call('ZREM', base .. ':by:' .. oc, env)
    redis.call('ZREM', base .. ':all', env)
    if redis.call('HINCRBY', counts, oc .. ':' .. ov, -1) <= 0 then
      redis.call('HDEL', counts, oc .. ':' .. ov)
    end
    redis.call('HDEL', base, env)
    forgotten = forgotten + 1
  end
  redis.call('SREM', envs .. env, ARGV[1])
end
return forgotten
