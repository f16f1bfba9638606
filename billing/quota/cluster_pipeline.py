"""The quota scripts on a Redis Cluster: one pipelined connection per master, routed by slot.

redis-py's cluster client costs several times the CPU of `PipelinedRedis` per call; the two
scripts every request runs take this path instead. The slot map comes from ``CLUSTER
SLOTS`` (asked of any node that answers) and is asked again after a connection fails or a
node answers ``MOVED``; a ``MOVED`` call is sent once more to the new owner. Anything else
a cluster may answer while it moves slots (``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``) raises
`Redirected`, and the caller runs that call through redis-py, which handles them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlparse

from redis import exceptions as redis_errors

from billing.quota.pipeline import LuaScript, PipelinedRedis

__all__ = ["ClusterPipelines", "Redirected"]

SLOTS = 16384

Address = tuple[str, int]


class Redirected(redis_errors.RedisError):
    """The cluster is moving the slot (ASK, TRYAGAIN, CLUSTERDOWN): use redis-py's client."""


class ClusterPipelines:
    """Pipelined connections to a cluster's masters and the map of which serves each slot."""

    def __init__(self, url: str, nodes: Sequence[Address], *, timeout_s: float) -> None:
        parsed = urlparse(url)
        userinfo = ""
        if parsed.password is not None:
            userinfo = f"{quote(parsed.username or '')}:{quote(parsed.password)}@"
        self._userinfo = userinfo
        self._seeds = [(parsed.hostname or "localhost", parsed.port or 6379), *nodes]
        self.timeout_s = timeout_s
        self._connections: dict[Address, PipelinedRedis] = {}
        self._slots: list[Address | None] = [None] * SLOTS
        self._stale = True
        self._refreshing: asyncio.Future[None] | None = None

    def _connection(self, address: Address) -> PipelinedRedis:
        connection = self._connections.get(address)
        if connection is None:
            host, port = address
            url = f"redis://{self._userinfo}{host}:{port}/0"
            connection = self._connections[address] = PipelinedRedis(url, timeout_s=self.timeout_s)
        return connection

    async def evalsha(
        self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any], slot: int
    ) -> Any:
        """Run a script on the master of `slot`."""
        for attempt in range(2):
            if self._stale:
                await self._refresh()
            address = self._slots[slot]
            if address is None:
                self._stale = True
                raise redis_errors.ClusterDownError(f"no master serves slot {slot}")
            try:
                return await self._connection(address).evalsha(script, keys, args)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                self._stale = True
                raise
            except redis_errors.ResponseError as exc:
                message = str(exc)
                if message.startswith("MOVED") and attempt == 0:
                    self._stale = True
                    continue
                if message.startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")):
                    self._stale = True
                    raise Redirected(message) from exc
                raise
        raise AssertionError("unreachable")

    async def _refresh(self) -> None:
        """Ask the slot map again (once, however many callers are waiting for it)."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._ask_slots())
        refreshing = self._refreshing
        try:
            await asyncio.shield(refreshing)
        finally:
            if refreshing.done() and self._refreshing is refreshing:
                self._refreshing = None

    async def _ask_slots(self) -> None:
        known = [a for a in dict.fromkeys(self._slots) if a is not None]
        failure: Exception | None = None
        for address in dict.fromkeys([*known, *self._seeds]):
            try:
                reply = await self._connection(address).execute(("CLUSTER", "SLOTS"))
            except redis_errors.RedisError as exc:
                failure = exc
                continue
            if isinstance(reply, redis_errors.ResponseError):
                failure = reply
                continue
            slots: list[Address | None] = [None] * SLOTS
            for start, end, master, *_ in reply:
                owner = (master[0] or address[0], int(master[1]))
                slots[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
            self._slots = slots
            self._stale = False
            return
        raise redis_errors.ConnectionError(f"no cluster node gave its slot map: {failure}")

    async def aclose(self) -> None:
        for connection in self._connections.values():
            await connection.aclose()
