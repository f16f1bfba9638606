"""`JSONAnswer` puts the same bytes on the wire as Litestar's own `Response`."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar, Request, Response, post

from gateway.answers import JSONAnswer

HEADERS = {
    "x-request-id": "req_1",
    "X-RateLimit-Limit-Requests": "10",
    "x-maas-cost": "0.000001",
    "Retry-After": "1",
}


def _app(response_class: type[Response[Any]], status: int, cookies: bool) -> Litestar:
    @post("/", status_code=200)
    async def handler(request: Request[Any, Any, Any]) -> Response[Any]:
        response = response_class(
            b'{"a":1}', status_code=status, media_type="application/json", headers=dict(HEADERS)
        )
        if cookies:
            response.set_cookie("c", "v")
        return response

    return Litestar([handler])


async def _exchange(app: Litestar) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-length", b"2")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {},
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    return sent


@pytest.mark.parametrize("status", [200, 400, 429, 503])
@pytest.mark.parametrize("cookies", [False, True])
async def test_same_bytes_as_litestar_response(status: int, cookies: bool) -> None:
    expected = await _exchange(_app(Response, status, cookies))
    got = await _exchange(_app(JSONAnswer, status, cookies))
    assert got == expected
    start = got[0]
    assert start["status"] == status
    assert start["headers"][:4] == [
        (b"x-request-id", b"req_1"),
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-maas-cost", b"0.000001"),
        (b"retry-after", b"1"),
    ]
    assert (b"content-length", b"7") in start["headers"]
    assert got[1]["body"] == b'{"a":1}'
