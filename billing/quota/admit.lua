-- The admission, one atomic step (it mirrors billing.quota.policy.decide).
-- KEYS: the key prefix (base) of each scope, then, with an account, the account's key.
-- (Every key the script touches is a base plus a suffix: one hash tag, one cluster slot.)
-- ARGV: 12 globals (request id, now ms, reservation expiry ms, prompt tokens, max tokens,
-- min tokens, input cost, output price, has account 0/1, holds keep ms, oldest bucket
-- counted, period counters' expiry margin ms), then 9 per scope (rpm, tpm, max_concurrent,
-- day and month limits (-1 = none), the day counter's suffix and its period's end ms, the
-- month's suffix and end ms).
-- Returns {admitted 0/1, granted, balance or nil, held, then 9 readings per scope}
-- (requests, inflight, tpm, day, month, rpm reset/retry ms, tpm reset/retry ms).
local rid = ARGV[1]
local now = ARGV[2]
local expires = ARGV[3]
local prompt = tonumber(ARGV[4])
local max_tokens = tonumber(ARGV[5])
local min_tokens = tonumber(ARGV[6])
local input_cost = tonumber(ARGV[7])
local out_price = tonumber(ARGV[8])
local has_account = ARGV[9] == '1'
local keep_ms = ARGV[10]
local oldest = tonumber(ARGV[11])
local period_margin = tonumber(ARGV[12])
local now_ms = tonumber(now)
local PER = 9
local GLOBALS = 12
local WINDOW = @WINDOW_BUCKETS@
local BUCKET_MS = @BUCKET_MS@
local bucket = string.format('%d', math.floor(now_ms / BUCKET_MS))
local nscopes = #KEYS
if has_account then nscopes = nscopes - 1 end

local function istr(n) return string.format('%d', n) end

-- Release the reservations of this scope (or account) whose time is up; returns how many.
local function release_expired(base, account)
  local inflight, resv = base .. ':inflight', base .. ':resv'
  local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', now)
  for _, id in ipairs(expired) do
    local held = redis.call('HGET', resv, id)
    if held then
      if account then
        redis.call('HINCRBY', base, 'held', istr(-tonumber(held)))
      else
        unreserve(base, held)
      end
      redis.call('HDEL', resv, id)
    end
    redis.call('ZREM', inflight, id)
  end
  return #expired
end

local function count(key)
  return tonumber(redis.call('GET', key) or '0')
end

local function leaves(b)
  return (b + WINDOW) * BUCKET_MS - now_ms
end

-- The buckets of a rolling window (field 't' and 'o' aside): {bucket, amount} pairs.
local function buckets_of(key)
  local flat = redis.call('HGETALL', key)
  local found = {}
  for j = 1, #flat, 2 do
    if flat[j] ~= 't' and flat[j] ~= 'o' then
      table.insert(found, {tonumber(flat[j]), tonumber(flat[j + 1])})
    end
  end
  return found
end

-- A rolling window against a limit: used, oldest bucket kept (or nil), reset ms, retry
-- ms (mirrors RollingWindow and window_times). Buckets that have left are deleted once
-- the oldest one has: about once a second per window, not at every admission.
local function window(key, limit, need)
  local state = redis.call('HMGET', key, 't', 'o')
  local used, first = tonumber(state[1] or '0'), tonumber(state[2])
  if first ~= nil and first < oldest then
    local stale, kept = {}, nil
    for _, e in ipairs(buckets_of(key)) do
      if e[1] < oldest then
        table.insert(stale, istr(e[1]))
        used = used - e[2]
      elseif kept == nil or e[1] < kept then
        kept = e[1]
      end
    end
    if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
    if kept == nil then
      redis.call('DEL', key)
      used = 0
    else
      redis.call('HSET', key, 't', istr(used), 'o', istr(kept))
    end
    first = kept
  end
  local current = math.floor(now_ms / BUCKET_MS)
  local reset = leaves(first or current)
  local excess = used + need - limit
  if excess <= 0 then return used, first, reset, 0 end
  local live = buckets_of(key)
  table.sort(live, function(x, y) return x[1] < y[1] end)
  local freed, last = 0, current
  for _, e in ipairs(live) do
    freed = freed + e[2]
    last = e[1]
    if freed >= excess then break end
  end
  return used, first, reset, leaves(last)
end

-- Charge a rolling window's current bucket; a new bucket extends the window's life.
local function charge(key, amount, first)
  if redis.call('HINCRBY', key, bucket, amount) == tonumber(amount) then
    redis.call('PEXPIRE', key, (WINDOW + 1) * BUCKET_MS)
  end
  redis.call('HINCRBY', key, 't', amount)
  if first == nil or tonumber(bucket) < first then redis.call('HSET', key, 'o', bucket) end
end

-- Charge a calendar counter; a new one lives to its period's end plus the margin.
local function add(key, amount, period_end)
  if redis.call('INCRBY', key, amount) == tonumber(amount) then
    redis.call('PEXPIRE', key, istr(tonumber(period_end) - now_ms + period_margin))
  end
end

local readings = {}
local firsts = {}
local blocked = false
local granted = max_tokens
local need = prompt + min_tokens
for i = 1, nscopes do
  local base = KEYS[i]
  local a = GLOBALS + (i - 1) * PER
  local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local day, month = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  release_expired(base, false)
  local requests, tpm_used, day_used, month_used = 0, 0, 0, 0
  local rpm_reset, rpm_retry, tpm_reset, tpm_retry = 0, 0, 0, 0
  local rpm_first, tpm_first = nil, nil
  local inflight = 0
  if conc >= 0 then inflight = redis.call('ZCARD', base .. ':inflight') end
  if rpm >= 0 then
    requests, rpm_first, rpm_reset, rpm_retry = window(base .. ':rpm', rpm, 1)
    if requests + 1 > rpm then blocked = true end
  end
  if conc >= 0 and inflight + 1 > conc then blocked = true end
  if tpm >= 0 then
    tpm_used, tpm_first, tpm_reset, tpm_retry = window(base .. ':tpm', tpm, need)
    granted = math.min(granted, tpm - tpm_used - prompt)
  end
  if day >= 0 then
    day_used = count(base .. ARGV[a + 6])
    granted = math.min(granted, day - day_used - prompt)
  end
  if month >= 0 then
    month_used = count(base .. ARGV[a + 8])
    granted = math.min(granted, month - month_used - prompt)
  end
  table.insert(readings, requests)
  table.insert(readings, inflight)
  table.insert(readings, tpm_used)
  table.insert(readings, day_used)
  table.insert(readings, month_used)
  table.insert(readings, rpm_reset)
  table.insert(readings, rpm_retry)
  table.insert(readings, tpm_reset)
  table.insert(readings, tpm_retry)
  firsts[i] = {rpm_first, tpm_first}
end

local balance = false
local held = 0
local account = KEYS[nscopes + 1]
if has_account then
  local state = redis.call('HMGET', account, 'balance', 'held')
  balance = state[1]
  if balance then
    if release_expired(account, true) > 0 then
      held = tonumber(redis.call('HGET', account, 'held') or '0')
    else
      held = tonumber(state[2] or '0')
    end
  end
  local available = tonumber(balance or '0') - held - input_cost
  if out_price > 0 then
    local room = math.floor(available / out_price)
    while room * out_price > available do room = room - 1 end
    while (room + 1) * out_price <= available do room = room + 1 end
    granted = math.min(granted, room)
  elseif available < 0 then
    granted = math.min(granted, -1)
  end
end

local admitted = (not blocked) and granted >= min_tokens
if admitted then
  local tokens = istr(prompt + granted)
  for i = 1, nscopes do
    local base = KEYS[i]
    local a = GLOBALS + (i - 1) * PER
    local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local day, month = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
    local counters = ''
    if rpm >= 0 then charge(base .. ':rpm', 1, firsts[i][1]) end
    if tpm >= 0 then
      charge(base .. ':tpm', tokens, firsts[i][2])
      counters = counters .. ' :tpm@' .. bucket
    end
    if day >= 0 then
      add(base .. ARGV[a + 6], tokens, ARGV[a + 7])
      counters = counters .. ' ' .. ARGV[a + 6]
    end
    if month >= 0 then
      add(base .. ARGV[a + 8], tokens, ARGV[a + 9])
      counters = counters .. ' ' .. ARGV[a + 8]
    end
    if tpm >= 0 or day >= 0 or month >= 0 or conc >= 0 then
      local inflight, resv = base .. ':inflight', base .. ':resv'
      redis.call('ZADD', inflight, expires, rid)
      redis.call('HSET', resv, rid, tokens .. counters)
      redis.call('PEXPIRE', inflight, keep_ms)
      redis.call('PEXPIRE', resv, keep_ms)
    end
  end
  if has_account then
    local reserve = istr(input_cost + granted * out_price)
    local inflight, resv = account .. ':inflight', account .. ':resv'
    if not balance then redis.call('HSET', account, 'balance', '0') end
    redis.call('HINCRBY', account, 'held', reserve)
    redis.call('ZADD', inflight, expires, rid)
    redis.call('HSET', resv, rid, reserve)
    redis.call('PEXPIRE', inflight, keep_ms)
    redis.call('PEXPIRE', resv, keep_ms)
  end
end

local out = {admitted and 1 or 0, granted, balance, held}
for _, v in ipairs(readings) do table.insert(out, v) end
return out
