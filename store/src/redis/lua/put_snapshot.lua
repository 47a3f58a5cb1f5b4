-- Stores a snapshot of an existing environment unless the stored one was taken later.
-- KEYS: env, snapshot. ARGV: id, taken ms, received ms, body.
-- Returns 2 if stored, 1 if the stored one was taken later (kept, nothing written), 0 if the
-- environment does not exist. Times are compared as decimal strings, as in `heartbeats.lua`.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[2], 'taken_ms')
local new = ARGV[2]
if cur and (#cur > #new or (#cur == #new and cur > new)) then return 1 end
redis.call('HSET', KEYS[2], 'taken_ms', new, 'received_ms', ARGV[3], 'body', ARGV[4])
return 2
