-- Records statuses of an edge stack's environments: newer reports only, existing
-- environments only, counts per status and version kept with them.
-- KEYS: environments hash, stacks hash.
-- ARGV: stack id, its status hash (env -> "code|version|updated_ms|json"; + ":all" and
--       + ":by:<code>": sorted sets of env ids), its counts hash ("code:version" -> n),
--       env key prefix (+ env id: the set of stacks it has a status of), then per status:
--       env, code, version, updated_ms, json.
-- Reply: how many were recorded.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
local base, counts, envs = ARGV[2], ARGV[3], ARGV[4]
local recorded = 0
for i = 5, #ARGV, 5 do
  local env, code, version, at = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HEXISTS', KEYS[1], env) == 1 then
    local old = redis.call('HGET', base, env)
    local newer = true
    if old then
      local oc, ov, oat = string.match(old, '^(%d+)|(%d+)|(%d+)|')
      if tonumber(oat) > tonumber(at) then
        newer = false
      else
        redis.call('ZREM', base .. ':by:' .. oc, env)
        if redis.call('HINCRBY', counts, oc .. ':' .. ov, -1) <= 0 then
          redis.call('HDEL', counts, oc .. ':' .. ov)
        end
      end
    end
    if newer then
      redis.call('HSET', base, env, code .. '|' .. version .. '|' .. at .. '|' .. ARGV[i + 4])
      redis.call('ZADD', base .. ':all', env, env)
      redis.call('ZADD', base .. ':by:' .. code, env, env)
      redis.call('HINCRBY', counts, code .. ':' .. version, 1)
      redis.call('SADD', envs .. env, ARGV[1])
      recorded = recorded + 1
    end
  end
end
return recorded
