"""The policy both stores share: the admission decision, refusals and rate-limit headers.

`decide` is the rule; the Redis admission script (`admit.lua`) mirrors it exactly, and the
Redis store checks the script's answer against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from billing.money import format_amount
from billing.quota.contract import AdmitRequest, Limits, QuotaExceeded, RefusalReason
from billing.quota.plan import BUCKET_MS, ScopePlan, leaves_ms

__all__ = [
    "CONCURRENCY_RETRY_S",
    "AccountReading",
    "ScopeReading",
    "balance_room",
    "decide",
    "format_reset",
    "min_tokens",
    "ratelimit_headers",
    "refusal",
    "remaining_from",
    "window_times",
]

#: Retry hint when a concurrency limit refuses (a slot frees when any request finishes).
CONCURRENCY_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class ScopeReading:
    """One scope's state as read inside the atomic step (0 where a limit is not set)."""

    requests: int
    inflight: int
    tpm: int
    day: int
    month: int
    rpm_reset_ms: int = 0
    """Until the oldest request counted leaves the rolling window (or this one would)."""
    rpm_retry_ms: int = 0
    """Until enough requests have left for one more to fit (0 when it fits now)."""
    tpm_reset_ms: int = 0
    tpm_retry_ms: int = 0
    """As for requests, for the tokens this request needs at least (prompt + min_tokens)."""


