"""The Redis quota store: every gateway replica shares one truth through two Lua scripts.

`admit` and `settle` are one round trip each (EVALSHA; the script is loaded again on
NOSCRIPT, e.g. after Redis restarts), sent over one pipelined connection
(`billing.quota.pipeline`; a ``redis://`` or ``unix://`` URL, else redis-py's pool), or on
a Redis Cluster over one per master (`billing.quota.cluster_pipeline`). Python computes key
names, calendar periods and TTLs (zoneinfo), once per scope and second (`Planner`); the
scripts, in the ``.lua`` files beside this module, do the atomic arithmetic, mirroring
`billing.quota.policy.decide`. A script gets each scope's key prefix and derives the keys.

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

On a Redis Cluster (``cluster=True``) every name carries the request's hash tag after the
prefix, ``maas:quota:{<tenant>}:s:...``, so each script touches the keys of one slot only
(those of the expired reservations it releases included); a top-up's idempotency record
is ``{<account>}:idem:<key>``. After a failure, calls fail fast per slot, so a dead master
does not refuse the tenants of the others.

Lua counts in doubles: amounts stay below 2**53 (nine million currency units in nanos).

Availability: every command has a short socket timeout (`timeout_ms`), no retries (redis-py's
cluster client: one, to reach a promoted master), and a whole-call deadline of four
timeouts, so a dead or hung Redis turns into `QuotaUnavailable` quickly; after a failure,
calls fail fast for `retry_interval_ms` and then try again, so the store recovers by
itself. A settle that cannot reach Redis is queued and replayed once Redis answers
(settles are idempotent). An admission that was sent but got no answer (a timeout) may
still have run: its release is queued the same way, so a refused request never keeps a
reservation. An initial balance (`set_balance`) that cannot be written is kept too, and
written before any other call once Redis answers, so a settle replayed into a new account
never comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.crc import key_slot

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
from billing.quota.cluster_pipeline import ClusterPipelines, Redirected
from billing.quota.contract import (
    MAX_BALANCE_NANOS,
    Admission,
    AdmitRequest,
    QuotaStore,
    QuotaUnavailable,
    Scope,
    ScopeCharge,
)
from billing.quota.pipeline import LuaScript, PipelinedRedis
from billing.quota.plan import (
    BUCKET_MS,
    HOLDS_KEEP_MS,
    PERIOD_MARGIN_MS,
    SETTLED_KEEP_MS,
    WINDOW_BUCKETS,
    Planner,
    ScopePlan,
    epoch_ms,
    oldest_bucket,
)
from billing.quota.policy import (
    AccountReading,
    ScopeReading,
    decide,
    ratelimit_headers,
    refusal,
    remaining_from,
)

__all__ = ["RedisQuotaStore", "lua_source"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The scripts, each its `.lua` file beside this module after the shared helpers it uses.
_SCRIPT_FILES: dict[str, tuple[str, ...]] = {
    "admit": ("counters.lua", "admit.lua"),
    "settle": ("counters.lua", "settle.lua"),
    "release": ("counters.lua", "release.lua"),
    "topup": ("topup.lua",),
    "topup_once": ("topup_once.lua",),
}


@functools.cache
def lua_source(name: str) -> str:
    """The Lua source of a script (``"admit"``, ``"settle"``, ...), constants filled in."""
    files = importlib.resources.files(__package__)
    source = "".join(files.joinpath(part).read_text("utf-8") for part in _SCRIPT_FILES[name])
    return source.replace("@WINDOW_BUCKETS@", str(WINDOW_BUCKETS)).replace(
        "@BUCKET_MS@", str(BUCKET_MS)
    )


_UNREACHABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ClusterDownError,
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    redis_errors.RedisClusterException,  # e.g. no node serves the slot now
    OSError,
    TimeoutError,
)

_TIMEOUTS = (redis_errors.TimeoutError, TimeoutError)

#: A call's whole deadline (waiting for a pooled connection included), in socket timeouts.
DEADLINE_FACTOR = 4

#: Settles kept for replay while Redis is unreachable (the oldest are dropped beyond this).
PENDING_SETTLES_MAX = 100_000


def _address(address: str) -> tuple[str, int]:
    """(host, port) from ``host:port``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "localhost", int(port)


