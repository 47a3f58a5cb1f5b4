-- Forgets registered gateways whose key expired, unless they registered again meanwhile.
-- KEYS: gateway set, then the gateways' keys. ARGV: the gateways' ids, in the same order.
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return 0
