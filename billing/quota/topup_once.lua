-- KEYS: the account, the idempotency record. ARGV: nanos to add, the largest balance
-- allowed, the request's fingerprint, how long to keep the record (ms). Returns {1, record}
-- when the key has a record (nothing added), {2, new balance} when applied (and recorded),
-- {0} (nothing added) when the balance would pass the largest.
local found = redis.call('GET', KEYS[2])
if found then return {1, found} end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
if balance + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0} end
local new = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
local record = '{"f":"' .. ARGV[3] .. '","s":200,"n":' .. string.format('%d', new) .. '}'
redis.call('SET', KEYS[2], record, 'PX', ARGV[4])
return {2, new}
