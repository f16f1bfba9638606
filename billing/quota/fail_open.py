"""Fail open: Redis when it answers, the in-process store while it does not."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from billing.idempotency import Claim, Stored
from billing.quota.contract import Admission, AdmitRequest, QuotaStore, QuotaUnavailable, Scope
from billing.quota.memory import MemoryQuotaStore

__all__ = ["FailOpenQuotaStore"]

logger = logging.getLogger(__name__)


class FailOpenQuotaStore(QuotaStore):
    """Serve from `fallback` while `primary` is unavailable; back to `primary` by itself.

    While failed open, limits are enforced per process from an empty state and prepaid
    balances are not checked (the point of failing open is to keep serving). Each such
    request's usage and cost are still replayed into the primary once it answers again
    (settles are idempotent), so balances and budgets catch up.
    """

    backend = "fail-open"

    def __init__(self, primary: QuotaStore, fallback: MemoryQuotaStore) -> None:
        self.primary = primary
        self.fallback = fallback
        self.failed_open = 0

    async def admit(self, req: AdmitRequest) -> Admission:
        try:
            return await self.primary.admit(req)
        except QuotaUnavailable as exc:
            self.failed_open += 1
            logger.warning("quota store unavailable, failing open to memory: %s", exc)
        admission = await self.fallback.admit(replace(req, balance_account=None))
        admission.balance_account = req.balance_account
        admission.backend = "fallback"
        return admission

    async def settle(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        if admission.backend == "fallback":
            local = replace(admission, balance_account=None)
            await self.fallback.settle(local, used_tokens, cost_nanos)
        await self.primary.settle(admission, used_tokens, cost_nanos)

    def settle_soon(self, admission: Admission, used_tokens: int, cost_nanos: int) -> bool:
        if admission.backend == "fallback":
            return False  # both stores settle it: the awaited path
        return self.primary.settle_soon(admission, used_tokens, cost_nanos)

    async def topup(self, account: str, nanos: int) -> int:
        return await self.primary.topup(account, nanos)

    async def topup_once(self, account: str, nanos: int, claim: Claim) -> tuple[int, bool]:
        return await self.primary.topup_once(account, nanos, claim)

    async def idempotency_begin(self, claim: Claim) -> Stored | None:
        return await self.primary.idempotency_begin(claim)

    async def idempotency_finish(self, claim: Claim, status: int, body: str) -> None:
        await self.primary.idempotency_finish(claim, status, body)

    async def idempotency_abandon(self, claim: Claim) -> None:
        await self.primary.idempotency_abandon(claim)

    async def set_balance(self, account: str, nanos: int) -> None:
        await self.primary.set_balance(account, nanos)

    async def balance(self, account: str) -> int | None:
        return await self.primary.balance(account)

    async def remaining(self, scope: Scope, now: datetime) -> dict[str, int | None]:
        try:
            return await self.primary.remaining(scope, now)
        except QuotaUnavailable:
            return await self.fallback.remaining(scope, now)

    async def aclose(self) -> None:
        await self.primary.aclose()
        await self.fallback.aclose()
