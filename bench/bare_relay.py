"""The bare relay: the gateway's server and HTTP client stack with no metering at all.

Litestar on uvicorn (uvloop, httptools), forwarding to the upstream over one pooled
httpx client on httpx-aiohttp's `AiohttpTransport` - the same stack as the gateway's
`openai_compat` provider - but no keys, no validation, no token counting, no pricing, no
quotas, no ledger and no metrics: the request body's bytes are forwarded as they came and
the answer's bytes go back as they arrive. It is the baseline `bench/gateway_bench.py`
divides the gateway's figures by.

    python bench/bare_relay.py --port 9001 \
        --json-url http://127.0.0.1:9000/json/v1/chat/completions \
        --stream-url http://127.0.0.1:9000/stream/v1/chat/completions

A request whose body asks for `"stream": true` goes to `--stream-url` and is relayed as a
stream; any other goes to `--json-url` and is relayed as one body.

`--answers gateway` sends the answers with the gateway's own response classes
(`gateway.answers.JSONAnswer` and `StreamAnswer`) instead of Litestar's `Response` and
`Stream`, and calls the upstream as the gateway's provider does (the request handed to the
transport itself, the body read straight from aiohttp: `providers.openai_compat._read_body`
and `_body_reads`): the floor of the gateway's stack as it is now, to tell what the gateway
saves on its answers and reads from what its metering costs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from httpx_aiohttp import AiohttpTransport
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.answers import JSONAnswer, StreamAnswer
from providers.openai_compat import (  # the gateway provider's client and body readers
    CookielessAsyncClient,
    _body_reads,
    _read_body,
)

_STREAM_MARKERS = (b'"stream":true', b'"stream": true')


def wants_stream(body: bytes) -> bool:
    """Whether a request body asks for a stream (a byte search, not a JSON decode)."""
    return any(marker in body for marker in _STREAM_MARKERS)


def create_bare_relay(
    json_url: str, stream_url: str, max_connections: int = 512, answers: str = "litestar"
) -> Litestar:
    """A Litestar app relaying `POST /v1/chat/completions` to the upstream, unmetered;
    `answers="gateway"` calls the upstream and answers as the gateway does."""
    lean = answers == "gateway"
    state: dict[str, Any] = {}
    urls = {False: httpx.URL(json_url), True: httpx.URL(stream_url)}  # parsed once

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        transport = state["transport"] = AiohttpTransport(limits=limits)
        client = CookielessAsyncClient(  # as the gateway's provider: no cookie jar
            transport=transport,
            timeout=httpx.Timeout(600.0, connect=5.0, pool=5.0),
            headers={"content-type": "application/json"},
        )
        state["client"] = client
        try:
            yield
        finally:
            await client.aclose()

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
        client = state["client"]
        raw = await request.body()
        stream = wants_stream(raw)
        upstream = client.build_request("POST", urls[stream], content=raw)
        if lean:  # as the gateway's provider: to the transport, past the client's layers
            answer = await state["transport"].handle_async_request(upstream)
        else:
            answer = await client.send(upstream, stream=stream)
        if not stream:
            if lean:
                content = await _read_body(answer)
                return JSONAnswer(content, status_code=answer.status_code, headers={})
            return Response(
                answer.content, status_code=answer.status_code, media_type="application/json"
            )

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for data in _body_reads(answer) if lean else answer.aiter_raw():
                    yield data
            finally:
                await answer.aclose()

        if lean and answer.status_code == 200:
            return StreamAnswer(relay(), headers={"cache-control": "no-cache"})
        return Stream(
            relay(),
            status_code=answer.status_code,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    @get("/healthz")
    async def healthz() -> Response[Any]:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Litestar(
        route_handlers=[chat_completions, healthz],
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json-url", required=True, help="upstream URL for JSON requests")
    parser.add_argument("--stream-url", required=True, help="upstream URL for stream requests")
    parser.add_argument(
        "--answers",
        choices=("litestar", "gateway"),
        default="litestar",
        help="answer with Litestar's Response and Stream, or the gateway's JSONAnswer and "
        "StreamAnswer (default: litestar)",
    )
    args = parser.parse_args(argv)
    uvicorn.run(
        create_bare_relay(args.json_url, args.stream_url, answers=args.answers),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
