"""What the request-head limits cost: uvicorn's httptools protocol with and without them.

    python bench/http_limits_bench.py                       # 6 pairs of 6 s, both targets
    python bench/http_limits_bench.py --repeat 4 --seconds 4 --targets gateway

Two servers, each run in turn with uvicorn's own `httptools` protocol and with
`gateway.http_limits.BoundedHttpToolsProtocol` (the one `maas-gateway serve` uses), one worker
pinned to --server-core:

- `app`: a bare ASGI app answering every POST with a fixed 600-byte chat.completion: the
  worst case, where the protocol is most of the work;
- `gateway`: the whole gateway (key auth, validation, token counting, pricing, in-memory
  quotas, SQLite ledger, metrics) in front of a simulated model with no delay.

The load is this process on --load-core: --connections keep-alive connections sending the
same POST (12 header fields, as the OpenAI SDK sends) back to back. The pairs alternate
their order (AB BA ...). Per run it records requests/s and the server's CPU time per
request (user + system from /proc, the steadiest figure on a machine shared with other
work); it prints the medians, their spread (min..max) and the median of the per-pair
ratios bounded/plain. The target: the limits cost at most 3% of JSON throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

API_KEY = "sk-bench-000000000000000000000000000000000000000000"
PROTOCOLS = {"plain": "httptools", "bounded": "gateway.http_limits:BoundedHttpToolsProtocol"}
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "word " * 64},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 64, "total_tokens": 76},
    }
).encode()


# --- the servers (run in a child process) -------------------------------------------------------


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(COMPLETION)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": COMPLETION})


def gateway_app(folder: Path, tokenizer_dir: Path | None) -> Any:
    from gateway.app import Gateway, create_app
    from gateway.auth import hash_key
    from gateway.config import parse_settings

    price = [{"effective_from": "2020-01-01", "prices": {"input": "0.15", "output": "0.60"}}]
    config: dict[str, Any] = {
        "providers": [{"name": "sim", "type": "simulated", "time_scale": 0, "seed": 1}],
        "models": [{"name": "bench", "deployments": [{"provider": "sim", "model": "sim"}]}],
        "pricing": {"currency": "USD", "models": {"bench": price}},
        "quotas": {"backend": "memory"},
        "ledger": {"url": f"sqlite+aiosqlite:///{folder / 'ledger.db'}", "url_env": None},
        "metrics": {"port": None},
        "tenants": [
            {
                "id": "bench",
                "limits": {"rpm": 10**9, "tpm": 10**12},
                "keys": [{"id": "bench-key", "hash": hash_key(API_KEY)}],
            }
        ],
    }
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        config["tokenizers"] = {"dir": str(tokenizer_dir)}
    settings = parse_settings(config)
    return create_app(settings, gateway=Gateway(settings, freeze_heap=True))


def serve(target: str, protocol: str, port: int, folder: Path, tokenizer_dir: Path | None) -> None:
    import uvicorn

    app = bare_app if target == "app" else gateway_app(folder, tokenizer_dir)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=PROTOCOLS[protocol],
        access_log=False,
        log_level="warning",
        lifespan="auto" if target == "gateway" else "off",
    )


# --- the load (this process) --------------------------------------------------------------------


def request_bytes(port: int) -> bytes:
    body = json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": "Count to ten, slowly please."}],
            "max_tokens": 16,
        }
    ).encode()
    headers = {
        "host": f"127.0.0.1:{port}",
        "authorization": f"Bearer {API_KEY}",
        "content-type": "application/json",
        "accept": "application/json",
        "user-agent": "OpenAI/Python 1.99.0",
        "x-stainless-lang": "python",
        "x-stainless-package-version": "1.99.0",
        "x-stainless-os": "Linux",
        "x-stainless-arch": "x64",
        "x-stainless-runtime": "CPython",
        "x-stainless-retry-count": "0",
        "content-length": str(len(body)),
    }
    head = "POST /v1/chat/completions HTTP/1.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


async def one_connection(port: int, request: bytes, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:200])
            start = head.lower().index(b"content-length:") + 15
            length = int(head[start : head.index(b"\r\n", start)])
            await reader.readexactly(length)
            counts[0] += 1
    finally:
        writer.close()


async def load(port: int, connections: int, seconds: float) -> int:
    counts = [0]
    until = time.monotonic() + seconds
    request = request_bytes(port)
    await asyncio.gather(
        *(one_connection(port, request, until, counts) for _ in range(connections))
    )
    return counts[0]


# --- the focused micro-benchmark (in this process, no sockets) ----------------------------------


class _Transport:
    """Just enough of an asyncio transport for uvicorn's protocol: it keeps nothing."""

    def __init__(self) -> None:
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: Any) -> None:
        pass


async def _protocol_rounds(protocol_class: type, requests: int) -> float:
    """CPU seconds for `requests` keep-alive requests through one protocol instance."""
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(bare_app, lifespan="off", access_log=False, log_level="warning")
    config.load()
    state = ServerState()
    protocol = protocol_class(config=config, server_state=state, app_state={})
    protocol.connection_made(_Transport())
    request = request_bytes(8080)
    start = time.process_time()
    for _ in range(requests):
        protocol.data_received(request)
        await asyncio.gather(*state.tasks)  # the request's ASGI task, to its response
    elapsed = time.process_time() - start
    protocol.connection_lost(None)
    return elapsed


