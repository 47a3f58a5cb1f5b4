-- Deletes an edge stack, its name, its newest-version entry, its versions and its statuses.
-- KEYS: stacks hash, names hash, newest-version hash, the stack's versions hash, its status
--       hash, its counts hash, the rollouts hash.
-- ARGV: id, env key prefix (+ env id: the set of stacks it has a status of), how many status
--       codes there are (the `:by:<code>` sets are 0 to that - 1).
-- Reply: 1 if it existed, else 0.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
local name = cjson.decode(old)['name']
if redis.call('HGET', KEYS[2], name) == ARGV[1] then redis.call('HDEL', KEYS[2], name) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('DEL', KEYS[4])
for _, env in ipairs(redis.call('ZRANGE', KEYS[5] .. ':all', 0, -1)) do
  redis.call('SREM', ARGV[2] .. env, ARGV[1])
end
redis.call('DEL', KEYS[5], KEYS[5] .. ':all', KEYS[6])
for code = 0, tonumber(ARGV[3]) - 1 do redis.call('DEL', KEYS[5] .. ':by:' .. code) end
return 1
