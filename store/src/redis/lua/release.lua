-- Compare-and-delete of a location on its epoch.
-- KEYS: location. ARGV: epoch. Returns 1 if deleted, 0 if absent or of another epoch, -1 if
-- the stored location is unreadable.
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' then return -1 end
if rec.epoch ~= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
