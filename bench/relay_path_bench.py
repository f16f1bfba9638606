"""CPU of the gateway's own request path per JSON request, measured in-process.

    python bench/relay_path_bench.py --tokenizers DIR [--requests 4000] [--rounds 5]
        [--concurrency 64] [--profile]

The gateway's app (`gateway.app.create_app`, its services opened: key check, body
validation, routing, prompt counting, pricing, in-memory quotas (or Redis's, with
`--redis URL`), the SQLite ledger with its crash journal, metrics) is called as an ASGI app
in-process for `/v1/chat/completions`, `--concurrency` requests at a time, against the
in-process `simulated` provider answering at once (`time_scale: 0`). No sockets, no HTTP
server, no HTTP client: what is left is the app, `Relay.handle` and the metering, plus the
simulator's answer (the same before and after a change). The figure is the best of
`--rounds` rounds of `--requests` requests, in CPU time of this process (all threads, so the
ledger writer's included): other load on the machine matters little, which makes it the
figure to compare commits by.

`--upstream canned` answers instead from the upstream bodies `bench/gateway_bench.py`
serves from nginx (a 64-token `chat.completion`, or a 64-chunk stream with a usage chunk,
read by the real `openai_compat` parser as one upstream read), with no time spent making
them: what is left is the gateway's own path plus Litestar, the figure to compare commits by
for issue 16's ratios. `--kind stream` measures streams; `--null-usage` gives every chunk
the `"usage":null` OpenAI, SGLang, TGI and Ark write.

`--parts` times, in isolation (`timeit`), the pieces issue 16's request-path work replaced:
a JSON answer with the relay's fourteen headers through Litestar's `Response` and
`ASGIResponse` against `gateway.answers.JSONAnswer` (the same header bytes, checked), and
a request id from `uuid.uuid4()` against `new_request_id()`; a one-read stream answer with
the same headers through Litestar's `Stream` against `gateway.answers.StreamAnswer` (the
same messages, checked); and one upstream read of 64 chunks, a usage chunk and `[DONE]`
(the benchmark's stream) through the SSE parser, then the JSON check as a `list[Raw]`
decode plus two substring scans against the provider's one pass (`_facts_of`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import msgspec  # noqa: E402
from litestar import Response  # noqa: E402
from litestar.response import Stream  # noqa: E402

from bench.gateway_bench import upstream_json_body, upstream_sse_body  # noqa: E402
from gateway.answers import JSONAnswer, StreamAnswer  # noqa: E402
from gateway.app import Gateway, create_app  # noqa: E402
from gateway.auth import hash_key  # noqa: E402
from gateway.config import parse_settings  # noqa: E402
from gateway.relay import new_request_id  # noqa: E402
from providers.base import ProviderRequest, ProviderResponse, TokenUsage  # noqa: E402
from providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider, _facts_of  # noqa: E402
from providers.simulated import SimulatedProvider  # noqa: E402
from providers.sse import SSEDecoder  # noqa: E402

KEY = "sk-bench-relay-path-0000"
BODY = (
    b'{"model":"bench","max_tokens":64,"messages":[{"role":"system","content":"Be brief."},'
    b'{"role":"user","content":"Say hello in five words."}]}'
)
STREAM_BODY = BODY[:-1] + b',"stream":true,"stream_options":{"include_usage":true}}'


class _CannedResponse:
    """What `OpenAICompatProvider` reads of an httpx streaming response: one read."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def aiter_raw(self) -> Any:
        yield self.data

    async def aclose(self) -> None:
        return None


def can_the_upstream(null_usage: bool = False) -> None:
    """Make the simulated provider answer with the benchmark's upstream bodies at once,
    decoded as `OpenAICompatProvider` decodes an upstream's (for this process only)."""
    json_body = upstream_json_body().encode()
    sse_body = upstream_sse_body().encode()
    if null_usage:  # OpenAI, SGLang, TGI and Ark: `"usage":null` in every chunk but the last
        sse_body = sse_body.replace(b"]}\n\n", b'],"usage":null}\n\n')
    parser = OpenAICompatProvider("canned", OpenAICompatConfig(base_url="http://canned/v1"))
    decode = msgspec.json.Decoder().decode

    async def send(self: Any, request: ProviderRequest) -> ProviderResponse:
        if request.stream:
            return ProviderResponse(stream=parser._events(_CannedResponse(sse_body)))  # type: ignore[arg-type]
        body = decode(json_body)
        return ProviderResponse(body=body, usage=TokenUsage.from_openai(body["usage"]))

    SimulatedProvider.send = send  # type: ignore[method-assign]


