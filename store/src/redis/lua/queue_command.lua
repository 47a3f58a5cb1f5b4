-- Queues a command and prunes the finished ones beyond the newest `keep`, in one step.
-- The id is max(newest id + 1, now ms * 1000) (`store::next_command_id`): strictly growing,
-- and above every id handed out before even when Redis lost its last writes (those ids were
-- at most the clock of their time). The newest id is never pruned.
-- KEYS: environments, the environment's ids (sorted set), finished ids (sorted set),
-- commands (hash).
-- ARGV: env id, JSON of the command, now ms, most unfinished commands, finished ones kept,
-- largest id.
-- Returns the id; 0 when the environment does not exist, -1 when it already holds the most
-- unfinished commands, -2 when the id would pass the largest one (nothing written then).
-- Ids are Lua numbers (doubles), exact below 2^53; `%d` prints them without an exponent.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local unfinished = redis.call('ZCARD', KEYS[2]) - redis.call('ZCARD', KEYS[3])
if unfinished >= tonumber(ARGV[4]) then return -1 end
local id = tonumber(ARGV[3]) * 1000
local newest = redis.call('ZREVRANGE', KEYS[2], 0, 0)[1]
if newest and tonumber(newest) + 1 > id then id = tonumber(newest) + 1 end
if id < 1 then id = 1 end
if id > tonumber(ARGV[6]) then return -2 end
local excess = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[5])
if excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, excess - 1)) do
    redis.call('ZREM', KEYS[2], old)
    redis.call('HDEL', KEYS[4], old, old .. ':sent', old .. ':done')
  end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, excess - 1)
end
local field = string.format('%d', id)
redis.call('HSET', KEYS[4], field, ARGV[2])
redis.call('ZADD', KEYS[2], field, field)
return id
