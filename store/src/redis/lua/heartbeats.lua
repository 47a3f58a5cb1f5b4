-- Records heartbeats of existing environments, never moving one backwards.
-- KEYS: env (hash of records), heartbeats (sorted set: env id scored by its last check-in,
-- ms since the epoch). ARGV: id1, ms1, id2, ms2, ...  Returns how many were written.
-- ZADD GT keeps the later time; milliseconds since the epoch are far below 2^53, so the
-- scores (doubles) hold them exactly.
local written = 0
for i = 1, #ARGV, 2 do
  local id, at = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    written = written + redis.call('ZADD', KEYS[2], 'GT', 'CH', at, id)
  end
end
return written
