-- Compare-and-set of a record that also drops its binding.
-- KEYS: env, binding. ARGV: id, expected JSON, new JSON.
-- Returns 1 if done, 0 if absent, -1 if the record changed meanwhile (retry).
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if cur ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
