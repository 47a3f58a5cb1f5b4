-- Deletes an environment with everything that is its: record, binding, heartbeat, snapshot,
-- commands, and its places in static edge groups.
-- KEYS: environments hash, bindings hash, heartbeats sorted set, its snapshot, its commands
--       hash, its command ids, its finished ids, its set of edge groups.
-- ARGV: env id, edge group members key prefix (+ group id).
-- Reply: 1 if it existed, else 0.
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
for _, group in ipairs(redis.call('SMEMBERS', KEYS[8])) do
  redis.call('ZREM', ARGV[2] .. group, ARGV[1])
end
redis.call('DEL', KEYS[8])
return removed
