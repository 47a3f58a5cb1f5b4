-- Stores an edge stack's rollout if its stored revision is the expected one.
-- KEYS: stacks hash, rollouts hash (stack id -> "revision|json").
-- ARGV: id, expected revision (0: none stored), new revision, JSON.
-- Reply: 1 if stored, 0 if the revision moved or there is no such stack.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[2], ARGV[1])
local revision = 0
if current then revision = tonumber(string.match(current, '^(%d+)|')) or -1 end
if revision ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. '|' .. ARGV[4])
return 1
