-- KEYS: ids hash, names hash. ARGV: id, new name.
-- Returns 1 if renamed (or already so named), 0 if absent, -1 if the name is taken.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
if old == ARGV[2] then return 1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return -1 end
redis.call('HDEL', KEYS[2], old)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
