-- Binds only an existing environment whose stored join secret is exactly the given one, and
-- only if it is unbound. The secret is checked here, atomically with the HSETNX, so that a
-- `reset_association` (which rewrites the record and drops the binding in one script) is
-- either wholly before the check or wholly after the bind.
-- KEYS: env, binding. ARGV: id, edge id, join secret.
-- Returns 0 (no such environment), 1 (bound now), 2 (the join secret is another one),
-- -1 (the stored record has no readable join secret) or the Edge ID already bound.
-- Lua compares strings byte for byte, and cjson decodes a JSON string exactly, so the
-- comparison is exact.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or type(rec.joinSecret) ~= 'string' then return -1 end
if rec.joinSecret ~= ARGV[3] then return 2 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then return 1 end
return redis.call('HGET', KEYS[2], ARGV[1])
