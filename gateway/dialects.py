"""The seam between the relay and the APIs it serves by translation to Chat Completions.

A `Dialect` is made per request by the route that serves an API (OpenAI Responses in
`gateway.responses`, Anthropic Messages in `gateway.messages`). The relay runs its one
pipeline (authenticate → validate → route → count → price → admit → forward → count →
price → record → observe → settle) and asks the dialect only at the edges: where the key is,
how the body becomes a Chat Completions body, how the JSON answer and the chunk stream go
back, and what an error looks like. The ledger row names the dialect's API in its `endpoint`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from litestar import Request, Response

from gateway.errors import ApiError

if TYPE_CHECKING:
    from gateway.steps import Admitted, Authenticated, Bill

_decode = msgspec.json.decode


class Dialect(Protocol):
    """An API the relay serves by translating it to and from Chat Completions."""

    name: str
    """What the ledger row's `endpoint` and the metrics call this API."""

    def authorization(self, request: Request[Any, Any, Any]) -> str | None:
        """The credential as an `Authorization` header value (`Bearer <key>`), if any."""

    async def decode(
        self, raw: bytes, who: Authenticated, max_json_depth: int
    ) -> tuple[dict[str, Any], Any]:
        """The Chat Completions body to forward and its typed view (`ChatRequest`)."""

    async def answer(
        self, result: dict[str, Any], admitted: Admitted, bill: Bill
    ) -> dict[str, Any]:
        """The API's JSON answer from a chat completion and its bill (the ledger row)."""

    def stream(
        self, sse: AsyncIterator[bytes], admitted: Admitted, bill: Callable[[], Bill]
    ) -> AsyncIterator[bytes]:
        """The API's event stream from the relay's Chat Completions SSE bytes (which end
        with a usage chunk, written after the ledger row, and `[DONE]`); `bill()` gives
        the bill once those bytes have come."""

    def error_response(
        self, error: ApiError, request_id: str, limits: dict[str, str] | None = None
    ) -> Response[Any]:
        """An error answer in the API's own shape, with the rate-limit headers given."""


async def translated(
    sse: AsyncIterator[bytes],
    events: Callable[[AsyncIterator[dict[str, Any]]], AsyncGenerator[bytes, None]],
) -> AsyncIterator[bytes]:
    """A dialect's event stream: `events` run over the relay's chunks, both closed on exit."""
    async with relayed_chunks(sse) as chunks, contextlib.aclosing(events(chunks)) as out:
        async for piece in out:
            yield piece


@contextlib.asynccontextmanager
async def relayed_chunks(
    sse: AsyncIterator[bytes],
) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """The relay's chunks, its stream started at once and closed on exit.

    Started before the dialect sends its first event, so that a client leaving at any
    point meets the relay's own bookkeeping (the cut is recorded, the upstream closed,
    the reservation settled); closed on exit, so that happens at once, not at collection.
    """
    chunks = sse_chunks(sse)
    first = await anext(chunks, None)

    async def every() -> AsyncIterator[dict[str, Any]]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    try:
        yield every()
    finally:
        await chunks.aclose()
        close = getattr(sse, "aclose", None)
        if close is not None:
            await close()


async def sse_chunks(sse: AsyncIterator[bytes]) -> AsyncGenerator[dict[str, Any], None]:
    """The chunk objects of the relay's own SSE bytes (`data: {...}` events, `[DONE]` ends).

    An error the relay sent mid-stream comes through as `{"error": {...}}`.
    """
    pending = b""
    async for piece in sse:
        pending += piece
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue
            data = event[6:]
            if data == b"[DONE]":
                return
            yield _decode(data)


def sse_event(name: str, data: bytes) -> bytes:
    """One named server-sent event."""
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def bearer_of(request: Request[Any, Any, Any]) -> str | None:
    """`Authorization`, or else the `x-api-key` header as a bearer credential."""
    header = request.headers.get("authorization")
    if header:
        return header
    key = request.headers.get("x-api-key")
    return f"Bearer {key.strip()}" if key and key.strip() else None
