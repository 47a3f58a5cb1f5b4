-- Deletes an edge stack, its name, its newest-version entry and its versions.
-- KEYS: stacks hash, names hash, newest-version hash, the stack's versions hash.
-- ARGV: id. Reply: 1 if it existed, else 0.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
local name = cjson.decode(old)['name']
if redis.call('HGET', KEYS[2], name) == ARGV[1] then redis.call('HDEL', KEYS[2], name) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
return 1
