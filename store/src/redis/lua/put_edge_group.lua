-- Creates (id 0) or replaces an edge group, and sets its static members: only ids that are
-- environments are kept, each also noted by environment so that deleting it leaves the group.
-- KEYS: edge groups hash (id -> record JSON), names hash (name -> id), id counter,
--       environments hash.
-- ARGV: id (0: create), name, record JSON, members key prefix (+ group id: a sorted set of
--       env ids scored by id), env key prefix (+ env id: a set of group ids), then the wanted
--       member ids.
-- Reply: {id, member ids ascending...}; {-1} when another group has the name; {0} when the
-- group to replace does not exist.
local id = tonumber(ARGV[1])
local holder = redis.call('HGET', KEYS[2], ARGV[2])
if holder and tonumber(holder) ~= id then return {-1} end
if id == 0 then
  id = redis.call('INCR', KEYS[3])
else
  local old = redis.call('HGET', KEYS[1], id)
  if not old then return {0} end
  local old_name = cjson.decode(old)['name']
  if old_name ~= ARGV[2] then redis.call('HDEL', KEYS[2], old_name) end
end
redis.call('HSET', KEYS[1], id, ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], id)
local members = ARGV[4] .. id
for _, env in ipairs(redis.call('ZRANGE', members, 0, -1)) do
  redis.call('SREM', ARGV[5] .. env, id)
end
redis.call('DEL', members)
for i = 6, #ARGV do
  local env = ARGV[i]
  if redis.call('HEXISTS', KEYS[4], env) == 1 then
    redis.call('ZADD', members, env, env)
    redis.call('SADD', ARGV[5] .. env, id)
  end
end
local reply = {id}
for _, env in ipairs(redis.call('ZRANGE', members, 0, -1)) do
  reply[#reply + 1] = tonumber(env)
end
return reply
