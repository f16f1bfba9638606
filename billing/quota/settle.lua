-- The settlement of one admission, applied once per request id.
-- KEYS: the done marker, the key prefix (base) of each scope charged, then, with an
-- account, the account's key. ARGV: request id, reserved tokens, used tokens, reserved
-- nanos, cost nanos, done marker TTL ms, has account 0/1, then per scope the suffixes of
-- the counters it charged, space-separated. Returns 1 when applied, 0 when this request
-- was already settled.
local rid = ARGV[1]
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[6]) then return 0 end
local reserved, used = tonumber(ARGV[2]), tonumber(ARGV[3])
local has_account = ARGV[7] == '1'
local function istr(n) return string.format('%d', n) end
local nscopes = #KEYS - 1
if has_account then nscopes = nscopes - 1 end
for i = 1, nscopes do
  local base = KEYS[i + 1]
  local held = redis.call('HDEL', base .. ':resv', rid)
  redis.call('ZREM', base .. ':inflight', rid)
  local delta = used
  if held == 1 then delta = used - reserved end
  if delta ~= 0 then
    for suffix in string.gmatch(ARGV[7 + i], '%S+') do adjust(base .. suffix, istr(delta)) end
  end
end
if has_account then
  local account = KEYS[nscopes + 2]
  local held = redis.call('HDEL', account .. ':resv', rid)
  redis.call('ZREM', account .. ':inflight', rid)
  if held == 1 then
    redis.call('HINCRBY', account, 'held', istr(-tonumber(ARGV[4])))
  end
  redis.call('HINCRBY', account, 'balance', istr(-tonumber(ARGV[5])))
end
return 1
