-- Moves heartbeats kept the old way (a hash: env id -> ms) into the sorted set, keeping the
-- later time of the two, and deletes the hash. Nothing to do when there is no such hash.
-- KEYS: heartbeat (the old hash), heartbeats (the sorted set). Returns how many moved.
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then
  return 0
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  redis.call('ZADD', KEYS[2], 'GT', all[i + 1], all[i])
end
redis.call('DEL', KEYS[1])
return #all / 2
