"""Quotas and budgets: admission and spending as one atomic step each.

Before a request is forwarded, `QuotaStore.admit` reserves its worst case (prompt tokens
plus the granted `max_tokens`, and the matching money) against every limit of every scope
(key, tenant, tenant x model) and the tenant's prepaid balance, all in one atomic step, so
concurrent requests cannot overshoot. After the response, `settle` charges what was really
used and releases the rest. Two backends keep the same contract: `MemoryQuotaStore` (one
process, the embedded default, `billing.quota.memory`) and `RedisQuotaStore` (Lua scripts,
one truth shared by every gateway replica, `billing.quota.redis_store`).

Semantics, shared by both backends:

- **Windows.** Requests and tokens per minute use a *sliding* window of one-second buckets
  (epoch milliseconds // 1000): an admission counts what the last 61 buckets hold (the
  current second and the 60 before it), so no 60-second span, wherever it starts, ever
  admits more than the limit; a request counts against it for 60 to 61 seconds.
  `retry_after_s` is the time until enough of the window has left it for this request to
  fit; `x-ratelimit-reset-*` the time until the oldest request (or tokens) still counted
  leave the window, when `remaining` next grows.
- **Periods.** Daily and monthly token budgets are calendar periods in the scope's time
  zone (the same boundaries the invoices use): a day runs from local midnight to local
  midnight (23 or 25 hours across a daylight-saving change).
- **Reservation.** Token limits (tpm, per day, per month) are charged ``prompt_tokens +
  granted`` at admission and corrected to ``prompt + completion`` at settle; the balance
  holds ``input_cost_nanos + granted x output_price_nanos`` until settle charges the actual
  cost. The granted maximum is ``min(max_tokens, every token budget's room - prompt_tokens,
  (balance - held - input_cost) // output_price)``; below ``min_tokens`` the request is
  refused (`QuotaExceeded`).
- **Expiry.** A reservation not settled within `reservation_ttl_s` (a crashed gateway) is
  released by the next admission that touches the same scope or account. A settle that
  arrives after that still charges what was used.
- **Refusals.** Exhausted daily/monthly budgets and balance are ``insufficient_quota``
  (retrying does not help); rpm, tpm and concurrency are ``rate_limit`` with a retry hint.
  When several limits refuse, the ``insufficient_quota`` ones are reported first.
- **Headers.** `Admission.headers` and `QuotaExceeded.headers` carry
  ``x-ratelimit-{limit,remaining,reset}-requests`` for the scope with the fewest requests
  left (rpm) and ``...-tokens`` for the token limit with the fewest tokens left (tpm, daily
  or monthly); a trio is absent when no scope has such a limit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from billing.idempotency import Claim, Stored

__all__ = [
    "MAX_BALANCE_NANOS",
    "Admission",
    "AdmitRequest",
    "Limits",
    "QuotaExceeded",
    "QuotaStore",
    "QuotaUnavailable",
    "RefusalKind",
    "RefusalReason",
    "Scope",
    "ScopeCharge",
]

RefusalKind = Literal["rate_limit", "insufficient_quota"]
RefusalReason = Literal[
    "rpm", "tpm", "concurrency", "tokens_per_day", "tokens_per_month", "balance"
]

#: The largest prepaid balance (nanos): Redis Lua counts in doubles, exact below 2**53.
MAX_BALANCE_NANOS = 2**53 - 1


class Limits(BaseModel):
    """Limits of one scope; `None` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)


@dataclass(slots=True)
class Scope:
    """Something limits apply to: ``"tenant:acme"``, ``"key:k_1"``, ``"tenant:acme:model:x"``.

    `timezone` sets the calendar of the daily and monthly budgets. `shard` groups the
    scope's keys with those of the other scopes and the balance account of the same
    requests (on a Redis Cluster, one hash tag: one slot); by default the tenant of a
    ``tenant:<id>...`` scope, else the request's balance account (see
    `billing.quota.plan.Planner`).
    """

    id: str
    limits: Limits
    timezone: str = "UTC"
    shard: str | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(kw_only=True, slots=True)
class AdmitRequest:
    """One request's claim on its scopes and balance.

    `input_cost_nanos` is the whole prompt at the uncached input price; `output_price_nanos`
    the price of one output token; `balance_account` the tenant id when it is prepaid.
    `request_id` must be unique per request. Embeddings pass ``max_tokens=0, min_tokens=0``.
    """

    request_id: str
    scopes: list[Scope]
    prompt_tokens: int
    max_tokens: int
    min_tokens: int = 1
    input_cost_nanos: int = 0
    output_price_nanos: int = 0
    balance_account: str | None = None
    now: datetime = field(default_factory=_utcnow)


