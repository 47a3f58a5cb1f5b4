-- Picks the unfinished commands with an id above `after`, oldest first, at most `limit`, and
-- marks each sent (HSETNX: the first time stays).
-- KEYS: the environment's ids (sorted set), finished ids (sorted set), commands (hash).
-- ARGV: after, limit, now ms. Returns the ids picked.
-- Finished commands above `after` are rare (a result recorded before the agent's
-- `done_through` passed it) and at most the finished ones kept: they are skipped.
local picked, offset, limit = {}, 0, tonumber(ARGV[2])
while #picked < limit do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf',
    'LIMIT', offset, limit)
  for _, id in ipairs(batch) do
    if not redis.call('ZSCORE', KEYS[2], id) then
      redis.call('HSETNX', KEYS[3], id .. ':sent', ARGV[3])
      picked[#picked + 1] = id
      if #picked >= limit then break end
    end
  end
  if #batch < limit then break end
  offset = offset + limit
end
return picked
