-- Extends the locations still held by the given gateway with the given epochs.
-- KEYS: locations. ARGV: gateway id, lease ms, epoch of KEYS[1], epoch of KEYS[2], ...
-- Returns the (1-based) positions of the locations no longer held: gone, claimed since with
-- another epoch, or unreadable (which the next claim overwrites; until then nobody holds it).
local lost = {}
for i = 1, #KEYS do
  local held = false
  local cur = redis.call('GET', KEYS[i])
  if cur then
    local ok, rec = pcall(cjson.decode, cur)
    held = ok and type(rec) == 'table' and rec.gatewayId == ARGV[1]
      and rec.epoch == tonumber(ARGV[i + 2])
  end
  if held then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
