"""One pipelined Redis connection for the quota store's hot Lua scripts.

redis-py spends most of an `EVALSHA`'s CPU on its per-command machinery (a pooled
connection checked out and back under a lock, a timeout context, Python argument
packing). The quota store runs two scripts per request, so it sends them here instead:
one connection per process, commands packed by hiredis (C), written together when several
are ready in the same event-loop turn, and replies matched to callers in order (Redis
answers a connection's commands in the order it received them).

Failure model, the same as the redis-py path it replaces: a command not answered within
`timeout_s` of being written fails with `redis.exceptions.TimeoutError`, and so does every
command behind it on the connection, which is then closed (a hung Redis answers none of
them); a lost or refused connection fails with `redis.exceptions.ConnectionError`. The
next command connects again. Nothing is retried here.

Plain `redis://` and `unix://` URLs (with password, user name and database) are
supported; `PipelinedRedis.supports(url)` says whether a URL is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis
from redis import exceptions as redis_errors

__all__ = ["Answered", "LuaScript", "PipelinedRedis"]

logger = logging.getLogger(__name__)


Answered = Callable[[Any], None]
"""What `PipelinedRedis.send_soon` calls with a command's reply, or with the exception."""


def _answer(target: asyncio.Future[Any] | Answered, reply: Any, failed: bool = False) -> None:
    """Hand a command's reply (or, `failed`, the exception that ended it) to whoever waits:
    a caller's future, or the callback of `send_soon`."""
    if isinstance(target, asyncio.Future):
        if not target.done():
            if failed:
                target.set_exception(reply)
            else:
                target.set_result(reply)
        return
    try:
        target(reply)
    except Exception:  # a callback's bug must not stop the replies behind it
        logger.exception("a Redis reply's callback failed")


