-- KEYS: the done marker; per scope: inflight, resv, then its counters; then, with an
-- account: account, inflight, resv. ARGV: request id, reserved tokens, used tokens,
-- reserved nanos, cost nanos, done TTL ms, scope count, has account, counters per scope.
-- Returns 1 when applied, 0 when this request was already settled.
local rid = ARGV[1]
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[6]) then return 0 end
local reserved, used = tonumber(ARGV[2]), tonumber(ARGV[3])
local function istr(n) return string.format('%d', n) end
local k = 1
for i = 1, tonumber(ARGV[7]) do
  local n = tonumber(ARGV[8 + i])
  local held = redis.call('HDEL', KEYS[k + 2], rid)
  redis.call('ZREM', KEYS[k + 1], rid)
  local delta = used
  if held == 1 then delta = used - reserved end
  if delta ~= 0 then
    for j = 1, n do adjust(KEYS[k + 2 + j], istr(delta)) end
  end
  k = k + 2 + n
end
if ARGV[8] == '1' then
  local held = redis.call('HDEL', KEYS[k + 3], rid)
  redis.call('ZREM', KEYS[k + 2], rid)
  if held == 1 then
    redis.call('HINCRBY', KEYS[k + 1], 'held', istr(-tonumber(ARGV[4])))
  end
  redis.call('HINCRBY', KEYS[k + 1], 'balance', istr(-tonumber(ARGV[5])))
end
return 1
