-- Creates an edge stack with its first version, under a name not yet taken.
-- KEYS: stacks hash (id -> record JSON), names hash (name -> id), newest-version hash
--       (id -> n), id counter.
-- ARGV: name, record JSON, version 1 JSON, versions key prefix (+ id: a hash n -> JSON).
-- Reply: the new id, or 0 when the name is taken.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local id = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], id, ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], id)
redis.call('HSET', KEYS[3], id, 1)
redis.call('HSET', ARGV[4] .. id, 1, ARGV[3])
return id
