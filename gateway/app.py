"""The app factory: the one place where the gateway's state is built and wired.

`create_app(settings)` returns a Litestar app. Nothing is opened until the app starts:
its lifespan builds the providers, opens the ledger and the quota store, and closes them
all (flushing the ledger) on shutdown.
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
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from billing.compute_cost import ComputeCosts, LatencyModel
from billing.ledger import Ledger
from billing.money import to_nanos
from billing.pricing import PriceCatalog
from billing.quota import QuotaUnavailable, Scope, build_quota_store
from gateway.auth import ApiKey, Directory, Tenant
from gateway.config import Settings
from gateway.errors import (
    ApiError,
    body_too_large,
    invalid_request,
    method_not_allowed,
    not_found,
    server_error,
)
from gateway.keystore import DirectorySync, KeyStore
from gateway.metrics import Metrics
from gateway.metrics_server import METRICS_PORT_ENV, MetricsListener
from gateway.relay import Relay, Services, error_response, new_request_id
from gateway.routing import Router
from gateway.tokens import TokenCounter
from providers.base import Provider
from providers.openai_compat import OpenAICompatProvider
from providers.simulate_server import SimulatorCollector
from providers.simulated import SimulatedProvider

log = logging.getLogger("maas.app")


class Gateway:
    """The running gateway's state: settings, services and the relay."""

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
        served = [m.name for m in settings.models]
        self.pricing = PriceCatalog(settings.pricing, served)
        self.compute_costs = build_compute_costs(settings)
        self.admin_key: str | None = os.environ.get(settings.server.admin_key_env) or None
        self.demo_key: str | None = None
        self.providers: dict[str, Provider] = {}
        self.simulated: dict[str, SimulatedProvider] = {}
        self._gauge_ticker: asyncio.Task[None] | None = None
        self.relay: Relay | None = None
        self.services: Services | None = None
        self.started_at = time.time()
        self.metrics_listener: MetricsListener | None = None
        if metrics_listener and settings.metrics.port is not None:
            self.metrics_listener = build_metrics_listener(self)

    async def start(self) -> None:
        s = self.settings
        self.providers = build_providers(s, self.counter)
        simulated = {n: p for n, p in self.providers.items() if isinstance(p, SimulatedProvider)}
        self.simulated = simulated
        if simulated and not self.metrics.multiprocess:
            self.metrics.registry.register(SimulatorCollector(simulated))
        self.metrics.track_provisioned(self.compute_costs, s.pricing.currency, self.clock)
        self.router = Router(s.models, self.providers, s.routing)
        self.quotas = build_quota_store(s.quotas)
        for tenant in self.directory.tenants.values():
            if tenant.prepaid and tenant.initial_balance is not None:
                await self.quotas.set_balance(tenant.id, to_nanos(tenant.initial_balance))
        self.ledger = await Ledger.open(s.ledger)
        self.directory_sync = DirectorySync(
            self.directory, KeyStore(self.ledger.engine), on_new_tenant=self._open_balance
        )
        await self.directory_sync.start()  # tenants and keys created through the admin API
        self.services = Services(
            directory=self.directory,
            router=self.router,
            counter=self.counter,
            pricing=self.pricing,
            quotas=self.quotas,
            ledger=self.ledger,
            metrics=self.metrics,
            default_max_output_tokens=s.server.default_max_output_tokens,
            max_json_depth=s.server.max_json_depth,
            clock=self.clock,
            compute_costs=self.compute_costs,
        )
        self.relay = Relay(self.services)
        if self.metrics.multiprocess and self.metrics.enabled:
            self._gauge_ticker = asyncio.create_task(self._tick_local_gauges())
        self.router.start_health_checks()  # when routing.health_check_interval_s is set
        if self.metrics_listener is not None:
            await self.metrics_listener.start()
            log.info("metrics served at %s", self.metrics_listener.url)
        if self.freeze_heap:
            gc.collect()
            gc.freeze()

    async def stop(self) -> None:
        if self.metrics_listener is not None:
            await self.metrics_listener.aclose()
        if self._gauge_ticker is not None:
            self._gauge_ticker.cancel()
            self._publish_backends()
        await self.router.aclose()  # health checks first: they use the providers
        for provider in self.providers.values():
            await provider.aclose()
        if self.relay is not None:
            await self.relay.drain()  # settles still running, before their store closes
        await self.quotas.aclose()
        await self.directory_sync.aclose()
        await self.ledger.aclose()
        self.metrics.flush()

    async def _open_balance(self, tenant: Tenant) -> None:
        if tenant.prepaid and tenant.initial_balance is not None:
            await self.quotas.set_balance(tenant.id, to_nanos(tenant.initial_balance))

    def refresh_local_gauges(self) -> None:
        """This process's own state: ledger backlog, deployment health and load, and (with
        several workers) the simulated backends' statistics."""
        m = self.metrics
        m.set_ledger(queue_depth=self.ledger.queue_depth, lag_s=self.ledger.lag_seconds)
        for state in self.router.health():
            m.set_deployment_health(
                state["name"], state["model"], state["state"], state["in_flight"]
            )
        self._publish_backends()

    def _publish_backends(self) -> None:
        """With several workers each has its own simulated backends: their totals go to the
        shared files and are summed over workers (one process reads them with a collector)."""
        if self.metrics.multiprocess and self.metrics.enabled:
            for name, provider in self.simulated.items():
                self.metrics.backend.publish(name, provider.stats())

    async def _tick_local_gauges(self) -> None:
        """With several workers any one answers a scrape: keep every worker's share of the
        summed gauges and backend counters fresh, not only the scraped one's."""
        while True:
            await asyncio.sleep(self.metrics.config.flush_interval_s)
            try:
                self.refresh_local_gauges()
            except Exception:
                log.exception("refreshing this worker's gauges failed")

    async def refresh_gauges(self) -> None:
        """Bring the gauges that describe state (not events) up to date, for a scrape."""
        m = self.metrics
        self.refresh_local_gauges()
        now = self.clock()
        for tenant in self.directory.tenants.values():
            scope = Scope(f"tenant:{tenant.id}", tenant.limits, tenant.timezone)
            try:
                left = await self.quotas.remaining(scope, now)
                balance = await self.quotas.balance(tenant.id) if tenant.prepaid else None
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

    async def scrape(self) -> tuple[bytes, str]:
        """The metrics exposition, gauges brought up to date: (body, content type)."""
        await self.refresh_gauges()
        return await asyncio.to_thread(self.metrics.render)

    def ensure_demo_key(self) -> str | None:
        """Give the first tenant a key when the configuration asks for a demo key."""
        env = self.settings.demo_key_env
        if env is None or not self.directory.tenants:
            return None
        tenant_id = next(iter(self.directory.tenants))
        secret = os.environ.get(env)
        if secret:
            from gateway.auth import display_prefix, hash_key

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