def micro(repeat: int, requests: int) -> dict[str, Any]:
    """Per-request CPU time of uvicorn's protocol with and without the limits, on the same
    request, alternating; the minimum over `repeat` rounds is the least disturbed figure."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from gateway.http_limits import BoundedHttpToolsProtocol

    classes = {"plain": HttpToolsProtocol, "bounded": BoundedHttpToolsProtocol}
    times: dict[str, list[float]] = {"plain": [], "bounded": []}
    try:
        import uvloop

        loop = uvloop.new_event_loop()  # as the gateway runs
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        for n in range(repeat):
            for name in ("plain", "bounded") if n % 2 == 0 else ("bounded", "plain"):
                seconds = loop.run_until_complete(_protocol_rounds(classes[name], requests))
                times[name].append(seconds / requests * 1e6)
    finally:
        loop.close()
    return {
        name: {"min": min(v), "median": statistics.median(v), "max": max(v)}
        for name, v in times.items()
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            asyncio.run(load(port, 1, 0.01))
            return
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            time.sleep(0.1)
    raise TimeoutError("server did not answer")


def run_once(target: str, protocol: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, __file__, "--serve", target, "--protocol", protocol]
    command += ["--port", str(port), "--folder", str(folder)]
    if args.tokenizer_dir:
        command += ["--tokenizer-dir", str(args.tokenizer_dir)]
    command = ["taskset", "-c", str(args.server_core), *command]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT)
    try:
        wait_ready(port, process)
        asyncio.run(load(port, args.connections, args.warmup_seconds))
        cpu0, t0 = cpu_seconds(process.pid), time.monotonic()
        done = asyncio.run(load(port, args.connections, args.seconds))
        cpu, elapsed = cpu_seconds(process.pid) - cpu0, time.monotonic() - t0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    return {
        "target": target,
        "protocol": protocol,
        "requests": done,
        "rps": done / elapsed,
        "cpu_us_per_request": cpu / done * 1e6,
    }


def summarize(runs: list[dict[str, Any]], target: str) -> dict[str, Any]:
    def figures(protocol: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["target"] == target and r["protocol"] == protocol]

    row: dict[str, Any] = {"target": target}
    for key in ("rps", "cpu_us_per_request"):
        plain, bounded = figures("plain", key), figures("bounded", key)
        ratios = [b / p for p, b in zip(plain, bounded, strict=True)]
        row[key] = {
            "plain": (statistics.median(plain), min(plain), max(plain)),
            "bounded": (statistics.median(bounded), min(bounded), max(bounded)),
            "ratio_median": statistics.median(ratios),
            "ratio_range": (min(ratios), max(ratios)),
        }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=6, help="pairs of runs per target (6)")
    parser.add_argument("--seconds", type=float, default=6.0, help="each measured run (6)")
    parser.add_argument("--warmup-seconds", type=float, default=1.5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--targets", default="app,gateway", help="app, gateway or both")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument("--tokenizer-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    parser.add_argument(
        "--micro", action="store_true", help="only the in-process micro-benchmark (no sockets)"
    )
    parser.add_argument("--micro-requests", type=int, default=20_000)
    parser.add_argument("--serve", choices=["app", "gateway"], help=argparse.SUPPRESS)
    parser.add_argument("--protocol", choices=list(PROTOCOLS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.protocol, args.port, args.folder, args.tokenizer_dir)
        return 0
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.micro:
        figures = micro(args.repeat, args.micro_requests)
        for name, figure in figures.items():
            print(
                f"micro {name:8} µs CPU/request: min {figure['min']:.2f}"
                f"  median {figure['median']:.2f}  max {figure['max']:.2f}"
            )
        added = figures["bounded"]["min"] - figures["plain"]["min"]
        print(f"micro added by the limits: {added:.2f} µs CPU/request (min vs min)")
        if args.json:
            args.json.write_text(json.dumps({"micro": figures}, indent=2))
        return 0
    os.sched_setaffinity(0, {args.load_core})
    runs: list[dict[str, Any]] = []
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    with tempfile.TemporaryDirectory(prefix="limits-bench-") as tmp:
        for target in targets:
            for n in range(args.repeat):
                order = ["plain", "bounded"] if n % 2 == 0 else ["bounded", "plain"]
                for protocol in order:
                    folder = Path(tmp) / f"{target}-{protocol}-{n}"
                    folder.mkdir()
                    run = run_once(target, protocol, args, folder)
                    runs.append(run)
                    print(
                        f"{target:8} {protocol:8} {run['rps']:9.0f} req/s "
                        f"{run['cpu_us_per_request']:8.1f} µs CPU/request",
                        flush=True,
                    )
    rows = [summarize(runs, target) for target in targets]
    print()
    for row in rows:
        for key, unit in (("rps", "req/s"), ("cpu_us_per_request", "µs CPU/request")):
            figure = row[key]
            plain, bounded = figure["plain"], figure["bounded"]
            low, high = figure["ratio_range"]
            print(
                f"{row['target']:8} {unit:15}"
                f" plain {plain[0]:9.1f} ({plain[1]:.1f}..{plain[2]:.1f})"
                f"  bounded {bounded[0]:9.1f} ({bounded[1]:.1f}..{bounded[2]:.1f})"
                f"  bounded/plain {figure['ratio_median']:.3f} ({low:.3f}..{high:.3f})"
            )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
