-- Hands out the next epoch and stores the location with it, in one step: of two concurrent
-- claims, the one with the higher epoch is the one left stored.
-- KEYS: location, epoch counter. ARGV: JSON object of the location *without* `epoch` (and
-- with other fields), lease ms. Returns the epoch.
-- The epoch is spliced into the JSON as text, as in `update.lua`; `%d` prints it exactly
-- (Lua numbers are doubles, exact up to 2^53 claims).
local epoch = redis.call('INCR', KEYS[2])
local json = '{"epoch":' .. string.format('%d', epoch) .. ',' .. string.sub(ARGV[1], 2)
redis.call('SET', KEYS[1], json, 'PX', ARGV[2])
return epoch