def build_directory(settings: Settings) -> Directory:
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
    providers: dict[str, Provider] = {}
    for config in settings.providers:
        if config.type == "simulated":
            sim_config = config.model_copy()
            encoding = counter.encoding(_first_model_on(settings, config.name))
            providers[config.name] = SimulatedProvider(config.name, sim_config, encoding)
        else:
            providers[config.name] = OpenAICompatProvider(config.name, config)
    return providers


def build_compute_costs(settings: Settings) -> ComputeCosts:
    """Compute cost rates for every deployment; simulated ones bring their latency model."""
    simulated = {p.name: p for p in settings.providers if p.type == "simulated"}
    deployments: dict[str, LatencyModel | None] = {}
    for model in settings.models:
        for d in model.deployments:
            sim = simulated.get(d.provider)
            deployments[d.resolved_name] = LatencyModel.of(sim) if sim is not None else None
    return ComputeCosts(settings.compute_costs, deployments)


def _first_model_on(settings: Settings, provider: str) -> str:
    for model in settings.models:
        if any(d.provider == provider for d in model.deployments):
            return model.name
    return provider


def create_app(settings: Settings, *, gateway: Gateway | None = None) -> Litestar:
    """Build the gateway's ASGI app from validated settings."""
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    def relay() -> Relay:
        assert gw.relay is not None, "the gateway has not started"
        return gw.relay

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await relay().handle("chat.completions", request)

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await relay().handle("completions", request)

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
        return await relay().handle("embeddings", request)

    @get("/v1/models")
    async def list_models(request: Request[Any, Any, Any]) -> Response[Any]:
        key, _ = gw.directory.authenticate(request.headers.get("authorization"), _now())
        data = [_model_card(name, gw) for name in _visible_models(gw, key)]
        return _json({"object": "list", "data": data})

    @get("/v1/models/{model:str}")
    async def retrieve_model(request: Request[Any, Any, Any]) -> Response[Any]:
        model = request.path_params["model"]
        key, _ = gw.directory.authenticate(request.headers.get("authorization"), _now())
        if model not in _visible_models(gw, key):
            from gateway.errors import model_not_found

            raise model_not_found(model)
        return _json(_model_card(model, gw))

    @get("/healthz")
    async def healthz() -> Response[Any]:
        return _json({"status": "ok"})

    @get("/readyz")
    async def readyz() -> Response[Any]:
        ready = gw.relay is not None
        body = {"status": "ready" if ready else "starting", "warnings": gw.counter.warnings}
        return _json(body, status=200 if ready else 503)

    from gateway.admin import admin_routes
    from gateway.console import console_routes
    from gateway.messages import messages_routes
    from gateway.responses import responses_routes

    return Litestar(
        route_handlers=[
            chat_completions,
            completions,
            embeddings,
            list_models,
            retrieve_model,
            healthz,
            readyz,
            *admin_routes(gw),
            *responses_routes(gw),
            *messages_routes(gw),
            *console_routes(gw),
        ],
        lifespan=[lifespan],
        exception_handlers={Exception: _exception_handler},
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=None,
        logging_config=None,
        state=None,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _visible_models(gw: Gateway, key: ApiKey) -> list[str]:
    names: list[str] = []
    for model in gw.settings.models:
        if key.allows(model.name):
            names.append(model.name)
            names.extend(model.aliases)
    return names


def _model_card(name: str, gw: Gateway) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(gw.started_at),
        "owned_by": "maas-gateway",
    }


