-- Sets (or, with an empty list, clears) the tags of an existing group.
-- KEYS: groups hash (id -> name), group tags hash (id -> JSON list of tag ids).
-- ARGV: group id, the JSON list ("" to clear).
-- Reply: 1, or 0 when there is no such group.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return 1
