"""A stub upstream that replays recorded wire transcripts byte for byte over a real socket.

A transcript (`tests/transcripts/<dialect>/<case>.<stream|json>.http`) is one HTTP response
as the server sends it: status line, headers and body, exact bytes. The stub picks it from
the request: the upstream model name is the dialect, the last message's content the case,
and `stream` the suffix. Then it writes the response in randomly sized pieces (seeded, so a
failure replays), with short pauses so the reader sees them as separate reads:

- a body with `Transfer-Encoding: chunked` is framed into HTTP chunks at random
  boundaries (the framing is transport, not dialect); every other body goes out as is,
  its `Content-Length` already in the file;
- a transcript with the header `X-Replay-Cut` (not sent) stands for a server that died
  mid-response: the stub closes the connection without ending the chunked body.

Connections are kept alive between requests, as the servers replayed do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRANSCRIPTS = Path(__file__).resolve().parent / "transcripts"


def transcript_path(dialect: str, case: str, stream: bool) -> Path:
    return TRANSCRIPTS / dialect / f"{case}.{'stream' if stream else 'json'}.http"


@dataclass
class ReplayUpstream:
    """The stub server; `requests` holds every request body it received, decoded."""

    seed: int = 0
    whole: bool = False  # send each response in one write, its body in one HTTP chunk
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _count: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length))
                self.requests.append(body)
                self._count += 1
                rng = random.Random(self.seed * 1_000_003 + self._count)
                case = body["messages"][-1]["content"]
                path = transcript_path(body["model"], case, bool(body.get("stream")))
                if not await self._replay(writer, path.read_bytes(), rng):
                    return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _replay(self, writer: asyncio.StreamWriter, raw: bytes, rng: random.Random) -> bool:
        """Send one transcript; False when the connection must be closed after it."""
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        cut = any(line.lower().startswith(b"x-replay-cut:") for line in lines)
        lines = [line for line in lines if not line.lower().startswith(b"x-replay-")]
        chunked = any(line.lower() == b"transfer-encoding: chunked" for line in lines)
        pieces = [body] if self.whole else _random_pieces(body, rng)
        if chunked:
            framed = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces]
            if not cut:
                framed.append(b"0\r\n\r\n")
            pieces = framed
        out = b"\r\n".join(lines) + b"\r\n\r\n"
        if self.whole:
            writer.write(out + b"".join(pieces))
            await writer.drain()
            return not cut
        for piece in [out, *pieces]:
            for part in _random_pieces(piece, rng, most=64) if rng.random() < 0.3 else [piece]:
                writer.write(part)
                await writer.drain()
                if rng.random() < 0.5:
                    await asyncio.sleep(rng.choice((0, 0.001, 0.003)))
        return not cut


def _random_pieces(data: bytes, rng: random.Random, most: int = 400) -> list[bytes]:
    pieces = []
    at = 0
    while at < len(data):
        size = rng.randint(1, most)
        pieces.append(data[at : at + size])
        at += size
    return pieces


@contextlib.asynccontextmanager
async def replay_upstream(seed: int = 0, whole: bool = False) -> AsyncIterator[ReplayUpstream]:
    upstream = ReplayUpstream(seed=seed, whole=whole)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()
