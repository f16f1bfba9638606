-- Release whatever one request still holds (nothing when its admission never ran), by
-- the amounts and counters stored with its reservation; marks nothing, so a later settle
-- still applies. KEYS: the key prefix (base) of each scope, then, with an account, the
-- account's key. ARGV: request id, has account 0/1.
local rid = ARGV[1]
local has_account = ARGV[2] == '1'
local function istr(n) return string.format('%d', n) end
local nscopes = #KEYS
if has_account then nscopes = nscopes - 1 end
for i = 1, nscopes do
  local base = KEYS[i]
  local held = redis.call('HGET', base .. ':resv', rid)
  if held then
    unreserve(base, held)
    redis.call('HDEL', base .. ':resv', rid)
  end
  redis.call('ZREM', base .. ':inflight', rid)
end
if has_account then
  local account = KEYS[nscopes + 1]
  local held = redis.call('HGET', account .. ':resv', rid)
  if held then
    redis.call('HINCRBY', account, 'held', istr(-tonumber(held)))
    redis.call('HDEL', account .. ':resv', rid)
  end
  redis.call('ZREM', account .. ':inflight', rid)
end
return 1