@dataclass(frozen=True, slots=True)
class ScopeCharge:
    """What one scope's reservation charged: the counters settle corrects."""

    scope: str
    base: str
    counters: tuple[str, ...]


@dataclass(slots=True)
class Admission:
    """A granted reservation; pass it back to `settle` exactly once (repeats are ignored).

    The caller sets the upstream ``max_tokens`` to `granted_max_tokens`.
    """

    request_id: str
    granted_max_tokens: int
    reserved_tokens: int
    reserved_nanos: int
    headers: dict[str, str]
    balance_account: str | None = None
    charges: tuple[ScopeCharge, ...] = ()
    backend: str = "memory"
    shard: str | None = None
    """The hash tag of the request's keys on a Redis Cluster (None elsewhere)."""


class QuotaExceeded(Exception):
    """A request refused by a limit. Map to HTTP 429 (OpenAI error shape).

    ``kind == "rate_limit"``: error code ``rate_limit_exceeded`` and a ``retry-after``
    header from `retry_after_s` (None when the request can never fit the limit).
    ``kind == "insufficient_quota"``: code ``insufficient_quota`` and
    ``x-should-retry: false``.
    """

    def __init__(
        self,
        kind: RefusalKind,
        reason: RefusalReason,
        scope: str,
        message: str,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
        self.scope = scope
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


class QuotaUnavailable(Exception):
    """The quota store cannot answer (Redis unreachable). Map to HTTP 503."""


class QuotaStore(ABC):
    """The quota contract. Every method is one atomic step in the store."""

    backend: str = "abstract"

    @abstractmethod
    async def admit(self, req: AdmitRequest) -> Admission:
        """Reserve the worst case over all scopes and the balance, clamping `max_tokens`.

        Raises `QuotaExceeded` (nothing is reserved) or `QuotaUnavailable`.
        """

    @abstractmethod
    async def settle(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        """Charge the actual usage (prompt + completion tokens, cost) and release the rest.

        Idempotent per request id.
        """

    def settle_soon(self, admission: Admission, used_tokens: int, cost_nanos: int) -> bool:
        """`settle` without waiting for the store, when the store can: the settle is sent
        (or applied) at once and its failure handled as `settle`'s. False when it cannot
        (then await `settle`); this default always says so."""
        return False

    @abstractmethod
    async def topup(self, account: str, nanos: int) -> int:
        """Add `nanos` (> 0) to a prepaid balance; returns the new balance. `ValueError`
        (nothing added) when the balance would pass `MAX_BALANCE_NANOS`."""

    @abstractmethod
    async def topup_once(self, account: str, nanos: int, claim: Claim) -> tuple[int, bool]:
        """`topup` under an idempotency key, recorded in the same atomic step.

        Returns (balance, replayed): a key already used by the same request returns the
        balance its first top-up produced and adds nothing. Raises
        `billing.idempotency.IdempotencyConflict` for a key used by another request or one
        still running, `ValueError` as `topup` does (nothing is recorded then).
        """

    @abstractmethod
    async def idempotency_begin(self, claim: Claim) -> Stored | None:
        """Claim an idempotency key for a request; the stored result to replay, or None
        (go ahead, then `idempotency_finish` or `idempotency_abandon`). Raises
        `IdempotencyConflict`."""

    @abstractmethod
    async def idempotency_finish(self, claim: Claim, status: int, body: str) -> None:
        """Store a claimed request's result for replay."""

    @abstractmethod
    async def idempotency_abandon(self, claim: Claim) -> None:
        """Drop a claim whose request failed (a retry runs it again)."""

    @abstractmethod
    async def set_balance(self, account: str, nanos: int) -> None:
        """Set an initial balance, only if the account is not yet known (so a restart never
        resets a balance). Does not raise when the store is unavailable: a store that can
        be unavailable keeps the balance and writes it before anything else once it answers.
        """

    @abstractmethod
    async def balance(self, account: str) -> int | None:
        """The settled balance (reservations not deducted), None for an unknown account."""

    @abstractmethod
    async def remaining(self, scope: Scope, now: datetime) -> dict[str, int | None]:
        """What is left of each limit (keys as in `Limits`), None where unlimited."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and background tasks."""
