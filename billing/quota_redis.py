"""The Redis quota store: every gateway replica shares one truth through two Lua scripts.

`admit` and `settle` are one round trip each (EVALSHA; the script is loaded again on
NOSCRIPT, e.g. after Redis restarts), sent over one pipelined connection
(`billing.redis_pipeline`; needs hiredis and a ``redis://`` or ``unix://`` URL, else
redis-py's pool). Python computes key names, calendar periods and TTLs
(zoneinfo); the scripts do the atomic arithmetic, mirroring `billing.quota.decide`.

Keys (prefix ``maas:quota:`` by default), per scope ``s:<scope id>`` and account ``a:<id>``:

- ``s:<id>:rpm``, ``s:<id>:tpm`` - rolling windows: hashes one-second bucket -> amount,
  plus ``t`` (the total of the buckets kept) and ``o`` (the oldest bucket kept); buckets
  that have left the window are deleted (and taken off ``t``) when ``o`` has left it
- ``s:<id>:day:<YYYY-MM-DD>``, ``s:<id>:month:<YYYY-MM>`` - local calendar counters
- ``s:<id>:inflight`` (zset request id -> expiry ms) and ``s:<id>:resv`` (hash request id
  -> "tokens suffix...") - open reservations, released lazily when expired
- ``a:<id>`` (hash ``balance``, ``held``), ``a:<id>:inflight``, ``a:<id>:resv``
- ``done:<request id>`` - settle idempotency marker
- ``idem:<Idempotency-Key>`` - an admin write's idempotency record (`billing.idempotency`)

Lua counts in doubles: amounts stay below 2**53 (nine million currency units in nanos).
The scripts touch the keys of expired reservations they find, so the store needs a
standalone Redis (or one shard), not Redis Cluster.

Availability: every command has a short socket timeout (`timeout_ms`), no retries, and a
whole-call deadline of four timeouts, so a dead or hung Redis turns into `QuotaUnavailable`
quickly; after a failure, calls fail fast for
`retry_interval_ms` and then try again, so the store recovers by itself. A settle that
cannot reach Redis is queued and replayed once Redis answers (settles are idempotent). An
admission that was sent but got no answer (a timeout) may still have run: its release is
queued the same way, so a refused request never keeps a reservation. An initial balance
(`set_balance`) that cannot be written is kept too, and written before any other call
once Redis answers, so a settle replayed into a new account never comes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from billing.idempotency import (
    ABANDON_LUA,
    BEGIN_LUA,
    PENDING_KEEP_MS,
    RESULT_KEEP_MS,
    Claim,
    Stored,
    encode_stored,
    resolve,
)
from billing.money import format_amount
from billing.quota import (
    BUCKET_MS,
    HOLDS_KEEP_MS,
    MAX_BALANCE_NANOS,
    SETTLED_KEEP_MS,
    WINDOW_BUCKETS,
    AccountReading,
    Admission,
    AdmitRequest,
    QuotaStore,
    QuotaUnavailable,
    Scope,
    ScopeCharge,
    ScopePlan,
    ScopeReading,
    account_base,
    counter_ttl_ms,
    decide,
    epoch_ms,
    oldest_bucket,
    plan_scope,
    ratelimit_headers,
    refusal,
    remaining_from,
)

__all__ = ["ADMIT_LUA", "RELEASE_LUA", "SETTLE_LUA", "TOPUP_LUA", "RedisQuotaStore"]

try:
    from billing.redis_pipeline import LuaScript, PipelinedRedis
except ImportError:  # hiredis is not installed: the scripts go through redis-py as well
    LuaScript = PipelinedRedis = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Counter helpers shared by the scripts. A counter spec is a key, or ``<key>@<bucket>``
#: for one bucket (hash field) of a rolling window (whose total ``t`` moves with it); either
#: is corrected only while it exists.
_COUNTER_LUA = """
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
"""

#: Globals: 13 ARGV (request id, now ms, expiry ms, prompt, max tokens, min tokens, input
#: cost, output price, scope count, has account, holds keep ms, current bucket, oldest
#: bucket counted). Per scope: 6 KEYS (inflight, resv, rpm, tpm, day, month) and 10 ARGV
#: (base, rpm, tpm, max_concurrent, day, month limits (-1 = none), window/day/month TTL ms,
#: the space-separated suffixes of the token counters it charges). Then, with an account,
#: 3 KEYS (account, its inflight, its resv).
#: Returns {admitted 0/1, granted, balance or nil, held, then 9 readings per scope}
#: (requests, inflight, tpm, day, month, rpm reset/retry ms, tpm reset/retry ms).
ADMIT_LUA = (
    (
        _COUNTER_LUA
        + """
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
"""
    )
    .replace("@WINDOW_BUCKETS@", str(WINDOW_BUCKETS))
    .replace("@BUCKET_MS@", str(BUCKET_MS))
)

#: KEYS: the done marker; per scope: inflight, resv, then its counters; then, with an
#: account: account, inflight, resv. ARGV: request id, reserved tokens, used tokens,
#: reserved nanos, cost nanos, done TTL ms, scope count, has account, counters per scope.
#: Returns 1 when applied, 0 when this request was already settled.
SETTLE_LUA = (
    _COUNTER_LUA
    + """
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
"""
)

#: KEYS: per scope: inflight, resv, then its counters; then, with an account: account,
#: inflight, resv. ARGV: request id, scope count, has account, counters per scope.
#: Releases whatever this request still holds (nothing when its admission never ran), by the
#: amounts stored with the reservation; marks nothing, so a later settle still applies.
RELEASE_LUA = (
    _COUNTER_LUA
    + """
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
"""
)

#: KEYS: the account, the idempotency record. ARGV: nanos to add, the largest balance
#: allowed, the request's fingerprint, how long to keep the record (ms). Returns {1, record}
#: when the key has a record (nothing added), {2, new balance} when applied (and recorded),
#: {0} (nothing added) when the balance would pass the largest.
TOPUP_ONCE_LUA = """
local found = redis.call('GET', KEYS[2])
if found then return {1, found} end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
if balance + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0} end
local new = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
local record = '{"f":"' .. ARGV[3] .. '","s":200,"n":' .. string.format('%d', new) .. '}'
redis.call('SET', KEYS[2], record, 'PX', ARGV[4])
return {2, new}
"""

#: KEYS: the account. ARGV: nanos to add, the largest balance allowed. Returns the new
#: balance, or nil (nothing added) when it would pass the largest.
TOPUP_LUA = """
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
if balance + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return false end
return redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
"""

_UNREACHABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    OSError,
    TimeoutError,
)

_TIMEOUTS = (redis_errors.TimeoutError, TimeoutError)

#: A call's whole deadline (waiting for a pooled connection included), in socket timeouts.
DEADLINE_FACTOR = 4

#: Settles kept for replay while Redis is unreachable (the oldest are dropped beyond this).
PENDING_SETTLES_MAX = 100_000


class _PipelinedScript:
    """One script run on the pipelined connection (replayable: it can be called again)."""

    __slots__ = ("args", "keys", "pipeline", "script")

    def __init__(
        self, pipeline: PipelinedRedis, script: LuaScript, keys: list[str], args: list[Any]
    ) -> None:
        self.pipeline = pipeline
        self.script = script
        self.keys = keys
        self.args = args

    def __call__(self) -> Awaitable[Any]:
        return self.pipeline.evalsha(self.script, self.keys, self.args)


class RedisQuotaStore(QuotaStore):
    """The quota contract on Redis, shared by every gateway process that uses the same URL."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        reservation_ttl_s: float = 600,
        timeout_ms: int = 250,
        retry_interval_ms: int = 500,
        key_prefix: str = "maas:quota:",
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.prefix = key_prefix
        self.reservation_ttl_ms = int(reservation_ttl_s * 1000)
        self.timeout_s = timeout_ms / 1000
        self.retry_interval_s = retry_interval_ms / 1000
        # Requests beyond `max_connections` wait for a free connection (bounded by the
        # deadline in `_call`) instead of failing.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=True,
        )
        self._client = Redis.from_pool(pool)
        self._admit_script = self._client.register_script(ADMIT_LUA)
        self._settle_script = self._client.register_script(SETTLE_LUA)
        self._release_script = self._client.register_script(RELEASE_LUA)
        self._topup_script = self._client.register_script(TOPUP_LUA)
        self._topup_once_script = self._client.register_script(TOPUP_ONCE_LUA)
        self._begin_script = self._client.register_script(BEGIN_LUA)
        self._abandon_script = self._client.register_script(ABANDON_LUA)
        # The two scripts every request runs go over one pipelined connection (hiredis
        # packing, no pool checkout); everything else, and URLs it cannot reach, via redis-py.
        self._pipeline = (
            PipelinedRedis(url, timeout_s=self.timeout_s)
            if PipelinedRedis is not None and PipelinedRedis.supports(url)
            else None
        )
        self._lua = (
            {lua: LuaScript(lua) for lua in (ADMIT_LUA, SETTLE_LUA, RELEASE_LUA)}
            if self._pipeline is not None
            else {}
        )
        self._down_until = 0.0
        self._pending: deque[Callable[[], Awaitable[Any]]] = deque(maxlen=PENDING_SETTLES_MAX)
        self._replay_task: asyncio.Task[None] | None = None
        self._openings: dict[str, int] = {}  # account -> initial balance not yet written
        self._openings_lock = asyncio.Lock()
        self._openings_kept = False  # some were kept through an outage (for the log)

    @property
    def pending_settles(self) -> int:
        """Settles (and releases of lost admissions) waiting for Redis to answer again."""
        return len(self._pending)

    @property
    def pending_openings(self) -> int:
        """Initial balances waiting for Redis to answer again."""
        return len(self._openings)

    def _script(self, lua: str, keys: list[str], args: list[Any]) -> Callable[[], Awaitable[Any]]:
        """A call running one of the Lua scripts (the pipelined connection when there is one)."""
        if self._pipeline is not None:
            return _PipelinedScript(self._pipeline, self._lua[lua], keys, args)
        registered = {
            ADMIT_LUA: self._admit_script,
            SETTLE_LUA: self._settle_script,
            RELEASE_LUA: self._release_script,
        }[lua]
        return lambda: registered(keys=keys, args=args)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call with a hard deadline; failures become `QuotaUnavailable`.

        Initial balances still waiting are written first, so every call sees them.
        """
        if self._openings:
            await self._write_openings()
        return await self._run(what, call)

    async def _run(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        if time.monotonic() < self._down_until:
            raise QuotaUnavailable(f"quota store (Redis) is unreachable; {what} refused")
        try:
            if isinstance(call, _PipelinedScript):  # it has a deadline per command already
                result = await call()
            else:
                async with asyncio.timeout(self.timeout_s * DEADLINE_FACTOR):
                    result = await call()
        except _UNREACHABLE as exc:
            self._down_until = time.monotonic() + self.retry_interval_s
            raise QuotaUnavailable(
                f"quota store (Redis) is unreachable; {what} failed: {exc or type(exc).__name__}"
            ) from exc
        except redis_errors.RedisError as exc:
            raise QuotaUnavailable(f"quota store (Redis) refused {what}: {exc}") from exc
        if self._pending and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.create_task(self._replay_pending())
        return result

    async def admit(self, req: AdmitRequest) -> Admission:
        plans = [plan_scope(scope, req.now, self.prefix) for scope in req.scopes]
        now_ms = epoch_ms(req.now)
        keys: list[str] = []
        args: list[Any] = [
            req.request_id,
            now_ms,
            now_ms + self.reservation_ttl_ms,
            req.prompt_tokens,
            req.max_tokens,
            min(req.min_tokens, req.max_tokens),
            req.input_cost_nanos,
            req.output_price_nanos,
            len(plans),
            1 if req.balance_account is not None else 0,
            HOLDS_KEEP_MS,
            now_ms // BUCKET_MS,
            oldest_bucket(now_ms),
        ]
        for plan in plans:
            base, limits = plan.base, plan.scope.limits
            keys += [
                f"{base}:inflight",
                f"{base}:resv",
                base + plan.rpm,
                base + plan.tpm,
                base + plan.day,
                base + plan.month,
            ]
            args += [
                base,
                *(
                    -1 if limit is None else limit
                    for limit in (
                        limits.rpm,
                        limits.tpm,
                        limits.max_concurrent,
                        limits.tokens_per_day,
                        limits.tokens_per_month,
                    )
                ),
                counter_ttl_ms(plan, plan.rpm, 0),
                counter_ttl_ms(plan, plan.day, self.reservation_ttl_ms),
                counter_ttl_ms(plan, plan.month, self.reservation_ttl_ms),
                " ".join(plan.counters),
            ]
        if req.balance_account is not None:
            abase = account_base(self.prefix, req.balance_account)
            keys += [abase, f"{abase}:inflight", f"{abase}:resv"]
        try:
            reply = await self._call("admission", self._script(ADMIT_LUA, keys, args))
        except QuotaUnavailable as exc:
            if isinstance(exc.__cause__, _TIMEOUTS):  # the script may have run, its reply lost
                self._pending.append(self._release_call(req, plans))
            raise
        admitted, granted, balance, held = (int(reply[0]), int(reply[1]), reply[2], int(reply[3]))
        values = [int(v) for v in reply[4:]]
        readings = [ScopeReading(*values[i * 9 : i * 9 + 9]) for i in range(len(plans))]
        account = None
        if req.balance_account is not None:
            account = AccountReading(int(balance) if balance is not None else None, held)
        if not admitted:
            raise refusal(req, plans, readings, account)
        expected = decide(req, readings, account)
        if expected != (True, granted):  # the script mirrors decide(); say so if it drifts
            logger.error("quota script and decide() disagree: %s vs %s", expected, granted)
        tokens = req.prompt_tokens + granted
        return Admission(
            request_id=req.request_id,
            granted_max_tokens=granted,
            reserved_tokens=tokens,
            reserved_nanos=(
                req.input_cost_nanos + granted * req.output_price_nanos
                if req.balance_account is not None
                else 0
            ),
            headers=ratelimit_headers(plans, readings, 1, tokens),
            balance_account=req.balance_account,
            charges=tuple(
                ScopeCharge(plan.scope.id, plan.base, plan.counters) for plan in plans if plan.holds
            ),
            backend=self.backend,
        )

    def _settle_call(
        self, admission: Admission, used_tokens: int, cost_nanos: int
    ) -> Callable[[], Awaitable[Any]]:
        keys = [f"{self.prefix}done:{admission.request_id}"]
        per_scope = []
        for charge in admission.charges:
            keys += [f"{charge.base}:inflight", f"{charge.base}:resv"]
            keys += [charge.base + suffix for suffix in charge.counters]
            per_scope.append(len(charge.counters))
        if admission.balance_account is not None:
            abase = account_base(self.prefix, admission.balance_account)
            keys += [abase, f"{abase}:inflight", f"{abase}:resv"]
        args = [
            admission.request_id,
            admission.reserved_tokens,
            used_tokens,
            admission.reserved_nanos,
            cost_nanos,
            self.reservation_ttl_ms + SETTLED_KEEP_MS,
            len(per_scope),
            1 if admission.balance_account is not None else 0,
            *per_scope,
        ]
        return self._script(SETTLE_LUA, keys, args)

    def _release_call(
        self, req: AdmitRequest, plans: list[ScopePlan]
    ) -> Callable[[], Awaitable[Any]]:
        """Undo an admission whose reply never came (a timeout), so it holds nothing."""
        keys: list[str] = []
        per_scope = []
        for plan in plans:
            if plan.holds:
                keys += [f"{plan.base}:inflight", f"{plan.base}:resv"]
                keys += [plan.base + suffix for suffix in plan.counters]
                per_scope.append(len(plan.counters))
        if req.balance_account is not None:
            abase = account_base(self.prefix, req.balance_account)
            keys += [abase, f"{abase}:inflight", f"{abase}:resv"]
        args = [
            req.request_id,
            len(per_scope),
            1 if req.balance_account is not None else 0,
            *per_scope,
        ]
        return self._script(RELEASE_LUA, keys, args)

    async def settle(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        """Settle now, or queue the settle for replay if Redis cannot be reached."""
        if not admission.charges and admission.balance_account is None:
            return  # only request counters were charged: nothing to correct or release
        call = self._settle_call(admission, used_tokens, cost_nanos)
        try:
            await self._call("settle", call)
        except QuotaUnavailable as exc:
            self._pending.append(call)
            logger.warning(
                "settle of %s queued until Redis answers (%d queued): %s",
                admission.request_id,
                len(self._pending),
                exc,
            )

    async def _replay_pending(self) -> None:
        while self._pending:
            call = self._pending[0]
            try:
                await self._call("settle replay", call)
            except QuotaUnavailable:
                return
            if self._pending and self._pending[0] is call:
                self._pending.popleft()

    async def topup(self, account: str, nanos: int) -> int:
        if nanos <= 0:
            raise ValueError(f"a top-up must be positive, not {nanos}")
        keys, args = [account_base(self.prefix, account)], [nanos, MAX_BALANCE_NANOS]
        result = await self._call("top-up", lambda: self._topup_script(keys=keys, args=args))
        if result is None:
            raise ValueError(f"a balance cannot exceed {format_amount(MAX_BALANCE_NANOS)}")
        return int(result)

    def _record_key(self, claim: Claim) -> str:
        return f"{self.prefix}idem:{claim.key}"

    async def topup_once(self, account: str, nanos: int, claim: Claim) -> tuple[int, bool]:
        if nanos <= 0:
            raise ValueError(f"a top-up must be positive, not {nanos}")
        keys = [account_base(self.prefix, account), self._record_key(claim)]
        args: list[str | int] = [nanos, MAX_BALANCE_NANOS, claim.fingerprint, RESULT_KEEP_MS]
        reply = await self._call("top-up", lambda: self._topup_once_script(keys=keys, args=args))
        outcome = int(reply[0])
        if outcome == 0:
            raise ValueError(f"a balance cannot exceed {format_amount(MAX_BALANCE_NANOS)}")
        if outcome == 2:
            return int(reply[1]), False
        stored = resolve(claim, reply[1])
        assert stored is not None
        return int(stored.n or 0), True

    async def idempotency_begin(self, claim: Claim) -> Stored | None:
        keys = [self._record_key(claim)]
        args: list[str | int] = [encode_stored(Stored(claim.fingerprint)), PENDING_KEEP_MS]
        found = await self._call("idempotency", lambda: self._begin_script(keys=keys, args=args))
        return resolve(claim, found) if found is not None else None

    async def idempotency_finish(self, claim: Claim, status: int, body: str) -> None:
        key, value = self._record_key(claim), encode_stored(Stored(claim.fingerprint, status, body))
        await self._call("idempotency", lambda: self._client.set(key, value, px=RESULT_KEEP_MS))

    async def idempotency_abandon(self, claim: Claim) -> None:
        keys, args = [self._record_key(claim)], [encode_stored(Stored(claim.fingerprint))]
        await self._call("idempotency", lambda: self._abandon_script(keys=keys, args=args))

    async def set_balance(self, account: str, nanos: int) -> None:
        """Open an account with `nanos` unless Redis knows it already (HSETNX: a restart or
        another replica never resets a balance). When Redis cannot be reached this does not
        raise: the balance is kept and written before any other call once Redis answers."""
        self._openings.setdefault(account, nanos)
        try:
            await self._write_openings()
        except QuotaUnavailable as exc:
            self._openings_kept = True
            logger.warning(
                "initial balance of account %s kept until Redis answers (%d kept): %s",
                account,
                len(self._openings),
                exc,
            )

    async def _write_openings(self) -> None:
        """Write every initial balance still waiting, in one round trip."""
        async with self._openings_lock:
            waiting = dict(self._openings)
            if not waiting:
                return

            async def write() -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for account, nanos in waiting.items():
                    pipe.hsetnx(account_base(self.prefix, account), "balance", nanos)
                return await pipe.execute()  # type: ignore[no-any-return]

            await self._run("set balance", write)
            for account in waiting:
                self._openings.pop(account, None)
            if self._openings_kept:
                self._openings_kept = False
                logger.info("wrote the initial balances kept while Redis was unreachable")

    async def balance(self, account: str) -> int | None:
        key = account_base(self.prefix, account)
        value = await self._call("balance", lambda: self._client.hget(key, "balance"))
        return int(value) if value is not None else None

    async def remaining(self, scope: Scope, now: datetime) -> dict[str, int | None]:
        plan = plan_scope(scope, now, self.prefix)
        base = plan.base

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(base + plan.rpm)
            pipe.hgetall(base + plan.tpm)
            pipe.get(base + plan.day)
            pipe.get(base + plan.month)
            pipe.zcount(f"{base}:inflight", f"({plan.periods.now_ms}", "+inf")
            return await pipe.execute()  # type: ignore[no-any-return]

        rpm, tpm, day, month, inflight = await self._call("remaining", read)
        oldest = oldest_bucket(plan.periods.now_ms)

        def used(window: dict[str, str]) -> int:
            return sum(
                int(amount)
                for bucket, amount in window.items()
                if bucket.isdigit() and int(bucket) >= oldest
            )

        return remaining_from(
            scope.limits,
            used(rpm),
            used(tpm),
            int(inflight),
            int(day or 0),
            int(month or 0),
        )

    async def ping(self) -> bool:
        """Whether Redis answers now."""
        try:
            await self._call("ping", self._client.ping)  # type: ignore[arg-type]
        except QuotaUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            try:
                await self._replay_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._pipeline is not None:
            await self._pipeline.aclose()
        await self._client.aclose()
