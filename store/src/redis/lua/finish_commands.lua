-- Records the first result of each command still kept (HSETNX `{id}:done`) and adds it to
-- the finished set. Results for ids not kept (unknown, or pruned since: a retried request)
-- are ignored, so they leave nothing behind.
-- KEYS: the environment's commands (hash), finished ids (sorted set).
-- ARGV: id1, JSON of result 1, id2, JSON of result 2, ...  Returns how many were recorded.
local recorded = 0
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], id) == 1
      and redis.call('HSETNX', KEYS[1], id .. ':done', ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], id, id)
    recorded = recorded + 1
  end
end
return recorded
