"""The app factory: the one place where the gateway's state is built and wired.

`create_app(settings)` returns a Litestar app around a `Gateway` (`gateway.lifespan`).
Nothing is opened until the app starts: its lifespan, `Gateway.serving()`, opens every
service in one step (`gateway.state.open_state`) and closes them all (flushing the ledger)
on shutdown. The admin API is its own module (`gateway.admin`), handed the serving state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from gateway.admin import admin_routes
from gateway.auth import ApiKey
from gateway.config import Settings
from gateway.console import console_routes
from gateway.errors import (
    ApiError,
    body_too_large,
    invalid_request,
    method_not_allowed,
    model_not_found,
    not_found,
    server_error,
)
from gateway.lifespan import Gateway
from gateway.messages import anthropic_error_response, messages_routes
from gateway.relay import error_response, new_request_id
from gateway.relay_routes import Serve, relay_route
from gateway.responses import responses_routes
from gateway.state import AppState
from providers.base import Endpoint

__all__ = ["Gateway", "create_app"]

log = logging.getLogger("maas.app")
_encode = msgspec.json.Encoder().encode


def create_app(settings: Settings, *, gateway: Gateway | None = None) -> Litestar:
    """Build the gateway's ASGI app from validated settings."""
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        async with gw.serving():
            yield

    def relaying(endpoint: Endpoint) -> Serve:
        async def serve(request: Request[Any, Any, Any]) -> Response[Any]:
            return await gw.state.relay.handle(endpoint, request)

        return serve

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

    def state() -> AppState:
        return gw.state

    return Litestar(
        route_handlers=[
            relay_route("/v1/chat/completions", relaying("chat.completions")),
            relay_route("/v1/completions", relaying("completions")),
            relay_route("/v1/embeddings", relaying("embeddings")),
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
        return anthropic_error_response(error, request_id)
    return error_response(error, request_id)
