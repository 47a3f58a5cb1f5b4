-- Adds the next version of an edge stack if its newest is still the expected one, and prunes
-- the versions beyond the newest ones kept.
-- KEYS: stacks hash, newest-version hash, the stack's versions hash.
-- ARGV: id, expected newest version, the next version's JSON, versions kept.
-- Reply: {1, new version}; {0, newest} when the newest is another; {-1, 0} for no stack.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {-1, 0} end
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if current ~= tonumber(ARGV[2]) then return {0, current} end
local next = current + 1
redis.call('HSET', KEYS[2], ARGV[1], next)
redis.call('HSET', KEYS[3], next, ARGV[3])
local oldest_kept = next - tonumber(ARGV[4]) + 1
for _, v in ipairs(redis.call('HKEYS', KEYS[3])) do
  if tonumber(v) < oldest_kept then redis.call('HDEL', KEYS[3], v) end
end
return {1, next}