def _json(body: Any, status: int = 200) -> Response[Any]:
    from gateway.relay import _encode

    return Response(
        _encode(body),
        status_code=status,
        media_type="application/json",
        headers={"x-request-id": new_request_id()},
    )


def _exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Every error leaves in OpenAI's shape with a request id."""
    request_id = new_request_id()
    if isinstance(exc, ApiError):
        return _error_answer(request, exc, request_id)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status == 404:
            error = not_found(request.url.path)
        elif status == 405:
            error = method_not_allowed(request.method, request.url.path)
        elif status == 413:
            size = request.app.request_max_body_size
            error = body_too_large(size if isinstance(size, int) else 0)
        elif status < 500:
            error = invalid_request(str(exc.detail))
            error.status_code = status
        else:
            error = server_error(request_id)
        return _error_answer(request, error, request_id)
    log.exception("unhandled error for %s", request.url.path, exc_info=exc)
    error = server_error(request_id)
    error.status_code = HTTP_500_INTERNAL_SERVER_ERROR
    return _error_answer(request, error, request_id)


def _error_answer(
    request: Request[Any, Any, Any], error: ApiError, request_id: str
) -> Response[Any]:
    """An error in the shape of the API the path belongs to (Anthropic's under /v1/messages)."""
    if request.url.path.startswith("/v1/messages"):
        from gateway.messages import anthropic_error_response

        return anthropic_error_response(error, request_id)
    return error_response(error, request_id)
