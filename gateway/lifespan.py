"""A gateway's life: what is built when it is constructed, and its services while it serves.

`Gateway(settings)` builds what needs no connection (tokenizers, the configured tenants and
keys, metrics, prices, compute costs) and opens nothing. `Gateway.serving()`, the app's
lifespan, opens every service in one step (`gateway.state.open_state`), serves the metrics
listener and keeps the gauges fresh while the caller runs, and closes it all on exit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from billing.compute_cost import build_compute_costs
from billing.ledger import Ledger
from billing.pricing import PriceCatalog
from billing.quota import QuotaStore
from gateway.auth import ApiKey, display_prefix, hash_key
from gateway.config import Settings
from gateway.gauges import publish_backends, scrape, tick_local_gauges
from gateway.keystore import DirectorySync
from gateway.metrics import Metrics
from gateway.metrics_server import METRICS_PORT_ENV, MetricsListener
from gateway.relay import Relay, Services
from gateway.routing import Router
from gateway.state import AppState, build_directory, open_state
from gateway.tokens import TokenCounter
from providers.simulated import SimulatedProvider

log = logging.getLogger("maas.app")


class Gateway:
    """One gateway: what it is built from, and its `AppState` while it serves.

    Construction opens nothing; `serving()` (the app's lifespan) opens every service in one
    step (`gateway.state.open_state`) and closes them when the app stops. The properties
    below `state` are views of the serving state, for the route builders and tests that hold
    the gateway rather than the state.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] | None = None,
        freeze_heap: bool = False,
        metrics_listener: bool = False,
    ) -> None:
        """`freeze_heap`: once started, move every object alive then (the app, tokenizers,
        configuration) out of the garbage collector's sight with `gc.freeze()`, so that a
        full collection no longer walks them: it otherwise stalls the event loop for tens of
        milliseconds now and then, a pause every request in flight feels. For a serving
        process (`maas-gateway serve`), not for tests that start many gateways in one.

        `metrics_listener`: serve `GET /metrics` on `metrics.host`/`metrics.port` while
        running (`gateway.metrics_server`); the public port never serves it."""
        self.settings = settings
        self.clock = clock or _now
        self.freeze_heap = freeze_heap
        self.counter = TokenCounter(settings.tokenizers)  # logs its own warnings
        self.directory = build_directory(settings)
        self.metrics = Metrics(settings.metrics)
        self.pricing = PriceCatalog(settings.pricing, [m.name for m in settings.models])
        self.compute_costs = build_compute_costs(settings)
        self.admin_key: str | None = os.environ.get(settings.server.admin_key_env) or None
        self.demo_key: str | None = None
        self.started_at = time.time()
        self.metrics_listener: MetricsListener | None = None
        if metrics_listener and settings.metrics.port is not None:
            self.metrics_listener = build_metrics_listener(self)
        self._state: AppState | None = None

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[AppState]:
        """Open every service, serve metrics and gauges while the caller runs, close all."""
        if self._state is not None:
            raise RuntimeError("the gateway is already serving")
        async with open_state(
            self.settings,
            clock=self.clock,
            counter=self.counter,
            directory=self.directory,
            metrics=self.metrics,
            pricing=self.pricing,
            compute_costs=self.compute_costs,
            admin_key=self.admin_key,
        ) as state:
            ticker: asyncio.Task[None] | None = None
            if self.metrics.multiprocess and self.metrics.enabled:
                ticker = asyncio.create_task(tick_local_gauges(state))
            self._state = state
            try:
                if self.metrics_listener is not None:
                    await self.metrics_listener.start()
                    log.info("metrics served at %s", self.metrics_listener.url)
                if self.freeze_heap:
                    gc.collect()
                    gc.freeze()
                yield state
            finally:
                if self.metrics_listener is not None:
                    await self.metrics_listener.aclose()
                if ticker is not None:
                    ticker.cancel()
                    publish_backends(state)
                self._state = None

    @property
    def is_serving(self) -> bool:
        """Whether `serving()` has opened the services and not yet closed them."""
        return self._state is not None

    @property
    def state(self) -> AppState:
        """The serving state; RuntimeError outside `serving()`."""
        if self._state is None:
            raise RuntimeError("the gateway is not serving")
        return self._state

    @property
    def relay(self) -> Relay:
        return self.state.relay

    @property
    def services(self) -> Services:
        return self.state.services

    @property
    def router(self) -> Router:
        return self.state.router

    @property
    def ledger(self) -> Ledger:
        return self.state.ledger

    @property
    def quotas(self) -> QuotaStore:
        return self.state.quotas

    @property
    def directory_sync(self) -> DirectorySync:
        return self.state.directory_sync

    @property
    def simulated(self) -> dict[str, SimulatedProvider]:
        return self.state.simulated

    async def scrape(self) -> tuple[bytes, str]:
        """The metrics exposition, gauges brought up to date: (body, content type)."""
        return await scrape(self.state)

    def ensure_demo_key(self) -> str | None:
        """Give the first tenant a key when the configuration asks for a demo key."""
        env = self.settings.demo_key_env
        if env is None or not self.directory.tenants:
            return None
        tenant_id = next(iter(self.directory.tenants))
        secret = os.environ.get(env)
        if secret:
            self.directory.add_key(
                ApiKey("demo", tenant_id, hash_key(secret), display_prefix(secret), "demo")
            )
        else:
            _, secret = self.directory.create_key(tenant_id, id="demo", name="demo")
        self.demo_key = secret
        return secret


def build_metrics_listener(gw: Gateway) -> MetricsListener:
    """The metrics listener of `gw`'s settings. In a worker of `serve --workers N` the
    supervisor has chosen the port (`METRICS_PORT_ENV`) and every worker shares it."""
    config = gw.settings.metrics
    shared = os.environ.get(METRICS_PORT_ENV)
    token = os.environ.get(config.bearer_token_env) if config.bearer_token_env else None
    if config.bearer_token_env and not token:
        log.warning("metrics: %s is unset: every scrape is refused", config.bearer_token_env)
        token = secrets.token_urlsafe(32)  # known to nobody
    port = int(shared) if shared else config.port or 0
    return MetricsListener(gw.scrape, config.host, port, token=token, reuse_port=bool(shared))


def _now() -> datetime:
    return datetime.now(UTC)
