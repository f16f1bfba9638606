-- KEYS: the account. ARGV: nanos to add, the largest balance allowed. Returns the new
-- balance, or nil (nothing added) when it would pass the largest.
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
if balance + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return false end
return redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
