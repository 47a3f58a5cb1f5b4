-- Records heartbeats of existing environments, never moving one backwards.
-- KEYS: env, heartbeat. ARGV: id1, ms1, id2, ms2, ...  Returns how many were written.
-- Times are compared as decimal strings (longer is larger, then lexicographic) because Lua
-- numbers are doubles and would round large u64 values.
local written = 0
for i = 1, #ARGV, 2 do
  local id, at = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    local cur = redis.call('HGET', KEYS[2], id)
    if (not cur) or #at > #cur or (#at == #cur and at > cur) then
      redis.call('HSET', KEYS[2], id, at)
      written = written + 1
    end
  end
end
return written
