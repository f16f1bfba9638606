-- Counter helpers shared by the scripts. A counter spec is a key, or <key>@<bucket>
-- for one bucket (hash field) of a rolling window (whose total t moves with it); either
-- is corrected only while it exists.
local function adjust(spec, amount)
  local delta = string.format('%d', tonumber(amount))
  local key, field = string.match(spec, '^(.*)@(%d+)$')
  if key then
    if redis.call('HEXISTS', key, field) == 1 then
      redis.call('HINCRBY', key, field, delta)
      redis.call('HINCRBY', key, 't', delta)
    end
  elseif redis.call('EXISTS', spec) == 1 then
    redis.call('INCRBY', spec, delta)
  end
end

-- Take a scope's reservation (held: "<tokens> <suffix>...", as admit.lua stores it) back off
-- the counters it charged.
local function unreserve(base, held)
  local amount = nil
  for word in string.gmatch(held, '%S+') do
    if amount == nil then
      amount = word
    else
      adjust(base .. word, -tonumber(amount))
    end
  end
end
