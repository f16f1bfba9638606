"""The in-process quota store: dictionaries behind a lock, no awaits inside."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from billing.idempotency import RESULT_KEEP_MS, Claim, MemoryIdempotency, Stored, resolve
from billing.money import format_amount
from billing.quota.contract import (
    MAX_BALANCE_NANOS,
    Admission,
    AdmitRequest,
    QuotaStore,
    Scope,
    ScopeCharge,
)
from billing.quota.plan import (
    SETTLED_KEEP_MS,
    Planner,
    ScopePlan,
    counter_expiry_ms,
    epoch_ms,
    oldest_bucket,
    split_window_counter,
)
from billing.quota.policy import (
    AccountReading,
    ScopeReading,
    decide,
    min_tokens,
    ratelimit_headers,
    refusal,
    remaining_from,
    window_times,
)

__all__ = ["MemoryQuotaStore", "RollingWindow"]


class RollingWindow:
    """One rolling window in memory: its buckets, oldest first, and their running total."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.total = 0

    def prune(self, now_ms: int) -> None:
        """Drop the buckets that have left the window."""
        oldest = oldest_bucket(now_ms)
        stale = []
        for bucket in self.buckets:
            if bucket >= oldest:
                break
            stale.append(bucket)
        for bucket in stale:
            self.total -= self.buckets.pop(bucket)

    def add(self, bucket: int, amount: int) -> None:
        self.buckets[bucket] = self.buckets.get(bucket, 0) + amount
        self.total += amount

    def correct(self, bucket: int, delta: int) -> None:
        """Add `delta` to a bucket still in the window (a settle or a released hold)."""
        if bucket in self.buckets:
            self.buckets[bucket] += delta
            self.total += delta

    def first(self) -> int | None:
        return next(iter(self.buckets), None)


@dataclass(slots=True)
class _Hold:
    expires_ms: int
    amount: int
    counters: tuple[str, ...] = ()


