-- Replaces an existing edge stack's record (the caller keeps its name and creation time).
-- KEYS: stacks hash. ARGV: id, record JSON. Reply: 1, or 0 for no stack.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
