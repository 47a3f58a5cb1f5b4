-- Replaces a record only if it still exists (a concurrent delete wins), keeping its stored
-- join secret: only `reset_association` rotates it, and an update computed from a copy read
-- before a rotation must not bring the old secret back.
-- KEYS: env. ARGV: id, JSON object of the new record *without* `joinSecret` (and with at
-- least one other field, which every record has).
-- Returns 1 if replaced, 0 if absent, -1 if the stored record has no readable join secret.
-- The stored secret is spliced into the new JSON as text rather than re-encoding the whole
-- record with cjson, which would round u64s (`createdAtMs`) through doubles; encoding one
-- string with cjson is exact.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or type(rec.joinSecret) ~= 'string' then return -1 end
local secret = '{"joinSecret":' .. cjson.encode(rec.joinSecret) .. ','
redis.call('HSET', KEYS[1], ARGV[1], secret .. string.sub(ARGV[2], 2))
return 1