def window_times(
    buckets: dict[int, int], first: int | None, now_ms: int, excess: int
) -> tuple[int, int]:
    """(reset ms, retry ms) of a rolling window's live buckets (see `ScopeReading`).

    `first` is the oldest bucket kept (None: none); `excess` is how much must leave the
    window before the request fits (<= 0: it fits).
    """
    reset = leaves_ms(first if first is not None else now_ms // BUCKET_MS, now_ms)
    if excess <= 0:
        return reset, 0
    freed = 0
    last = now_ms // BUCKET_MS
    for bucket in sorted(buckets):
        freed += buckets[bucket]
        last = bucket
        if freed >= excess:
            break
    return reset, leaves_ms(last, now_ms)


@dataclass(frozen=True, slots=True)
class AccountReading:
    balance: int | None
    held: int


def balance_room(account: AccountReading, input_cost: int, output_price: int) -> int | None:
    """How many output tokens the balance can pay for after the prompt (None: unbounded)."""
    available = (account.balance or 0) - account.held - input_cost
    if output_price > 0:
        return available // output_price
    return -1 if available < 0 else None


def decide(
    req: AdmitRequest, readings: list[ScopeReading], account: AccountReading | None
) -> tuple[bool, int]:
    """Whether the request is admitted, and the granted max_tokens."""
    blocked = False
    granted = req.max_tokens
    for scope, reading in zip(req.scopes, readings, strict=True):
        limits = scope.limits
        if limits.rpm is not None and reading.requests + 1 > limits.rpm:
            blocked = True
        if limits.max_concurrent is not None and reading.inflight + 1 > limits.max_concurrent:
            blocked = True
        for limit, used in _token_limits(limits, reading):
            granted = min(granted, limit - used - req.prompt_tokens)
    if account is not None:
        room = balance_room(account, req.input_cost_nanos, req.output_price_nanos)
        if room is not None:
            granted = min(granted, room)
    return (not blocked and granted >= min_tokens(req)), granted


def min_tokens(req: AdmitRequest) -> int:
    return min(req.min_tokens, req.max_tokens)


def _token_limits(limits: Limits, reading: ScopeReading) -> list[tuple[int, int]]:
    pairs = (
        (limits.tpm, reading.tpm),
        (limits.tokens_per_day, reading.day),
        (limits.tokens_per_month, reading.month),
    )
    return [(limit, used) for limit, used in pairs if limit is not None]


def format_reset(ms: int) -> str:
    """A duration in OpenAI's reset-header style: "20ms", "1s", "6m0s", "5h3m0s"."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = -(-ms // 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(
    plans: list[ScopePlan], readings: list[ScopeReading], requests: int, tokens: int, now_ms: int
) -> dict[str, str]:
    """The six x-ratelimit headers after charging `requests` and `tokens` (0 on refusal)."""
    best_requests: tuple[int, int, int] | None = None  # remaining, limit, reset_ms
    best_tokens: tuple[int, int, int] | None = None
    for plan, reading in zip(plans, readings, strict=True):
        limits = plan.scope.limits
        if limits.rpm is not None:
            left = (
                max(limits.rpm - reading.requests - requests, 0),
                limits.rpm,
                reading.rpm_reset_ms,
            )
            if best_requests is None or left[0] < best_requests[0]:
                best_requests = left
        for limit, used, reset in (
            (limits.tpm, reading.tpm, reading.tpm_reset_ms),
            (limits.tokens_per_day, reading.day, plan.day_end_ms - now_ms),
            (limits.tokens_per_month, reading.month, plan.month_end_ms - now_ms),
        ):
            if limit is not None:
                left = (max(limit - used - tokens, 0), limit, reset)
                if best_tokens is None or left[0] < best_tokens[0]:
                    best_tokens = left
    headers: dict[str, str] = {}
    for name, best in (("requests", best_requests), ("tokens", best_tokens)):
        if best is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(best[1])
            headers[f"x-ratelimit-remaining-{name}"] = str(best[0])
            headers[f"x-ratelimit-reset-{name}"] = format_reset(best[2])
    return headers


_PRIORITY: dict[str, int] = {
    "balance": 0,
    "tokens_per_month": 1,
    "tokens_per_day": 2,
    "rpm": 3,
    "concurrency": 4,
    "tpm": 5,
}


def refusal(
    req: AdmitRequest,
    plans: list[ScopePlan],
    readings: list[ScopeReading],
    account: AccountReading | None,
    now_ms: int,
) -> QuotaExceeded:
    """Explain why `decide` refused: the most telling limit, as a `QuotaExceeded`."""
    need_out = min_tokens(req)
    need = req.prompt_tokens + need_out
    found: list[QuotaExceeded] = []
    for plan, reading in zip(plans, readings, strict=True):
        limits, sid = plan.scope.limits, plan.scope.id
        if limits.rpm is not None and reading.requests + 1 > limits.rpm:
            found.append(
                QuotaExceeded(
                    "rate_limit",
                    "rpm",
                    sid,
                    f"Rate limit reached for requests per minute on {sid}: limit {limits.rpm},"
                    f" used {reading.requests} in the last 60s. Please try again in"
                    f" {format_reset(reading.rpm_retry_ms)}.",
                    retry_after_s=reading.rpm_retry_ms / 1000,
                )
            )
        if limits.max_concurrent is not None and reading.inflight + 1 > limits.max_concurrent:
            found.append(
                QuotaExceeded(
                    "rate_limit",
                    "concurrency",
                    sid,
                    f"Too many concurrent requests on {sid}: limit {limits.max_concurrent},"
                    f" in flight {reading.inflight}. Please try again when one finishes.",
                    retry_after_s=CONCURRENCY_RETRY_S,
                )
            )
        if limits.tpm is not None and reading.tpm + need > limits.tpm:
            if need > limits.tpm:
                message = (
                    f"Request too large for tokens per minute on {sid}: limit {limits.tpm},"
                    f" requested at least {need} ({req.prompt_tokens} prompt + {need_out}"
                    " completion). Reduce the prompt."
                )
                retry: float | None = None
            else:
                message = (
                    f"Rate limit reached for tokens per minute on {sid}: limit {limits.tpm},"
                    f" used {reading.tpm} in the last 60s, requested at least {need}. Please"
                    f" try again in {format_reset(reading.tpm_retry_ms)}."
                )
                retry = reading.tpm_retry_ms / 1000
            found.append(QuotaExceeded("rate_limit", "tpm", sid, message, retry_after_s=retry))
        budgets: list[tuple[RefusalReason, int | None, int, str, int]] = [
            (
                "tokens_per_day",
                limits.tokens_per_day,
                reading.day,
                "Daily",
                plan.day_end_ms - now_ms,
            ),
            (
                "tokens_per_month",
                limits.tokens_per_month,
                reading.month,
                "Monthly",
                plan.month_end_ms - now_ms,
            ),
        ]
        for reason, limit, used, label, reset_ms in budgets:
            if limit is not None and used + need > limit:
                found.append(
                    QuotaExceeded(
                        "insufficient_quota",
                        reason,
                        sid,
                        f"{label} token budget exceeded on {sid}: limit {limit}, used {used},"
                        f" this request needs at least {need}. It resets in"
                        f" {format_reset(reset_ms)} (calendar in {plan.scope.timezone}).",
                    )
                )
    if account is not None and req.balance_account is not None:
        room = balance_room(account, req.input_cost_nanos, req.output_price_nanos)
        if room is not None and room < need_out:
            name = req.balance_account
            if account.balance is None:
                message = f"No prepaid balance for account {name}. Top up to continue."
            else:
                available = account.balance - account.held
                cost = req.input_cost_nanos + need_out * req.output_price_nanos
                message = (
                    f"Insufficient prepaid balance on account {name}: available"
                    f" {format_amount(available)}, this request needs at least"
                    f" {format_amount(cost)}. Top up to continue."
                )
            found.append(QuotaExceeded("insufficient_quota", "balance", f"account:{name}", message))
    if not found:  # defensive: decide() refused, so some limit must have
        found.append(QuotaExceeded("rate_limit", "tpm", "", "Request refused by quota."))
    chosen = min(found, key=lambda e: _PRIORITY[e.reason])
    chosen.headers = ratelimit_headers(plans, readings, 0, 0, now_ms)
    return chosen


def remaining_from(
    limits: Limits, requests: int, tpm: int, inflight: int, day: int, month: int
) -> dict[str, int | None]:
    def left(limit: int | None, used: int) -> int | None:
        return None if limit is None else max(limit - used, 0)

    return {
        "rpm": left(limits.rpm, requests),
        "tpm": left(limits.tpm, tpm),
        "max_concurrent": left(limits.max_concurrent, inflight),
        "tokens_per_day": left(limits.tokens_per_day, day),
        "tokens_per_month": left(limits.tokens_per_month, month),
    }
