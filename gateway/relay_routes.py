"""The relay's POST endpoints as Litestar ASGI routes: from Litestar's router to the answer
in one call.

A Litestar HTTP route runs each request through its handler layers: the kwargs model that
injects the handler's parameters, the before- and after-request hooks, the conversion of
the handler's return value into a response. The relay's handlers take only the request
and return a finished response, so those layers do nothing for them, at about 10 µs of a
JSON request's 130 µs in-process (`bench/relay_path_bench.py`, `docs/benchmarks.md`).

`relay_route(path, serve)` serves such a handler as an ASGI route instead. Litestar still
routes the request and its exception handlers still answer whatever `serve` raises; the
request is a Litestar `Request` whose body is held to `request_max_body_size` as an HTTP
route's is. Other methods get what a POST-only HTTP route gives them: OPTIONS a 204 with
`allow`, the rest a 405 through the exception handlers.

    async def chat(request: Request) -> Response:
        return await relay.handle("chat.completions", request)

    Litestar(route_handlers=[relay_route("/v1/chat/completions", chat), ...])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response
from litestar.enums import MediaType
from litestar.exceptions import MethodNotAllowedException
from litestar.handlers import ASGIRouteHandler
from litestar.status_codes import HTTP_204_NO_CONTENT
from litestar.types import Empty, Receive, Scope, Send

__all__ = ["Serve", "relay_route"]

#: A relay handler: the request in, a finished response out.
Serve = Callable[[Request[Any, Any, Any]], Awaitable[Response[Any]]]


class _RelayRoute(ASGIRouteHandler):
    """An ASGI route whose requests' bodies are limited as an HTTP route's are."""

    __slots__ = ("_max_body_size",)

    def __init__(self, path: str) -> None:
        super().__init__(path, copy_scope=False)
        self._max_body_size: Any = Empty

    def resolve_request_max_body_size(self) -> int | None:
        """The nearest layer's `request_max_body_size`, as `HTTPRouteHandler` resolves it."""
        if self._max_body_size is Empty:
            self._max_body_size = next(
                (
                    size
                    for layer in reversed(self.ownership_layers)
                    if (size := getattr(layer, "request_max_body_size", Empty)) is not Empty
                ),
                None,
            )
        return self._max_body_size  # type: ignore[no-any-return]


def relay_route(path: str, serve: Serve) -> ASGIRouteHandler:
    """A POST route at `path` answered by `serve(request)`."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]  # type: ignore[typeddict-item]
        if method != "POST":
            if method != "OPTIONS":
                raise MethodNotAllowedException()
            allowed = Response(
                content=None,
                status_code=HTTP_204_NO_CONTENT,
                headers={"allow": "OPTIONS, POST"},
                media_type=MediaType.TEXT,
            )
            await allowed.to_asgi_response(None, Request(scope))(scope, receive, send)
            return
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        answer = await serve(request)
        await answer.to_asgi_response(None, request, status_code=200)(scope, receive, send)

    return _RelayRoute(path)(endpoint)
