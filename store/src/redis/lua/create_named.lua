-- KEYS: ids hash, names hash, counter. ARGV: name. Returns the new id, or 0 if the name is taken.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local id = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], id, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], id)
return id