class MemoryQuotaStore(QuotaStore):
    """The quota contract for one process: dictionaries behind a lock, no awaits inside.

    It mirrors the Redis store key for key, so the same admission can be replayed there.
    """

    backend = "memory"

    def __init__(
        self,
        *,
        reservation_ttl_s: float = 600,
        key_prefix: str = "maas:quota:",
        tagged: bool = False,
    ) -> None:
        self.reservation_ttl_ms = int(reservation_ttl_s * 1000)
        self.prefix = key_prefix
        self.planner = Planner(key_prefix, tagged=tagged)
        self._lock = threading.Lock()
        self._counters: dict[str, list[int]] = {}  # key -> [value, expires_ms]
        self._windows: dict[str, RollingWindow] = {}
        self._holds: dict[str, dict[str, _Hold]] = {}  # scope or account base -> holds
        self._accounts: dict[str, list[int]] = {}  # account -> [balance, held]
        self._settled: dict[str, int] = {}  # request id -> forget after (ms)
        self._next_sweep_ms = 0
        self._clock_ms = 0  # the latest admission time seen
        self.idempotency = MemoryIdempotency()

    async def admit(self, req: AdmitRequest) -> Admission:
        return self.admit_now(req)

    def admit_now(self, req: AdmitRequest) -> Admission:
        now_ms = epoch_ms(req.now)
        plans, shard = self.planner.plans(req, now_ms)
        with self._lock:
            self._sweep(now_ms)
            need = req.prompt_tokens + min_tokens(req)
            readings = [self._read_scope(plan, need, now_ms) for plan in plans]
            account = None
            if req.balance_account is not None:
                account = self._read_account(req.balance_account, now_ms)
            admitted, granted = decide(req, readings, account)
            if not admitted:
                raise refusal(req, plans, readings, account, now_ms)
            return self._reserve(req, plans, readings, granted, now_ms, shard)

    def _get(self, key: str) -> int:
        entry = self._counters.get(key)
        return entry[0] if entry is not None else 0

    def _add(self, key: str, amount: int, expires_ms: int) -> None:
        entry = self._counters.setdefault(key, [0, 0])
        entry[0] += amount
        entry[1] = expires_ms

    def _correct(self, base: str, suffix: str, delta: int) -> None:
        """Add `delta` to a charged counter, if it (or its window bucket) is still there."""
        window = split_window_counter(suffix)
        if window is not None:
            rolling = self._windows.get(base + window[0])
            if rolling is not None:
                rolling.correct(window[1], delta)
            return
        entry = self._counters.get(base + suffix)
        if entry is not None:
            entry[0] += delta

    def _window_used(self, key: str, now_ms: int) -> int:
        rolling = self._windows.get(key)
        if rolling is None:
            return 0
        rolling.prune(now_ms)
        return rolling.total

    def _window_reading(
        self, key: str, limit: int | None, need: int, now_ms: int
    ) -> tuple[int, int, int]:
        """(used, reset ms, retry ms) of a rolling window against a limit."""
        if limit is None:
            return 0, 0, 0
        rolling = self._windows.get(key)
        if rolling is None:
            rolling = self._windows[key] = RollingWindow()
        rolling.prune(now_ms)
        used = rolling.total
        reset, retry = window_times(rolling.buckets, rolling.first(), now_ms, used + need - limit)
        return used, reset, retry

    def _release_expired(self, base: str, now_ms: int, account: str | None = None) -> None:
        holds = self._holds.get(base)
        if not holds:
            return
        for request_id in [rid for rid, hold in holds.items() if hold.expires_ms <= now_ms]:
            hold = holds.pop(request_id)
            if account is not None:
                self._accounts[account][1] -= hold.amount
            for suffix in hold.counters:
                self._correct(base, suffix, -hold.amount)

    def _read_scope(self, plan: ScopePlan, need: int, now_ms: int) -> ScopeReading:
        self._release_expired(plan.base, now_ms)
        limits = plan.scope.limits
        requests, rpm_reset, rpm_retry = self._window_reading(
            plan.base + plan.rpm, limits.rpm, 1, now_ms
        )
        tpm, tpm_reset, tpm_retry = self._window_reading(
            plan.base + plan.tpm, limits.tpm, need, now_ms
        )
        return ScopeReading(
            requests=requests,
            inflight=len(self._holds.get(plan.base, ())),
            tpm=tpm,
            day=self._get(plan.base + plan.day) if limits.tokens_per_day is not None else 0,
            month=self._get(plan.base + plan.month) if limits.tokens_per_month is not None else 0,
            rpm_reset_ms=rpm_reset,
            rpm_retry_ms=rpm_retry,
            tpm_reset_ms=tpm_reset,
            tpm_retry_ms=tpm_retry,
        )

    def _read_account(self, account: str, now_ms: int) -> AccountReading:
        state = self._accounts.get(account)
        if state is None:
            return AccountReading(None, 0)
        self._release_expired(self.planner.account_base(account), now_ms, account)
        return AccountReading(state[0], state[1])

    def _reserve(
        self,
        req: AdmitRequest,
        plans: list[ScopePlan],
        readings: list[ScopeReading],
        granted: int,
        now_ms: int,
        shard: str | None,
    ) -> Admission:
        tokens = req.prompt_tokens + granted
        expires_ms = now_ms + self.reservation_ttl_ms
        charges = []
        for plan in plans:
            bucket = plan.bucket
            if plan.scope.limits.rpm is not None:
                self._windows[plan.base + plan.rpm].add(bucket, 1)
            for suffix in plan.counters:
                if split_window_counter(suffix) is not None:
                    self._windows[plan.base + plan.tpm].add(bucket, tokens)
                    continue
                expiry = counter_expiry_ms(plan, suffix, self.reservation_ttl_ms, now_ms)
                self._add(plan.base + suffix, tokens, expiry)
            if plan.holds:
                hold = _Hold(expires_ms, tokens, plan.counters)
                self._holds.setdefault(plan.base, {})[req.request_id] = hold
                charges.append(ScopeCharge(plan.scope.id, plan.base, plan.counters))
        nanos = 0
        if req.balance_account is not None:
            nanos = req.input_cost_nanos + granted * req.output_price_nanos
            state = self._accounts.setdefault(req.balance_account, [0, 0])
            state[1] += nanos
            base = self.planner.account_base(req.balance_account)
            self._holds.setdefault(base, {})[req.request_id] = _Hold(expires_ms, nanos)
        return Admission(
            request_id=req.request_id,
            granted_max_tokens=granted,
            reserved_tokens=tokens,
            reserved_nanos=nanos,
            headers=ratelimit_headers(plans, readings, 1, tokens, now_ms),
            balance_account=req.balance_account,
            charges=tuple(charges),
            backend=self.backend,
            shard=shard,
        )

    async def settle(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        self.settle_now(admission, used_tokens, cost_nanos)

    def settle_soon(self, admission: Admission, used_tokens: int, cost_nanos: int) -> bool:
        self.settle_now(admission, used_tokens, cost_nanos)
        return True

    def settle_now(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        rid = admission.request_id
        with self._lock:
            if rid in self._settled:
                return
            self._settled[rid] = self._clock_ms + self.reservation_ttl_ms + SETTLED_KEEP_MS
            for charge in admission.charges:
                held = self._holds.get(charge.base, {}).pop(rid, None) is not None
                delta = used_tokens - admission.reserved_tokens if held else used_tokens
                for suffix in charge.counters:
                    self._correct(charge.base, suffix, delta)
            account = admission.balance_account
            if account is not None:
                state = self._accounts.setdefault(account, [0, 0])
                base = self.planner.account_base(account)
                if self._holds.get(base, {}).pop(rid, None) is not None:
                    state[1] -= admission.reserved_nanos
                state[0] -= cost_nanos

    def _sweep(self, now_ms: int) -> None:
        """Forget counters past their period and old settle markers (once a minute)."""
        self._clock_ms = max(self._clock_ms, now_ms)
        if now_ms < self._next_sweep_ms:
            return
        self._next_sweep_ms = now_ms + 60_000
        self._counters = {k: v for k, v in self._counters.items() if v[1] > now_ms}
        for rolling in self._windows.values():
            rolling.prune(now_ms)
        self._windows = {k: v for k, v in self._windows.items() if v.buckets}
        self._holds = {k: v for k, v in self._holds.items() if v}
        self._settled = {k: v for k, v in self._settled.items() if v > now_ms}

    async def topup(self, account: str, nanos: int) -> int:
        _check_topup(nanos)
        with self._lock:
            state = self._accounts.setdefault(account, [0, 0])
            _check_topup(nanos, state[0])
            state[0] += nanos
            return state[0]

    async def topup_once(self, account: str, nanos: int, claim: Claim) -> tuple[int, bool]:
        _check_topup(nanos)
        records = self.idempotency
        with self._lock, records.lock:
            stored = resolve(claim, records.get(claim.key))
            if stored is not None:
                return int(stored.n or 0), True
            state = self._accounts.setdefault(account, [0, 0])
            _check_topup(nanos, state[0])
            state[0] += nanos
            records.put(claim.key, Stored(claim.fingerprint, 200, n=state[0]), RESULT_KEEP_MS)
            return state[0], False

    async def idempotency_begin(self, claim: Claim) -> Stored | None:
        return self.idempotency.begin(claim)

    async def idempotency_finish(self, claim: Claim, status: int, body: str) -> None:
        self.idempotency.finish(claim, status, body)

    async def idempotency_abandon(self, claim: Claim) -> None:
        self.idempotency.abandon(claim)

    async def set_balance(self, account: str, nanos: int) -> None:
        with self._lock:
            self._accounts.setdefault(account, [nanos, 0])

    async def balance(self, account: str) -> int | None:
        state = self._accounts.get(account)
        return state[0] if state is not None else None

    async def remaining(self, scope: Scope, now: datetime) -> dict[str, int | None]:
        now_ms = epoch_ms(now)
        plan = self.planner.plan(scope, now_ms)
        with self._lock:
            live = sum(1 for h in self._holds.get(plan.base, {}).values() if h.expires_ms > now_ms)
            return remaining_from(
                scope.limits,
                self._window_used(plan.base + plan.rpm, now_ms),
                self._window_used(plan.base + plan.tpm, now_ms),
                live,
                self._get(plan.base + plan.day),
                self._get(plan.base + plan.month),
            )


def _check_topup(nanos: int, balance: int = 0) -> None:
    if nanos <= 0:
        raise ValueError(f"a top-up must be positive, not {nanos}")
    if balance + nanos > MAX_BALANCE_NANOS:
        raise ValueError(f"a balance cannot exceed {format_amount(MAX_BALANCE_NANOS)}")
