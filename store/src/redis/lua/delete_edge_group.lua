-- Deletes an edge group, its name and its members (in both directions).
-- KEYS: edge groups hash, names hash.
-- ARGV: id, members key prefix, env key prefix (as in put_edge_group.lua).
-- Reply: 1 if it existed, else 0.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
local name = cjson.decode(old)['name']
if redis.call('HGET', KEYS[2], name) == ARGV[1] then redis.call('HDEL', KEYS[2], name) end
redis.call('HDEL', KEYS[1], ARGV[1])
local members = ARGV[2] .. ARGV[1]
for _, env in ipairs(redis.call('ZRANGE', members, 0, -1)) do
  redis.call('SREM', ARGV[3] .. env, ARGV[1])
end
redis.call('DEL', members)
return 1
