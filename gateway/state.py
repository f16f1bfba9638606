"""The running gateway's services, opened and wired in one step.

`open_state(...)` builds the providers and the router, opens the quota store, the ledger
and the key-store sync, wires the relay, and yields one `AppState` in which every service
exists; leaving it closes them in reverse order (the ledger, flushed, last). A failure part
way closes what was opened. Nothing here runs at import time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

from billing.compute_cost import ComputeCosts
from billing.ledger import Ledger
from billing.money import to_nanos
from billing.pricing import PriceCatalog
from billing.quota import QuotaStore, build_quota_store
from gateway.auth import ApiKey, Directory, Tenant
from gateway.config import Settings
from gateway.keystore import DirectorySync, KeyStore
from gateway.metrics import Metrics
from gateway.relay import Relay, Services
from gateway.routing import Router
from gateway.tokens import TokenCounter
from providers.base import Provider
from providers.openai_compat import OpenAICompatProvider
from providers.simulate_server import SimulatorCollector
from providers.simulated import SimulatedProvider


@dataclass(frozen=True, slots=True, kw_only=True)
class AppState:
    """Everything a serving gateway's routes use, fully built (see `open_state`)."""

    settings: Settings
    clock: Callable[[], datetime]
    counter: TokenCounter
    directory: Directory
    metrics: Metrics
    pricing: PriceCatalog
    compute_costs: ComputeCosts
    providers: dict[str, Provider]
    simulated: dict[str, SimulatedProvider]
    """The providers that are simulated backends, by name."""
    router: Router
    quotas: QuotaStore
    ledger: Ledger
    directory_sync: DirectorySync
    services: Services
    relay: Relay
    admin_key: str | None
    """The admin API's bearer token; None disables the admin API."""


@asynccontextmanager
async def open_state(
    settings: Settings,
    *,
    clock: Callable[[], datetime],
    counter: TokenCounter,
    directory: Directory,
    metrics: Metrics,
    pricing: PriceCatalog,
    compute_costs: ComputeCosts,
    admin_key: str | None,
) -> AsyncIterator[AppState]:
    """Open every service of `settings` and yield them wired; close them all on exit."""
    async with AsyncExitStack() as stack:
        stack.callback(metrics.flush)  # last, after the ledger has written everything
        metrics.track_provisioned(compute_costs, settings.pricing.currency, clock)
        ledger = await Ledger.open(settings.ledger)
        stack.push_async_callback(ledger.aclose)
        quotas = build_quota_store(settings.quotas)
        stack.push_async_callback(quotas.aclose)

        async def open_balance(tenant: Tenant) -> None:
            if tenant.prepaid and tenant.initial_balance is not None:
                await quotas.set_balance(tenant.id, to_nanos(tenant.initial_balance))

        for tenant in directory.tenants.values():
            await open_balance(tenant)
        directory_sync = DirectorySync(
            directory, KeyStore(ledger.engine), on_new_tenant=open_balance
        )
        await directory_sync.start()  # tenants and keys created through the admin API
        stack.push_async_callback(directory_sync.aclose)
        providers = build_providers(settings, counter)
        for provider in providers.values():
            stack.push_async_callback(provider.aclose)
        simulated = {n: p for n, p in providers.items() if isinstance(p, SimulatedProvider)}
        if simulated and not metrics.multiprocess:
            metrics.registry.register(SimulatorCollector(simulated))
        router = Router(settings.models, providers, settings.routing)
        stack.push_async_callback(router.aclose)  # first: its health checks use the providers
        services = Services(
            directory=directory,
            router=router,
            counter=counter,
            pricing=pricing,
            quotas=quotas,
            ledger=ledger,
            metrics=metrics,
            default_max_output_tokens=settings.server.default_max_output_tokens,
            max_json_depth=settings.server.max_json_depth,
            clock=clock,
            compute_costs=compute_costs,
        )
        router.start_health_checks()  # when routing.health_check_interval_s is set
        yield AppState(
            settings=settings,
            clock=clock,
            counter=counter,
            directory=directory,
            metrics=metrics,
            pricing=pricing,
            compute_costs=compute_costs,
            providers=providers,
            simulated=simulated,
            router=router,
            quotas=quotas,
            ledger=ledger,
            directory_sync=directory_sync,
            services=services,
            relay=Relay(services),
            admin_key=admin_key,
        )


def build_directory(settings: Settings) -> Directory:
    """The tenants and keys of the configuration file."""
    tenants = []
    keys = []
    for t in settings.tenants:
        tenants.append(
            Tenant(
                id=t.id,
                name=t.name or t.id,
                timezone=t.timezone,
                currency=t.currency,
                plan=t.plan,
                limits=t.limits,
                model_limits=dict(t.model_limits),
                prepaid=t.balance is not None,
                initial_balance=t.balance,
                tax_rate=t.tax_rate,
            )
        )
        for k in t.keys:
            keys.append(
                ApiKey(
                    id=k.id,
                    tenant_id=t.id,
                    hash=k.hash,
                    name=k.name,
                    models=frozenset(k.models) if k.models is not None else None,
                    expires_at=k.expires_at,
                    revoked=k.revoked,
                    limits=k.limits,
                )
            )
    return Directory(tenants, keys)


def build_providers(settings: Settings, counter: TokenCounter) -> dict[str, Provider]:
    """One provider per `providers:` entry (not yet connected: clients connect on use)."""
    providers: dict[str, Provider] = {}
    for config in settings.providers:
        if config.type == "simulated":
            encoding = counter.encoding(_first_model_on(settings, config.name))
            providers[config.name] = SimulatedProvider(config.name, config.model_copy(), encoding)
        else:
            providers[config.name] = OpenAICompatProvider(config.name, config)
    return providers


def _first_model_on(settings: Settings, provider: str) -> str:
    for model in settings.models:
        if any(d.provider == provider for d in model.deployments):
            return model.name
    return provider