def settings_for(tokenizers: Path, workdir: Path, redis_url: str | None = None) -> Any:
    quotas = {"backend": "redis", "redis_url": redis_url, "redis_url_env": None}
    return parse_settings(
        {
            **({"quotas": quotas} if redis_url else {}),
            "tokenizers": {"dir": str(tokenizers)},
            "metrics": {"port": None},
            "providers": [{"name": "sim", "type": "simulated", "time_scale": 0}],
            "models": [{"name": "bench", "deployments": [{"provider": "sim", "model": "m"}]}],
            "pricing": {
                "currency": "USD",
                "models": {
                    "bench": [
                        {"effective_from": "2020-01-01", "prices": {"input": "1", "output": "1"}}
                    ]
                },
            },
            "ledger": {"url": f"sqlite+aiosqlite:///{workdir / 'ledger.db'}", "url_env": None},
            "tenants": [
                {
                    "id": "bench",
                    "keys": [{"id": "bench-key", "hash": hash_key(KEY)}],
                    "limits": {"rpm": 10**9, "tpm": 10**12},
                }
            ],
        }
    )


def _scope(length: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"authorization", b"Bearer " + KEY.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(length).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }


async def one(app: Any, body: bytes = BODY) -> int:
    """One request through the app, with uvicorn's `receive`: the body, then (after the
    response is complete) `http.disconnect`."""
    sent: list[dict[str, Any]] = []
    complete = asyncio.get_running_loop().create_future()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.shield(complete)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            if not complete.done():
                complete.set_result(None)

    await app(_scope(len(body)), receive, send)
    return int(sent[0]["status"])


