"""The app factory: the one place where the gateway's state is built and wired.

`create_app(settings)` returns a Litestar app around a `Gateway`. Nothing is opened until
the app starts: its lifespan opens every service in one step (`gateway.state.open_state`)
and closes them all (flushing the ledger) on shutdown. The admin API is its own module
(`gateway.admin`), handed the serving state.
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

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from billing.compute_cost import build_compute_costs
from billing.ledger import Ledger
from billing.pricing import PriceCatalog
from billing.quota import QuotaStore
from gateway.admin import admin_routes
from gateway.auth import ApiKey, display_prefix, hash_key
from gateway.config import Settings
from gateway.errors import (
    ApiError,
    body_too_large,
    invalid_request,
    method_not_allowed,
    model_not_found,
    not_found,
    server_error,
)
from gateway.gauges import publish_backends, scrape, tick_local_gauges
from gateway.keystore import DirectorySync
from gateway.metrics import Metrics
from gateway.metrics_server import METRICS_PORT_ENV, MetricsListener
from gateway.relay import Relay, Services, error_response, new_request_id
from gateway.routing import Router
from gateway.state import AppState, build_directory, open_state
from gateway.tokens import TokenCounter
from providers.simulated import SimulatedProvider

log = logging.getLogger("maas.app")
_encode = msgspec.json.Encoder().encode


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


def create_app(settings: Settings, *, gateway: Gateway | None = None) -> Litestar:
    """Build the gateway's ASGI app from validated settings."""
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        async with gw.serving():
            yield

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await gw.state.relay.handle("chat.completions", request)

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await gw.state.relay.handle("completions", request)

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
        return await gw.state.relay.handle("embeddings", request)

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
            raise model_not_found(model)
        return _json(_model_card(model, gw))

    @get("/healthz")
    async def healthz() -> Response[Any]:
        return _json({"status": "ok"})

    @get("/readyz")
    async def readyz() -> Response[Any]:
        ready = gw.is_serving
        body = {"status": "ready" if ready else "starting", "warnings": gw.counter.warnings}
        return _json(body, status=200 if ready else 503)

    from gateway.console import console_routes
    from gateway.messages import messages_routes
    from gateway.responses import responses_routes

    def state() -> AppState:
        return gw.state

    return Litestar(
        route_handlers=[
            chat_completions,
            completions,
            embeddings,
            list_models,
            retrieve_model,
            healthz,
            readyz,
            *admin_routes(state),
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
