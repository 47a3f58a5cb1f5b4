-- Queues a command with the next id (ids are contiguous: 1..=HLEN).
-- KEYS: environments, the environment's commands. ARGV: env id, JSON, most commands kept.
-- Returns the id, 0 when the environment does not exist, -1 when it holds too many.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local n = redis.call('HLEN', KEYS[2])
if n >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[2], n + 1, ARGV[2])
return n + 1