def _cluster_node(address: str) -> ClusterNode:
    """A startup node from ``host:port``."""
    return ClusterNode(*_address(address))


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


class _ClusterScript:
    """One script run on the cluster's pipelined connections (replayable), through redis-py
    when the cluster is moving its slot."""

    __slots__ = ("args", "fallback", "keys", "pipelines", "script", "slot")

    def __init__(
        self,
        pipelines: ClusterPipelines,
        script: LuaScript,
        keys: list[str],
        args: list[Any],
        slot: int,
        fallback: Callable[..., Awaitable[Any]],
    ) -> None:
        self.pipelines = pipelines
        self.script = script
        self.keys = keys
        self.args = args
        self.slot = slot
        self.fallback = fallback

    async def __call__(self) -> Any:
        try:
            return await self.pipelines.evalsha(self.script, self.keys, self.args, self.slot)
        except Redirected:
            return await self.fallback(keys=self.keys, args=self.args)


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
        cluster: bool = False,
        cluster_nodes: Sequence[str] = (),
    ) -> None:
        self.url = url
        self.prefix = key_prefix
        self.cluster = cluster
        self.planner = Planner(key_prefix, tagged=cluster)
        self.reservation_ttl_ms = int(reservation_ttl_s * 1000)
        self.timeout_s = timeout_ms / 1000
        self.retry_interval_s = retry_interval_ms / 1000
        self._client: Redis | RedisCluster
        self._gate: asyncio.Semaphore | None
        if cluster:
            # redis-py follows MOVED and ASK and refreshes the slot map after a failover;
            # one retry lets a call reach a newly promoted master at once.
            # Its pools do not wait for a free connection: calls beyond `max_connections`
            # wait here instead (bounded by the deadline in `_run`).
            self._gate = asyncio.Semaphore(max_connections)
            self._client = RedisCluster.from_url(
                url,
                startup_nodes=[_cluster_node(node) for node in cluster_nodes],
                require_full_coverage=False,
                max_connections=max_connections,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry=AsyncRetry(NoBackoff(), 1),
                health_check_interval=0,
                decode_responses=True,
            )
        else:
            self._gate = None
            # Requests beyond `max_connections` wait for a free connection (bounded by the
            # deadline in `_call`) instead of failing.
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=None,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry=AsyncRetry(NoBackoff(), 0),
                retry_on_timeout=False,
                health_check_interval=0,
                decode_responses=True,
            )
            self._client = Redis.from_pool(pool)
        self._registered = {
            name: self._client.register_script(lua_source(name)) for name in _SCRIPT_FILES
        }
        self._topup_script = self._registered["topup"]
        self._topup_once_script = self._registered["topup_once"]
        self._begin_script = self._client.register_script(BEGIN_LUA)
        self._abandon_script = self._client.register_script(ABANDON_LUA)
        # The two scripts every request runs go over one pipelined connection (hiredis
        # packing, no pool checkout); everything else, clusters and URLs it cannot reach,
        # via redis-py.
        self._pipeline = (
            PipelinedRedis(url, timeout_s=self.timeout_s)
            if not cluster and PipelinedRedis.supports(url)
            else None
        )
        self._cluster_pipelines = (
            ClusterPipelines(url, [_address(n) for n in cluster_nodes], timeout_s=self.timeout_s)
            if cluster and PipelinedRedis.supports(url)
            else None
        )
        self._lua = {name: LuaScript(lua_source(name)) for name in ("admit", "settle", "release")}
        self._down_until: dict[int, float] = {}  # slot -> fail fast until (monotonic)
        # (call, slot) of settles and releases waiting for Redis
        self._pending: deque[tuple[Callable[[], Awaitable[Any]], int]] = deque(
            maxlen=PENDING_SETTLES_MAX
        )
        self._replay_task: asyncio.Task[None] | None = None
        self._openings: dict[str, int] = {}  # account -> initial balance not yet written
        self._openings_lock = asyncio.Lock()
        self._openings_kept = False  # some were kept through an outage (for the log)
        self._resettling: set[asyncio.Task[None]] = set()  # settles sent again in full

    @property
    def pending_settles(self) -> int:
        """Settles (and releases of lost admissions) waiting for Redis to answer again."""
        return len(self._pending)

    @property
    def pending_openings(self) -> int:
        """Initial balances waiting for Redis to answer again."""
        return len(self._openings)

    def _script(
        self, name: str, keys: list[str], args: list[Any], slot: int
    ) -> Callable[[], Awaitable[Any]]:
        """A call running one of the Lua scripts (pipelined connections when there are)."""
        registered = self._registered[name]
        if self._pipeline is not None:
            return _PipelinedScript(self._pipeline, self._lua[name], keys, args)
        if self._cluster_pipelines is not None:
            pipelines, script = self._cluster_pipelines, self._lua[name]
            return _ClusterScript(pipelines, script, keys, args, slot, registered)
        return lambda: registered(keys=keys, args=args)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]], slot: int = 0) -> T:
        """Run one Redis call with a hard deadline; failures become `QuotaUnavailable`.

        Initial balances still waiting are written first, so every call sees them. After a
        failure, calls for the same cluster slot (every call, on a standalone Redis) fail
        fast for `retry_interval_ms`.
        """
        if self._openings:
            await self._write_openings()
        return await self._run(what, call, slot)

    async def _run(self, what: str, call: Callable[[], Awaitable[T]], slot: int = 0) -> T:
        down_until = self._down_until.get(slot)
        if down_until is not None and time.monotonic() < down_until:
            raise QuotaUnavailable(f"quota store (Redis) is unreachable; {what} refused")
        try:
            if isinstance(call, _PipelinedScript):  # it has a deadline per command already
                result = await call()
            elif isinstance(call, _ClusterScript):  # pipelined: no pool to wait for
                async with asyncio.timeout(self.timeout_s * DEADLINE_FACTOR):
                    result = await call()
            elif self._gate is not None:
                async with asyncio.timeout(self.timeout_s * DEADLINE_FACTOR), self._gate:
                    result = await call()
            else:
                async with asyncio.timeout(self.timeout_s * DEADLINE_FACTOR):
                    result = await call()
        except _UNREACHABLE as exc:
            self._down_until[slot] = time.monotonic() + self.retry_interval_s
            raise QuotaUnavailable(
                f"quota store (Redis) is unreachable; {what} failed: {exc or type(exc).__name__}"
            ) from exc
        except redis_errors.RedisError as exc:
            raise QuotaUnavailable(f"quota store (Redis) refused {what}: {exc}") from exc
        self._replay_soon()
        return result

    async def admit(self, req: AdmitRequest) -> Admission:
        now_ms = epoch_ms(req.now)
        plans, shard = self.planner.plans(req, now_ms)
        keys = [plan.base for plan in plans]
        has_account = req.balance_account is not None
        if req.balance_account is not None:
            keys.append(self.planner.account_base(req.balance_account))
        args: list[Any] = [
            req.request_id,
            now_ms,
            now_ms + self.reservation_ttl_ms,
            req.prompt_tokens,
            req.max_tokens,
            min(req.min_tokens, req.max_tokens),
            req.input_cost_nanos,
            req.output_price_nanos,
            1 if has_account else 0,
            HOLDS_KEEP_MS,
            oldest_bucket(now_ms),
            self.reservation_ttl_ms + PERIOD_MARGIN_MS,
        ]
        for plan in plans:
            args += plan.args
        slot = self._slot(shard)
        try:
            reply = await self._call("admission", self._script("admit", keys, args, slot), slot)
        except QuotaUnavailable as exc:
            if isinstance(exc.__cause__, _TIMEOUTS):  # the script may have run, its reply lost
                self._pending.append(self._release_call(req, plans, slot))
            raise
        granted, balance, held = int(reply[1]), reply[2], int(reply[3])
        readings = [ScopeReading(*reply[i : i + 9]) for i in range(4, 4 + 9 * len(plans), 9)]
        account = None
        if has_account:
            account = AccountReading(int(balance) if balance is not None else None, held)
        if not reply[0]:
            raise refusal(req, plans, readings, account, now_ms)
        expected = decide(req, readings, account)
        if expected != (True, granted):  # the script mirrors decide(); say so if it drifts
            logger.error("quota script and decide() disagree: %s vs %s", expected, granted)
        tokens = req.prompt_tokens + granted
        return Admission(
            request_id=req.request_id,
            granted_max_tokens=granted,
            reserved_tokens=tokens,
            reserved_nanos=(
                req.input_cost_nanos + granted * req.output_price_nanos if has_account else 0
            ),
            headers=ratelimit_headers(plans, readings, 1, tokens, now_ms),
            balance_account=req.balance_account,
            charges=tuple(
                ScopeCharge(plan.scope.id, plan.base, plan.counters) for plan in plans if plan.holds
            ),
            backend=self.backend,
            shard=shard,
        )

    def _slot(self, shard: str | None) -> int:
        """The cluster slot of a hash tag (0 on a standalone Redis): the unit of fail-fast."""
        if shard is None or not self.cluster:
            return 0
        return key_slot(shard.encode())

    def _settle_call(
        self, admission: Admission, used_tokens: int, cost_nanos: int
    ) -> tuple[Callable[[], Awaitable[Any]], int]:
        keys = [self.planner.done_key(admission.request_id, admission.shard)]
        keys += [charge.base for charge in admission.charges]
        if admission.balance_account is not None:
            keys.append(self.planner.account_base(admission.balance_account))
        args = [
            admission.request_id,
            admission.reserved_tokens,
            used_tokens,
            admission.reserved_nanos,
            cost_nanos,
            self.reservation_ttl_ms + SETTLED_KEEP_MS,
            1 if admission.balance_account is not None else 0,
            *(" ".join(charge.counters) for charge in admission.charges),
        ]
        slot = self._slot(admission.shard)
        return self._script("settle", keys, args, slot), slot

    def _release_call(
        self, req: AdmitRequest, plans: list[ScopePlan], slot: int
    ) -> tuple[Callable[[], Awaitable[Any]], int]:
        """Undo an admission whose reply never came (a timeout), so it holds nothing."""
        keys = [plan.base for plan in plans if plan.holds]
        if req.balance_account is not None:
            keys.append(self.planner.account_base(req.balance_account))
        args = [req.request_id, 1 if req.balance_account is not None else 0]
        return self._script("release", keys, args, slot), slot

    async def settle(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        """Settle now, or queue the settle for replay if Redis cannot be reached."""
        if not admission.charges and admission.balance_account is None:
            return  # only request counters were charged: nothing to correct or release
        call = self._settle_call(admission, used_tokens, cost_nanos)
        try:
            await self._call("settle", *call)
        except QuotaUnavailable as exc:
            self._keep_settle(admission, call, exc)

    def _keep_settle(
        self,
        admission: Admission,
        call: tuple[Callable[[], Awaitable[Any]], int],
        why: Exception,
    ) -> None:
        """Queue a settle Redis did not take, for replay once it answers again."""
        self._pending.append(call)
        logger.warning(
            "settle of %s queued until Redis answers (%d queued): %s",
            admission.request_id,
            len(self._pending),
            why,
        )

    def settle_soon(self, admission: Admission, used_tokens: int, cost_nanos: int) -> bool:
        """Send the settle on the pipelined connection without waiting for Redis.

        A settle Redis could not take is queued for replay, as `settle` does; one it
        refused (a script flushed by a restart) is sent again in full. False, sending
        nothing, when it cannot go that way: no pipelined connection open, initial balances
        still to write, or Redis marked unreachable. Then call `settle`.
        """
        if not admission.charges and admission.balance_account is None:
            return True
        pipeline = self._pipeline
        if pipeline is None or self._openings or self._down_until.get(0, 0.0) > time.monotonic():
            return False
        kept = self._settle_call(admission, used_tokens, cost_nanos)
        call, slot = kept
        assert isinstance(call, _PipelinedScript)
        command = ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)

        def answered(reply: Any) -> None:
            if not isinstance(reply, Exception):
                self._replay_soon()
            elif isinstance(reply, redis_errors.ResponseError):
                self._background(self.settle(admission, used_tokens, cost_nanos))
            else:  # unreachable, or no answer in time (it may have run: settles are idempotent)
                self._down_until[slot] = time.monotonic() + self.retry_interval_s
                self._keep_settle(admission, kept, reply)

        return pipeline.send_soon(command, answered)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._resettling.add(task)
        task.add_done_callback(self._resettling.discard)

    def _replay_soon(self) -> None:
        """Replay the queued settles, now that Redis answers (once at a time)."""
        if self._pending and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.create_task(self._replay_pending())

    async def _replay_pending(self) -> None:
        while self._pending:
            call = self._pending[0]
            try:
                await self._call("settle replay", *call)
            except QuotaUnavailable:
                return
            if self._pending and self._pending[0] is call:
                self._pending.popleft()

    async def topup(self, account: str, nanos: int) -> int:
        if nanos <= 0:
            raise ValueError(f"a top-up must be positive, not {nanos}")
        keys, args = [self.planner.account_base(account)], [nanos, MAX_BALANCE_NANOS]
        result = await self._call(
            "top-up", lambda: self._topup_script(keys=keys, args=args), self._slot(account)
        )
        if result is None:
            raise ValueError(f"a balance cannot exceed {format_amount(MAX_BALANCE_NANOS)}")
        return int(result)

    def _record_key(self, claim: Claim) -> str:
        return self.planner.base(f"idem:{claim.key}", None)

    async def topup_once(self, account: str, nanos: int, claim: Claim) -> tuple[int, bool]:
        if nanos <= 0:
            raise ValueError(f"a top-up must be positive, not {nanos}")
        # On a cluster the record shares the account's slot: one script touches both.
        record = self.planner.base(f"idem:{claim.key}", account)
        keys = [self.planner.account_base(account), record]
        args: list[str | int] = [nanos, MAX_BALANCE_NANOS, claim.fingerprint, RESULT_KEEP_MS]
        reply = await self._call(
            "top-up",
            lambda: self._topup_once_script(keys=keys, args=args),
            self._slot(account),
        )
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
                    pipe.hsetnx(self.planner.account_base(account), "balance", nanos)
                return await pipe.execute()  # type: ignore[no-any-return]

            await self._run("set balance", write)
            for account in waiting:
                self._openings.pop(account, None)
            if self._openings_kept:
                self._openings_kept = False
                logger.info("wrote the initial balances kept while Redis was unreachable")

    async def balance(self, account: str) -> int | None:
        key = self.planner.account_base(account)
        value = await self._call(
            "balance", lambda: self._client.hget(key, "balance"), self._slot(account)
        )
        return int(value) if value is not None else None

    async def remaining(self, scope: Scope, now: datetime) -> dict[str, int | None]:
        now_ms = epoch_ms(now)
        plan = self.planner.plan(scope, now_ms)
        base = plan.base

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(base + plan.rpm)
            pipe.hgetall(base + plan.tpm)
            pipe.get(base + plan.day)
            pipe.get(base + plan.month)
            pipe.zcount(f"{base}:inflight", f"({now_ms}", "+inf")
            return await pipe.execute()  # type: ignore[no-any-return]

        slot = self._slot(self.planner.tag_of(scope))
        rpm, tpm, day, month, inflight = await self._call("remaining", read, slot)
        oldest = oldest_bucket(now_ms)

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

    async def aclose(self) -> None:
        if self._pipeline is not None:  # settles sent without waiting are answered first
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s * DEADLINE_FACTOR):
                    await self._pipeline.drain()
                    while self._resettling:
                        await asyncio.gather(*self._resettling, return_exceptions=True)
        if self._replay_task is not None:
            self._replay_task.cancel()
            try:
                await self._replay_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._pipeline is not None:
            await self._pipeline.aclose()
        if self._cluster_pipelines is not None:
            await self._cluster_pipelines.aclose()
        await self._client.aclose()
