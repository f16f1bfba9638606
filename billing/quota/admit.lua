-- The admission, one atomic step (it mirrors billing.quota.policy.decide).
-- Globals: 13 ARGV (request id, now ms, expiry ms, prompt, max tokens, min tokens, input
-- cost, output price, scope count, has account, holds keep ms, current bucket, oldest
-- bucket counted). Per scope: 6 KEYS (inflight, resv, rpm, tpm, day, month) and 10 ARGV
-- (base, rpm, tpm, max_concurrent, day, month limits (-1 = none), window/day/month TTL ms,
-- the space-separated suffixes of the token counters it charges). Then, with an account,
-- 3 KEYS (account, its inflight, its resv).
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
local nscopes = tonumber(ARGV[9])
local has_account = ARGV[10] == '1'
local keep_ms = ARGV[11]
local bucket = ARGV[12]
local oldest = tonumber(ARGV[13])
local now_ms = tonumber(now)
local PER = 10
local GLOBALS = 13
local WINDOW = @WINDOW_BUCKETS@
local BUCKET_MS = @BUCKET_MS@

local function istr(n) return string.format('%d', n) end

local function release_expired(inflight, resv, base, account)
  local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', now)
  for _, id in ipairs(expired) do
    local held = redis.call('HGET', resv, id)
    if held then
      if account then
        redis.call('HINCRBY', account, 'held', istr(-tonumber(held)))
      else
        local amount = nil
        for word in string.gmatch(held, '%S+') do
          if amount == nil then
            amount = word
          else
            adjust(base .. word, -tonumber(amount))
          end
        end
      end
      redis.call('HDEL', resv, id)
    end
    redis.call('ZREM', inflight, id)
  end
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

-- Charge a rolling window's current bucket.
local function charge(key, amount, first, ttl)
  redis.call('HINCRBY', key, bucket, amount)
  redis.call('HINCRBY', key, 't', amount)
  if first == nil or tonumber(bucket) < first then redis.call('HSET', key, 'o', bucket) end
  redis.call('PEXPIRE', key, ttl)
end

local readings = {}
local firsts = {}
local blocked = false
local granted = max_tokens
local need = prompt + min_tokens
for i = 1, nscopes do
  local k = (i - 1) * 6
  local a = GLOBALS + (i - 1) * PER
  local rpm, tpm, conc = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local day, month = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  release_expired(KEYS[k + 1], KEYS[k + 2], ARGV[a + 1], nil)
  local requests, tpm_used, day_used, month_used = 0, 0, 0, 0
  local rpm_reset, rpm_retry, tpm_reset, tpm_retry = 0, 0, 0, 0
  local rpm_first, tpm_first = nil, nil
  local inflight = redis.call('ZCARD', KEYS[k + 1])
  if rpm >= 0 then
    requests, rpm_first, rpm_reset, rpm_retry = window(KEYS[k + 3], rpm, 1)
    if requests + 1 > rpm then blocked = true end
  end
  if conc >= 0 and inflight + 1 > conc then blocked = true end
  if tpm >= 0 then
    tpm_used, tpm_first, tpm_reset, tpm_retry = window(KEYS[k + 4], tpm, need)
    granted = math.min(granted, tpm - tpm_used - prompt)
  end
  if day >= 0 then
    day_used = count(KEYS[k + 5])
    granted = math.min(granted, day - day_used - prompt)
  end
  if month >= 0 then
    month_used = count(KEYS[k + 6])
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
local ak = nscopes * 6
if has_account then
  balance = redis.call('HGET', KEYS[ak + 1], 'balance')
  if balance then
    release_expired(KEYS[ak + 2], KEYS[ak + 3], nil, KEYS[ak + 1])
    held = tonumber(redis.call('HGET', KEYS[ak + 1], 'held') or '0')
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
    local k = (i - 1) * 6
    local a = GLOBALS + (i - 1) * PER
    local rpm, tpm, conc = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local day, month = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
    if rpm >= 0 then charge(KEYS[k + 3], 1, firsts[i][1], ARGV[a + 7]) end
    if tpm >= 0 then charge(KEYS[k + 4], tokens, firsts[i][2], ARGV[a + 7]) end
    if day >= 0 then
      redis.call('INCRBY', KEYS[k + 5], tokens)
      redis.call('PEXPIRE', KEYS[k + 5], ARGV[a + 8])
    end
    if month >= 0 then
      redis.call('INCRBY', KEYS[k + 6], tokens)
      redis.call('PEXPIRE', KEYS[k + 6], ARGV[a + 9])
    end
    if tpm >= 0 or day >= 0 or month >= 0 or conc >= 0 then
      redis.call('ZADD', KEYS[k + 1], expires, rid)
      redis.call('HSET', KEYS[k + 2], rid, tokens .. ' ' .. ARGV[a + 10])
      redis.call('PEXPIRE', KEYS[k + 1], keep_ms)
      redis.call('PEXPIRE', KEYS[k + 2], keep_ms)
    end
  end
  if has_account then
    local reserve = istr(input_cost + granted * out_price)
    if not balance then redis.call('HSET', KEYS[ak + 1], 'balance', '0') end
    redis.call('HINCRBY', KEYS[ak + 1], 'held', reserve)
    redis.call('ZADD', KEYS[ak + 2], expires, rid)
    redis.call('HSET', KEYS[ak + 3], rid, reserve)
    redis.call('PEXPIRE', KEYS[ak + 2], keep_ms)
    redis.call('PEXPIRE', KEYS[ak + 3], keep_ms)
  end
end

local out = {admitted and 1 or 0, granted, balance, held}
for _, v in ipairs(readings) do table.insert(out, v) end
return out
