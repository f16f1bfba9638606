"""The gauges that describe state (not events), brought up to date for a scrape."""

from __future__ import annotations

import asyncio
import logging

from billing.quota import QuotaUnavailable, Scope
from gateway.state import AppState

log = logging.getLogger("maas.app")


def refresh_local_gauges(state: AppState) -> None:
    """This process's own state: ledger backlog, deployment health and load, and (with
    several workers) the simulated backends' statistics."""
    m = state.metrics
    m.set_ledger(queue_depth=state.ledger.queue_depth, lag_s=state.ledger.lag_seconds)
    for deployment in state.router.health():
        m.set_deployment_health(
            deployment["name"], deployment["model"], deployment["state"], deployment["in_flight"]
        )
    publish_backends(state)


def publish_backends(state: AppState) -> None:
    """With several workers each has its own simulated backends: their totals go to the
    shared files and are summed over workers (one process reads them with a collector)."""
    if state.metrics.multiprocess and state.metrics.enabled:
        for name, provider in state.simulated.items():
            state.metrics.backend.publish(name, provider.stats())


async def tick_local_gauges(state: AppState) -> None:
    """With several workers any one answers a scrape: keep every worker's share of the
    summed gauges and backend counters fresh, not only the scraped one's."""
    while True:
        await asyncio.sleep(state.metrics.config.flush_interval_s)
        try:
            refresh_local_gauges(state)
        except Exception:
            log.exception("refreshing this worker's gauges failed")


async def refresh_gauges(state: AppState) -> None:
    """Bring every state gauge up to date: this process's, and each tenant's budget."""
    m = state.metrics
    refresh_local_gauges(state)
    now = state.clock()
    for tenant in state.directory.tenants.values():
        scope = Scope(f"tenant:{tenant.id}", tenant.limits, tenant.timezone)
        try:
            left = await state.quotas.remaining(scope, now)
            balance = await state.quotas.balance(tenant.id) if tenant.prepaid else None
        except QuotaUnavailable:
            continue
        windows = {"day": left.get("tokens_per_day"), "month": left.get("tokens_per_month")}
        limits = {"day": tenant.limits.tokens_per_day, "month": tenant.limits.tokens_per_month}
        m.set_tenant_budget(
            tenant.id,
            remaining_tokens=windows,
            limit_tokens=limits,
            balance_nanos=balance,
            currency=tenant.currency,
        )


async def scrape(state: AppState) -> tuple[bytes, str]:
    """The metrics exposition, gauges brought up to date: (body, content type)."""
    await refresh_gauges(state)
    return await asyncio.to_thread(state.metrics.render)
