-- KEYS: per scope: inflight, resv, then its counters; then, with an account: account,
-- inflight, resv. ARGV: request id, scope count, has account, counters per scope.
-- Releases whatever this request still holds (nothing when its admission never ran), by the
-- amounts stored with the reservation; marks nothing, so a later settle still applies.
local rid = ARGV[1]
local function istr(n) return string.format('%d', n) end
local k = 0
for i = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[3 + i])
  local held = redis.call('HGET', KEYS[k + 2], rid)
  if held then
    local amount = string.match(held, '%S+')
    for j = 1, n do adjust(KEYS[k + 2 + j], -tonumber(amount)) end
    redis.call('HDEL', KEYS[k + 2], rid)
  end
  redis.call('ZREM', KEYS[k + 1], rid)
  k = k + 2 + n
end
if ARGV[3] == '1' then
  local held = redis.call('HGET', KEYS[k + 3], rid)
  if held then
    redis.call('HINCRBY', KEYS[k + 1], 'held', istr(-tonumber(held)))
    redis.call('HDEL', KEYS[k + 3], rid)
  end
  redis.call('ZREM', KEYS[k + 2], rid)
end
return 1