class LuaScript:
    """A Lua script and its SHA1, for `PipelinedRedis.evalsha`."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Protocol(asyncio.Protocol):
    """Replies in order: each one resolves the oldest waiting future."""

    def __init__(self, owner: PipelinedRedis) -> None:
        self.owner = owner
        self.reader = hiredis.Reader(
            encoding="utf-8",
            protocolError=redis_errors.InvalidResponse,
            replyError=redis_errors.ResponseError,
        )

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.owner._waiting
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if not waiting:
                    raise redis_errors.InvalidResponse("a reply nobody asked for")
                _answer(waiting.popleft()[0], reply)
        except redis_errors.RedisError as exc:
            self.owner._fail(redis_errors.ConnectionError(f"bad reply from Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._fail(redis_errors.ConnectionError("connection to Redis lost"), self)


class PipelinedRedis:
    """A single, lazily opened, pipelined connection to one Redis.

    `execute` sends one command and returns its reply (error replies are returned as
    `redis.exceptions.ResponseError` instances, not raised); `evalsha` runs a script,
    loading it on NOSCRIPT.
    """

    def __init__(self, url: str, *, timeout_s: float) -> None:
        parsed = urlparse(url)
        self._path = unquote(parsed.path) if parsed.scheme == "unix" else None
        self._host = unquote(parsed.hostname or "localhost")
        self._port = parsed.port or 6379
        self._username = unquote(parsed.username) if parsed.username else None
        self._password = unquote(parsed.password) if parsed.password else None
        db = parsed.path.strip("/") if parsed.scheme == "redis" else ""
        self._db = int(db) if db else 0
        self.timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._waiting: deque[tuple[asyncio.Future[Any] | Answered, float]] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._closed = False

    @staticmethod
    def supports(url: str) -> bool:
        """Whether this client can reach `url` (plain TCP or a Unix socket, no options)."""
        parsed = urlparse(url)
        return parsed.scheme in ("redis", "unix") and not parsed.query

    async def evalsha(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a script by its SHA1 (loading it once if Redis does not know it)."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        reply = await self.execute(command)
        if isinstance(reply, redis_errors.ResponseError) and str(reply).startswith("NOSCRIPT"):
            loaded = await self.execute(("SCRIPT", "LOAD", script.source))
            if isinstance(loaded, redis_errors.ResponseError):
                raise loaded
            reply = await self.execute(command)
        if isinstance(reply, redis_errors.ResponseError):
            raise reply
        return reply

    async def execute(self, command: Sequence[Any]) -> Any:
        """Send one command (pipelined behind any in flight) and wait for its reply."""
        if self._transport is None:
            await self._connect()
            if self._transport is None:  # lost again while this caller was waiting
                raise redis_errors.ConnectionError("connection to Redis lost")
        return await self._send(hiredis.pack_command(tuple(command)))  # type: ignore[arg-type]

    def send_soon(self, command: Sequence[Any], answered: Answered) -> bool:
        """Send one command without waiting for it; `answered` is called with its reply
        (an error reply, a timeout or a lost connection as the exception). Returns False,
        sending nothing, when the connection is not open: then use `execute`.

        >>> redis.send_soon(("INCR", "hits"), lambda reply: print(reply))  # doctest: +SKIP
        True
        """
        if self._transport is None:
            return False
        self._queue(hiredis.pack_command(tuple(command)), answered)  # type: ignore[arg-type]
        return True

    async def drain(self) -> None:
        """Wait until every command sent has been answered (or has failed): a PING behind
        them is answered last (Redis answers a connection's commands in order)."""
        if self._waiting:
            with contextlib.suppress(redis_errors.RedisError):
                await self.execute(("PING",))

    def _send(self, packed: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue(packed, future)
        return future

    def _queue(self, packed: bytes, target: asyncio.Future[Any] | Answered) -> None:
        self._waiting.append((target, time.monotonic() + self.timeout_s))
        self._outgoing.append(packed)
        loop = asyncio.get_running_loop()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_later(self.timeout_s, self._check_deadline)

    def _flush(self) -> None:
        """Write every command queued in this loop turn with one system call."""
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and outgoing:
            self._transport.write(b"".join(outgoing))

    def _check_deadline(self) -> None:
        self._deadline_timer = None
        if not self._waiting:
            return
        oldest = self._waiting[0][1]
        now = time.monotonic()
        if oldest <= now:
            message = f"Redis did not answer within {self.timeout_s * 1000:.0f} ms"
            self._fail(redis_errors.TimeoutError(message))
            return
        loop = asyncio.get_running_loop()
        self._deadline_timer = loop.call_later(oldest - now, self._check_deadline)

    def _fail(self, error: Exception, protocol: _Protocol | None = None) -> None:
        """Fail everything in flight and drop the connection (the next command reconnects)."""
        if protocol is not None and protocol is not self._protocol:
            return  # an older connection closing late
        transport, self._transport, self._protocol = self._transport, None, None
        self._outgoing = []
        waiting, self._waiting = self._waiting, deque()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        for target, _ in waiting:
            _answer(target, error, failed=True)
        if transport is not None:
            transport.abort()

    async def _connect(self) -> None:
        if self._closed:
            raise redis_errors.ConnectionError("the Redis connection is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._path is not None:
                    transport, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(self), self._path
                    )
                else:
                    transport, protocol = await loop.create_connection(
                        lambda: _Protocol(self), self._host, self._port
                    )
        except (OSError, TimeoutError) as exc:
            raise redis_errors.ConnectionError(f"cannot connect to Redis: {exc!r}") from exc
        self._transport, self._protocol = transport, protocol  # type: ignore[assignment]
        handshake: list[tuple[Any, ...]] = []
        if self._password is not None:
            auth = ("AUTH", self._username, self._password) if self._username else None
            handshake.append(auth or ("AUTH", self._password))
        if self._db:
            handshake.append(("SELECT", self._db))
        replies = await asyncio.gather(
            *(self._send(hiredis.pack_command(command)) for command in handshake)  # type: ignore[arg-type]
        )
        for reply in replies:
            if isinstance(reply, redis_errors.ResponseError):
                self._fail(redis_errors.ConnectionError(f"Redis refused the handshake: {reply}"))
                raise redis_errors.ConnectionError(f"Redis refused the handshake: {reply}")

    async def aclose(self) -> None:
        """Close the connection; commands still in flight fail."""
        self._closed = True
        self._fail(redis_errors.ConnectionError("the Redis connection is closed"))
