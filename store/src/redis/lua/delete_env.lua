-- Deletes an environment with everything that is its: record, binding, heartbeat, snapshot,
-- commands, and its places in static edge groups.
-- KEYS: environments hash, bindings hash, heartbeats sorted set, its snapshot, its commands
--       hash, its command ids, its finished ids, its set of edge groups, its set of edge
--       stacks with a status.
-- ARGV: env id, edge group members key prefix (+ group id), stack status key prefix (+ stack
--       id: as in record_stack_statuses.lua), stack counts key prefix (+ stack id).
-- Reply: 1 if it existed, else 0.
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
for _, group in ipairs(redis.call('SMEMBERS', KEYS[8])) do
  redis.call('ZREM', ARGV[2] .. group, ARGV[1])
end
redis.call('DEL', KEYS[8])
for _, stack in ipairs(redis.call('SMEMBERS', KEYS[9])) do
  local base, counts = ARGV[3] .. stack, ARGV[4] .. stack
  local old = redis.call('HGET', base, ARGV[1])
  if old then
    local oc, ov = string.match(old, '^(%d+)|(%d+)|')
    redis.call('ZREM', base .. ':by:' .. oc, ARGV[1])
    redis.call('ZREM', base .. ':all', ARGV[1])
    if redis.call('HINCRBY', counts, oc .. ':' .. ov, -1) <= 0 then
      redis.call('HDEL', counts, oc .. ':' .. ov)
    end
    redis.call('HDEL', base, ARGV[1])
  end
end
redis.call('DEL', KEYS[9])
return removed
