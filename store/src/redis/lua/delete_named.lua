-- KEYS: ids hash, names hash, and for groups the group tags hash (else the ids hash again).
-- ARGV: id. Returns 1 if deleted, 0 if absent.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], old)
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
