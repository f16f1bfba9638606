"""Bounds on what a client may send before the application sees a request.

uvicorn's httptools protocol accepts a request head of any size and any number of header
fields, and waits forever for a head that never ends: a client can hold memory and a
connection without ever authenticating. `BoundedHttpToolsProtocol` is that protocol with
limits, checked on the bytes as they arrive (before the parser buffers them):

- the request head (request line and header fields) is at most `max_header_bytes`, and at
  most `max_headers` fields: beyond either the answer is `431`;
- the request target is at most `max_request_line_bytes`: beyond it the answer is `414`;
- the head must be complete within `header_timeout_s` of its first byte (or of the
  connection opening; checked at least every quarter of the timeout): otherwise `408` and
  the connection closes. A connection idle between
  requests closes after `keep_alive_timeout_s` (uvicorn's own keep-alive timer).

So a connection holds at most one bounded head (plus one read of the socket) before a request
starts, and the request body is bounded by `server.max_body_bytes`. Rejections are answered
in the OpenAI error shape with `connection: close`; the connection then reads and discards
for at most two seconds before closing (a lingering close, so the client reads the answer).

This subclasses uvicorn's `HttpToolsProtocol` and overrides its parser callbacks
`on_headers_complete` and `on_message_complete`, and `data_received` and `send_400_response`
(it reads `url` and `headers`, which `on_url` and `on_header` collect): uvicorn's version
range is pinned in pyproject.toml and tests/test_pinned_internals.py fails if those parts
change.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, Final

from pydantic import BaseModel, ConfigDict, Field
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import ApiError

log = logging.getLogger("maas.http")

#: The import path uvicorn is given (`http=`), also in worker processes.
PROTOCOL_PATH: Final = "gateway.http_limits:BoundedHttpToolsProtocol"
_HEAD_END: Final = b"\r\n\r\n"
#: How long a rejected connection is kept reading (and discarding) before it closes.
LINGER_S: Final = 2.0
_REASONS: Final = {
    408: (b"Request Timeout", "request_timeout"),
    414: (b"URI Too Long", "request_line_too_long"),
    431: (b"Request Header Fields Too Large", "request_header_fields_too_large"),
}


class HttpLimits(BaseModel):
    """The `server.http:` section: what a request may send before the application runs."""

    model_config = ConfigDict(extra="forbid")

    max_header_bytes: int = Field(32 * 1024, ge=1024, le=16 * 1024 * 1024)
    """The whole request head, request line and header fields together (431 beyond)."""
    max_headers: int = Field(100, ge=8, le=10_000)
    """Header fields in one request (431 beyond)."""
    max_request_line_bytes: int = Field(8 * 1024, ge=256, le=1024 * 1024)
    """The request target, path and query (414 beyond)."""
    header_timeout_s: float = Field(15.0, gt=0, le=3600)
    """Time for a request head to arrive in full, from its first byte or the connection's
    opening (408 and close beyond)."""
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=3600)
    """An idle keep-alive connection closes after this long."""


class _LimitExceeded(Exception):
    """Raised from a parser callback to stop parsing a request that broke a limit."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of `HttpLimits` (see the module)."""

    #: Set once per process by `configure` (every connection of the process shares them).
    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""
        self._rejection: tuple[int, str] | None = None
        self._head_since: float | None = None  # when the head being received began
        self._watch: asyncio.TimerHandle | None = None
        self._discarding = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_since = self.loop.time()
        self._watch_heads(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._in_head:
            if self._head_since is None:
                self._head_since = self.loop.time()
            allowed = self.limits.max_header_bytes - self._head_bytes
            if len(data) > allowed:
                # Only acceptable if the head ends within what is allowed.
                if _HEAD_END not in self._tail + data[: max(allowed, 0)]:
                    self._reject(
                        431,
                        "Request header fields too large: the request head may have at most "
                        f"{self.limits.max_header_bytes} bytes.",
                    )
                    return
            else:
                self._head_bytes += len(data)
                self._tail = data[-3:] if len(data) >= 3 else (self._tail + data)[-3:]
        super().data_received(data)

    def on_headers_complete(self) -> None:
        # The target and the fields are checked once the head is complete (its size is
        # bounded already), not per field: that keeps the common path as fast as before.
        limits = self.limits
        if len(self.url) > limits.max_request_line_bytes:
            self._rejection = (
                414,
                f"The request target is too long: at most {limits.max_request_line_bytes} bytes.",
            )
            raise _LimitExceeded
        if len(self.headers) > limits.max_headers:
            self._rejection = (
                431,
                f"Too many header fields: a request may have at most {limits.max_headers}.",
            )
            raise _LimitExceeded
        self._in_head = False
        self._head_since = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers a parser error (ours included) with a 400: a limit gets its own."""
        if self._rejection is not None:
            self._reject(*self._rejection)
        else:
            super().send_400_response(msg)

    def _watch_heads(self, delay: float) -> None:
        # One timer per connection, re-armed as it fires, rather than one per request: a
        # timer per request costs more than everything else the limits do.
        self._watch = self.loop.call_later(delay, self._check_head)

    def _check_head(self) -> None:
        """Cut a head that has taken longer than `header_timeout_s` (checked at least every
        quarter of it, so it is cut within 1.25 times the timeout)."""
        self._watch = None
        if self._discarding or self.transport.is_closing():
            return
        timeout = self.limits.header_timeout_s
        since = self._head_since
        if not self._in_head or since is None:
            self._watch_heads(timeout / 4)
            return
        waited = self.loop.time() - since
        if waited < timeout:
            self._watch_heads(min(timeout - waited, timeout / 4) + 0.001)
            return
        if self._head_bytes or self._tail:
            self._reject(
                408,
                f"The request head did not arrive within {self.limits.header_timeout_s:g} seconds.",
            )
        else:
            self.transport.close()  # opened and never used

    def _reject(self, status: int, message: str) -> None:
        """Answer in the OpenAI error shape and close the connection."""
        self._in_head = False
        self._head_since = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined request broke a limit mid-response
            return
        reason, code = _REASONS[status]
        body = ApiError(status, message, code=code).encode()
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        # A lingering close, as nginx does: the client may still be sending what broke the
        # limit, and closing with its bytes unread would reset the connection and lose the
        # answer. So: end our side, discard whatever arrives, close within LINGER_S.
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def configure(limits: HttpLimits) -> dict[str, Any]:
    """Apply `limits` to every connection of this process; returns the uvicorn options
    that go with them (`http` and `timeout_keep_alive`)."""
    BoundedHttpToolsProtocol.limits = limits
    return {"http": PROTOCOL_PATH, "timeout_keep_alive": limits.keep_alive_timeout_s}
