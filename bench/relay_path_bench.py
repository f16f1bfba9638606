"""CPU of the gateway's own request path per JSON request, measured in-process.

    python bench/relay_path_bench.py --tokenizers DIR [--requests 4000] [--rounds 5]
        [--concurrency 64] [--profile]

The gateway's app (`gateway.app.create_app`, its services opened: key check, body
validation, routing, prompt counting, pricing, in-memory quotas, the SQLite ledger with its
crash journal, metrics) is called as an ASGI app in-process for `/v1/chat/completions`,
`--concurrency` requests at a time, against the in-process `simulated` provider answering
at once (`time_scale: 0`). No sockets, no HTTP server, no HTTP client: what is left is the
app, `Relay.handle` and the metering, plus the simulator's answer (the same before and
after a change). The figure is the best of `--rounds` rounds of `--requests` requests, in
CPU time of this process (all threads, so the ledger writer's included): other load on the
machine matters little, which makes it the figure to compare commits by.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from gateway.app import Gateway, create_app  # noqa: E402
from gateway.auth import hash_key  # noqa: E402
from gateway.config import parse_settings  # noqa: E402

KEY = "sk-bench-relay-path-0000"
BODY = (
    b'{"model":"bench","max_tokens":64,"messages":[{"role":"system","content":"Be brief."},'
    b'{"role":"user","content":"Say hello in five words."}]}'
)


def settings_for(tokenizers: Path, workdir: Path) -> Any:
    return parse_settings(
        {
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


def _scope() -> dict[str, Any]:
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
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }


async def one(app: Any) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(), receive, send)
    return int(sent[0]["status"])


async def run(app: Any, requests: int, concurrency: int) -> None:
    for _ in range(requests // concurrency):
        statuses = await asyncio.gather(*(one(app) for _ in range(concurrency)))
        assert all(status == 200 for status in statuses), statuses


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(args.tokenizers, Path(tmp))
        gateway = Gateway(settings)
        app = create_app(settings, gateway=gateway)
        async with gateway.serving():
            await run(app, args.concurrency * 4, args.concurrency)  # warm up
            best = float("inf")
            for _ in range(args.rounds):
                started = time.process_time()
                await run(app, args.requests, args.concurrency)
                await asyncio.sleep(0.05)  # let the ledger writer catch up inside the round
                spent = time.process_time() - started
                best = min(best, spent / (args.requests // args.concurrency * args.concurrency))
            print(f"request path, JSON, concurrency {args.concurrency}: {best * 1e6:.1f} µs CPU")
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await run(app, args.requests, args.concurrency)
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", type=Path, required=True, help="tokenizer directory")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one round")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
