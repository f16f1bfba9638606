"""What the app (Litestar: routing, request object, response, exception handling) adds to a
request on the hot routes, before and after `Relay.handle`.

    python bench/app_overhead_bench.py --tokenizers DIR [--requests 20000] [--profile]

The gateway's own app (`gateway.app.create_app`, its services opened) is called as an ASGI
app in-process, with `Relay.handle` replaced by a stand-in that reads the body and answers a
fixed JSON body with an `x-request-id` header, the least the relay does. The same exchange
through a bare ASGI callable is the floor; the difference is the app's overhead per request.
A third figure bounds what bypassing Litestar's dispatch could save: a raw ASGI callable that
builds the `Request` itself and sends the relay's `Response` (no routing, exception
handling, guards or handler signature), i.e. the least any app keeping the relay's
Request/Response contract costs.
Each figure is the best of `--rounds` rounds of `--requests` sequential requests (CPU time
of this process, so other load on the machine matters little).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from litestar import Request, Response  # noqa: E402

from gateway.app import Gateway, create_app  # noqa: E402
from gateway.config import parse_settings  # noqa: E402
from gateway.relay import Relay, new_request_id  # noqa: E402

ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'
BODY = (
    b'{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"system","content":"Be brief."},'
    b'{"role":"user","content":"Say hello in five words."}]}'
)
Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def stand_in(
    self: Relay, endpoint: str, request: Request[Any, Any, Any], dialect: Any = None
) -> Response[Any]:
    await request.body()
    request.headers.get("authorization")
    return Response(ANSWER, media_type="application/json", headers={"x-request-id": "req_1"})


async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The floor: read the body, answer the same bytes and headers."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(ANSWER)).encode()),
        (b"x-request-id", new_request_id().encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER, "more_body": False})


def scope_of(path: str, method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"authorization", b"Bearer sk-bench-0000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }


async def one(app: Asgi, path: str) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope_of(path), receive, send)
    return int(sent[0]["status"])


async def per_request_us(app: Asgi, path: str, requests: int, rounds: int) -> float:
    status = await one(app, path)
    assert status == 200, status
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            await one(app, path)
        best = min(best, (time.process_time() - started) / requests * 1e6)
    return best


def dispatch_bound(app: Any, gateway: Gateway) -> Asgi:
    """The relay called straight from ASGI: Request in, the relay's Response out."""
    _, handler, *_ = app.asgi_router.handle_routing("/v1/chat/completions", "POST")
    relay = gateway.state.relay

    async def direct(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["app"] = app
        scope["route_handler"] = handler
        scope["path_params"] = {}
        request: Request[Any, Any, Any] = Request(scope, receive, send)  # type: ignore[arg-type]
        response = await relay.handle("chat.completions", request)
        await response.to_asgi_response(app, request)(scope, receive, send)  # type: ignore[arg-type]

    return direct


def settings_for(tokenizers: Path, workdir: Path) -> Any:
    return parse_settings(
        {
            "tokenizers": {"dir": str(tokenizers)},
            "metrics": {"port": None},
            "providers": [{"name": "sim", "type": "simulated", "time_scale": 0}],
            "models": [{"name": "gpt-4o-mini", "deployments": [{"provider": "sim", "model": "m"}]}],
            "pricing": {
                "currency": "USD",
                "models": {
                    "gpt-4o-mini": [
                        {"effective_from": "2026-01-01", "prices": {"input": "1", "output": "1"}}
                    ]
                },
            },
            "ledger": {"url": f"sqlite+aiosqlite:///{workdir / 'ledger.db'}", "url_env": None},
            "tenants": [{"id": "acme", "keys": []}],
        }
    )


async def main_async(args: argparse.Namespace) -> None:
    Relay.handle = stand_in  # type: ignore[method-assign,assignment]
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(args.tokenizers, Path(tmp))
        gateway = Gateway(settings)
        app = create_app(settings, gateway=gateway)
        async with gateway.serving():
            floor = await per_request_us(bare, "/v1/chat/completions", args.requests, args.rounds)
            print(f"bare ASGI exchange      {floor:7.1f} µs/request")
            for path in ("/v1/chat/completions", "/v1/embeddings"):
                app_us = await per_request_us(app, path, args.requests, args.rounds)  # type: ignore[arg-type]
                print(f"app {path:22s}{app_us:7.1f} µs/request (+{app_us - floor:.1f})")
            direct = dispatch_bound(app, gateway)
            least = await per_request_us(direct, "/v1/chat/completions", args.requests, args.rounds)
            print(f"no dispatch (bound)     {least:7.1f} µs/request (+{least - floor:.1f})")
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(args.requests):
                    await one(app, "/v1/chat/completions")  # type: ignore[arg-type]
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", type=Path, required=True, help="tokenizer directory")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the app")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
