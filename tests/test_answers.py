"""`JSONAnswer` and `StreamAnswer` put the same bytes on the wire as Litestar's own
`Response` and `Stream`, and a client leaving a `StreamAnswer` ends it as `Stream` would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar import Litestar, Request, Response, post
from litestar.response import Stream

from gateway.answers import JSONAnswer, StreamAnswer

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


SCOPE: dict[str, Any] = {
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


async def _exchange(app: Litestar) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({**SCOPE, "state": {}}, receive, send)
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


class Events:
    """An upstream-like iterator of SSE bytes that says when it was closed."""

    def __init__(self, stall_after: int | None = None) -> None:
        self.stall_after = stall_after
        self.closed = asyncio.Event()
        self.cancelled = False

    async def __call__(self) -> AsyncIterator[bytes]:
        try:
            for number in range(3):
                if number == self.stall_after:
                    await asyncio.sleep(3600)  # an upstream between two chunks
                yield b"data: %d\n\n" % number
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.closed.set()


def _stream_app(answer: str, events: Events) -> Litestar:
    @post("/", status_code=200)
    async def handler(request: Request[Any, Any, Any]) -> Response[Any]:
        headers = dict(HEADERS, **{"cache-control": "no-cache"})
        if answer == "litestar":
            return Stream(events(), media_type="text/event-stream", headers=headers)
        return StreamAnswer(events(), headers=headers)

    return Litestar([handler])


async def _stream_exchange(app: Litestar, leave: asyncio.Event | None = None) -> list[Any]:
    """Serve one request as uvicorn would: the body, then `http.disconnect` once the
    response is complete (or when `leave` is set: the client went away)."""
    sent: list[Any] = []
    done = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        waits = [asyncio.ensure_future(done.wait())]
        if leave is not None:
            waits.append(asyncio.ensure_future(leave.wait()))
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in pending:
            waiting.cancel()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app({**SCOPE, "state": {}}, receive, send)
    return sent


async def test_stream_answer_sends_what_litestar_stream_sends() -> None:
    expected = await _stream_exchange(_stream_app("litestar", Events()))
    got = await _stream_exchange(_stream_app("lean", Events()))
    assert got == expected
    assert got[0]["headers"][-2:] == [
        (b"cache-control", b"no-cache"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
    ]
    assert b"".join(m.get("body", b"") for m in got[1:]) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


@pytest.mark.parametrize("answer", ["litestar", "lean"])
async def test_a_client_leaving_cancels_and_closes_the_stream(answer: str) -> None:
    """The iterator waiting between chunks is cancelled where it waits and closed (its
    `finally` runs: the relay records the request there), and the app returns quietly."""
    events, leave = Events(stall_after=1), asyncio.Event()
    serving = asyncio.ensure_future(_stream_exchange(_stream_app(answer, events), leave))
    await asyncio.sleep(0.05)
    assert not events.closed.is_set()
    leave.set()
    sent = await asyncio.wait_for(serving, 5)
    assert events.cancelled and events.closed.is_set()
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n"]  # nothing after it