async def run(app: Any, requests: int, concurrency: int, body: bytes = BODY) -> None:
    for _ in range(requests // concurrency):
        statuses = await asyncio.gather(*(one(app, body) for _ in range(concurrency)))
        assert all(status == 200 for status in statuses), statuses


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(args.tokenizers, Path(tmp), args.redis)
        if args.upstream == "canned":
            can_the_upstream(args.null_usage)
        body = STREAM_BODY if args.kind == "stream" else BODY
        gateway = Gateway(settings, freeze_heap=True)  # as `maas-gateway serve` runs
        app = create_app(settings, gateway=gateway)
        async with gateway.serving():
            await run(app, args.concurrency * 4, args.concurrency, body)  # warm up
            best = best_loop = float("inf")
            served = args.requests // args.concurrency * args.concurrency
            for _ in range(args.rounds):
                started, loop_started = time.process_time(), time.thread_time()
                await run(app, args.requests, args.concurrency, body)
                loop_spent = time.thread_time() - loop_started
                await asyncio.sleep(0.05)  # let the ledger writer catch up inside the round
                spent = time.process_time() - started
                best = min(best, spent / served)
                best_loop = min(best_loop, loop_spent / served)
            kind = "JSON" if args.kind == "json" else "64-chunk streams"
            print(
                f"request path, {kind}, {args.upstream} upstream, concurrency "
                f"{args.concurrency}: {best * 1e6:.1f} µs CPU "
                f"({best_loop * 1e6:.1f} µs of it on the event loop's thread)"
            )
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await run(app, args.requests, args.concurrency, body)
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(40)


#: The headers of a metered JSON answer: the request id, six rate-limit and six cost headers.
ANSWER_HEADERS = {
    "x-request-id": "req_0123456789abcdef0123456789abcdef",
    **{
        f"x-ratelimit-{name}": "1000000"
        for name in (
            "limit-requests",
            "remaining-requests",
            "reset-requests",
            "limit-tokens",
            "remaining-tokens",
            "reset-tokens",
        )
    },
    "x-maas-cost": "0.000012",
    "x-maas-currency": "USD",
    "x-maas-prompt-tokens": "20",
    "x-maas-cached-tokens": "0",
    "x-maas-completion-tokens": "64",
    "x-maas-price-version": "bench@2020-01-01",
}


def _wire_headers(response_class: type[Response[Any]]) -> list[tuple[bytes, bytes]]:
    response = response_class(
        b'{"object":"chat.completion"}', media_type="application/json", headers=dict(ANSWER_HEADERS)
    )
    no_request: Any = None  # neither response reads the request for a body of bytes
    asgi = response.to_asgi_response(
        None, no_request, headers={}, cookies=[], media_type="application/json", status_code=200
    )
    return asgi.encode_headers()


async def _stream_answer(answer: str, calls: int) -> list[Any]:
    """Send a one-read stream `calls` times as the relay does; the messages of the last."""
    sent: list[Any] = []
    ended: asyncio.Future[None] | None = None

    async def receive() -> dict[str, Any]:  # as uvicorn: `http.disconnect` once complete
        nonlocal ended
        ended = asyncio.get_running_loop().create_future()
        await ended
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message["more_body"]:
            if ended is not None and not ended.done():
                ended.set_result(None)

    async def one_read() -> Any:
        yield b"data: {}\n\n" * 64

    scope: Any = {"type": "http", "method": "POST", "headers": [], "state": {}}
    request: Any = None  # neither answer reads the request
    for _ in range(calls):
        sent.clear()
        headers = {**ANSWER_HEADERS, "cache-control": "no-cache"}
        if answer == "litestar":
            response: Any = Stream(one_read(), media_type="text/event-stream", headers=headers)
        else:
            response = StreamAnswer(one_read(), headers=headers)
        await response.to_asgi_response(None, request)(scope, receive, send)
    return sent


def _timed_stream_answer(answer: str) -> float:
    """Best of 7 runs of 5,000 stream answers, µs per answer (CPU time)."""
    best = float("inf")
    for _ in range(7):
        started = time.process_time()
        asyncio.run(_stream_answer(answer, 5000))
        best = min(best, (time.process_time() - started) / 5000)
    return best * 1e6


def _upstream_read() -> bytes:
    chunk = (
        b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764000000,'
        b'"model":"upstream-stream","choices":[{"index":0,"delta":{"content":" token"},'
        b'"finish_reason":null}]}'
    )
    usage = (
        b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764000000,'
        b'"model":"upstream-stream","choices":[],"usage":{"prompt_tokens":31,'
        b'"completion_tokens":64,"total_tokens":95}}'
    )
    return b"".join(b"data: " + c + b"\n\n" for c in [chunk] * 64 + [usage, b"[DONE]"])


_check = msgspec.json.Decoder(list[msgspec.Raw]).decode


def _check_and_scan(joined: bytes) -> tuple[bool, bool]:
    _check(joined)
    return b'"error"' in joined, b'"usage"' in joined


def parts() -> None:
    """Time the replaced pieces one by one (best of 7 runs of 20,000 calls)."""
    assert _wire_headers(Response) == _wire_headers(JSONAnswer)
    same = asyncio.run(_stream_answer("litestar", 1)) == asyncio.run(_stream_answer("lean", 1))
    assert same, "StreamAnswer sent other messages than Stream"
    read = _upstream_read()
    events = SSEDecoder().feed(read)
    assert len(events) == 66
    joined = b"[" + b",".join(events[:-1]) + b"]"  # type: ignore[arg-type]
    pieces = (
        ("answer: Response + ASGIResponse", lambda: _wire_headers(Response)),
        ("answer: JSONAnswer", lambda: _wire_headers(JSONAnswer)),
        ("request id: uuid.uuid4()", lambda: "req_" + uuid.uuid4().hex),
        ("request id: new_request_id()", new_request_id),
        ("one read of 66 events: SSEDecoder.feed", lambda: SSEDecoder().feed(read)),
        ("65 chunks: list[Raw] check + 2 scans", lambda: _check_and_scan(joined)),
        ("65 chunks: one pass (_facts_of)", lambda: _facts_of(joined)),
    )
    for name, piece in pieces:
        best = min(timeit.repeat(piece, number=20000, repeat=7)) / 20000
        print(f"{name:40s}{best * 1e6:7.2f} µs")
    for name, answer in (
        ("stream answer: Stream (task group)", "litestar"),
        ("stream answer: StreamAnswer", "lean"),
    ):
        print(f"{name:40s}{_timed_stream_answer(answer):7.2f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", type=Path, required=True, help="tokenizer directory")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one round")
    parser.add_argument(
        "--upstream",
        choices=("simulated", "canned"),
        default="simulated",
        help="the in-process simulator, or the nginx bodies of gateway_bench answered at once",
    )
    parser.add_argument("--kind", choices=("json", "stream"), default="json")
    parser.add_argument("--parts", action="store_true", help="time the replaced pieces only")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="keep the quotas in this Redis (as gateway_bench does), not in memory; its "
        "time is not counted, the client's is",
    )
    parser.add_argument(
        "--null-usage",
        action="store_true",
        help='with --upstream canned: every chunk but the usage chunk says "usage":null, as '
        "OpenAI, SGLang, TGI and Ark write them",
    )
    args = parser.parse_args()
    if args.parts:
        parts()
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
