"""The metrics listener: `GET /metrics` on its own address, away from the public port.

The exposition names every tenant with its requests, tokens, cost and prepaid balance, so it
is served only here: on `metrics.host`/`metrics.port` (loopback and 9464 by default), where
the scraper reaches it and clients do not. With `metrics.bearer_token_env` set, a scrape must
also carry `Authorization: Bearer <that variable's value>` (Prometheus: `authorization:` in
the scrape config).

A deliberately small HTTP/1.1 server: one request per connection, a head of at most 8 KiB that
must arrive within 10 s, GET or HEAD of `/metrics` only. With several workers (`serve
--workers N`) each worker listens on the same port with `SO_REUSEPORT`; whichever accepts a
scrape renders the sums over every worker (`gateway.metrics`, multiprocess mode).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Final

log = logging.getLogger("maas.metrics")

MAX_HEAD_BYTES: Final = 8 * 1024
HEAD_TIMEOUT_S: Final = 10.0
PATH: Final = "/metrics"

#: Set by `serve --workers N` for its workers: the metrics port they all listen on.
METRICS_PORT_ENV: Final = "MAAS_METRICS_SHARED_PORT"

Scrape = Callable[[], Awaitable[tuple[bytes, str]]]


class MetricsListener:
    """Serves `scrape()` (body, content type) on `GET /metrics` at `host:port`."""

    def __init__(
        self,
        scrape: Scrape,
        host: str,
        port: int,
        *,
        token: str | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._scrape = scrape
        self._host = host
        self._port = port
        self._token = token.encode() if token else None
        self._reuse_port = reuse_port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle,
            self._host,
            self._port,
            limit=MAX_HEAD_BYTES,
            reuse_port=self._reuse_port or None,
        )

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when configured as 0)."""
        assert self._server is not None, "the listener has not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self._host if ":" not in self._host else f"[{self._host}]"
        return f"http://{host}:{self.port}{PATH}"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            status, body, content_type = await self._answer(head)
            reason = _REASONS.get(status, b"")
            writer.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % (status, reason, content_type.encode(), len(body))
            )
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[int, bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return 400, b"bad request\n", "text/plain"
        method, target, _ = parts
        if target.split("?", 1)[0] != PATH:
            return 404, b"not found: the metrics are at /metrics\n", "text/plain"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "text/plain"
        if self._token is not None and not self._authorized(lines[1:]):
            return 401, b"unauthorized: a bearer token is required\n", "text/plain"
        try:
            body, content_type = await self._scrape()
        except Exception:
            log.exception("rendering the metrics failed")
            return 500, b"rendering the metrics failed\n", "text/plain"
        return 200, body, content_type

    def _authorized(self, header_lines: list[str]) -> bool:
        assert self._token is not None
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "authorization":
                scheme, _, credential = value.strip().partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(credential.strip().encode(), self._token)
        return False


_REASONS: Final = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    500: b"Internal Server Error",
}
