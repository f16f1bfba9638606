"""Load generators for bench/gateway_bench.py.

- `run_wrk`: closed-loop HTTP load with wrk (one thread, N connections), a Lua script for
  the POST body and headers, and a `done` hook that prints requests, errors and latency
  percentiles as one JSON line. A request is one whole response (a whole stream for SSE).
- `paced`: per-chunk arrival times of concurrent streams (asyncio + aiohttp), for time to
  first token and the gaps between chunks against a paced upstream. Run it as its own
  process so it can be pinned to a core:

      python bench/loadgen.py paced --url http://127.0.0.1:8000/v1/chat/completions \
          --body-file body.json --concurrency 64 --streams-per-worker 5 --stagger-s 1.3

  It prints one JSON line: streams, chunks, errors, and TTFT and gap percentiles in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "max_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "bytes": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout, summary.bytes))
end
"""


def _lua_string(text: str) -> str:
    """A Lua long-bracket literal holding `text` verbatim."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def write_wrk_script(
    path: Path, request_path: str, bodies: list[str], headers: dict[str, str]
) -> Path:
    """A wrk script sending POSTs whose bodies cycle through `bodies`."""
    # Built in init(), after wrk has set its Host header (wrk.format adds it).
    lines = ["local requests = {}", "init = function(args)"]
    header_table = ", ".join(f"[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items())
    for body in bodies:
        lines.append(
            "  table.insert(requests, wrk.format('POST', "
            f"{_lua_string(request_path)}, {{{header_table}}}, {_lua_string(body)}))"
        )
    lines += [
        "end",
        "local i = 0",
        "request = function()",
        "  i = i % #requests + 1",
        "  return requests[i]",
        "end",
        _WRK_DONE,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: whole responses per second and their latency."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_command(
    base_url: str, script: Path, connections: int, seconds: float, core: int | None
) -> list[str]:
    """The wrk command line: one thread, `connections` connections, for `seconds`."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        base_url,
    ]
    return ["taskset", "-c", str(core), *command] if core is not None else command


def parse_wrk(stdout: str, stderr: str = "") -> WrkResult:
    """The result line printed by the script's `done` hook."""
    for line in stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            data = json.loads(line[len("WRK_RESULT ") :])
            errors = sum(
                data[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors")
            )
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                errors=errors + data["timeouts"],
            )
    raise RuntimeError(f"wrk printed no result:\n{stdout}\n{stderr}")


def run_wrk(
    base_url: str, script: Path, connections: int, seconds: float, core: int | None
) -> WrkResult:
    """Run wrk to completion and return its figures."""
    done = subprocess.run(
        wrk_command(base_url, script, connections, seconds, core),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    return parse_wrk(done.stdout, done.stderr)


# --- paced streams ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def _one_stream(
    session: Any,
    url: str,
    body: bytes,
    headers: dict[str, str],
    ttfts: list[float],
    gaps: list[float],
) -> int:
    """Send one stream request; record TTFT and gaps between content chunks. Returns chunks."""
    started = time.perf_counter()
    last: float | None = None
    chunks = 0
    buffer = b""
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        async for data in response.content.iter_any():
            now = time.perf_counter()
            buffer += data
            while True:
                end = buffer.find(b"\n\n")
                if end < 0:
                    break
                event, buffer = buffer[:end], buffer[end + 2 :]
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                choices = chunk.get("choices") or ()
                if not any((c.get("delta") or {}).get("content") for c in choices):
                    continue
                if last is None:
                    ttfts.append(now - started)
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
    return chunks


async def paced(
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    streams_per_worker: int,
    deadline_s: float,
    stagger_s: float = 0.0,
) -> dict[str, Any]:
    """`concurrency` workers each run `streams_per_worker` streams back to back.

    Worker i starts `i * stagger_s / concurrency` seconds in, so with `stagger_s` set to
    one stream's length the streams begin evenly spread, as in a steady load of
    `concurrency` streams, rather than all at once in one herd (0: all at once).
    """
    import aiohttp

    ttfts: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    chunks = 0
    streams = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    all_headers = {"content-type": "application/json", **headers}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(index: int) -> None:
            nonlocal chunks, streams
            await asyncio.sleep(index * stagger_s / concurrency)
            for _ in range(streams_per_worker):
                if time.monotonic() > stop_at:
                    return
                try:
                    # Awaited first: `chunks += await ...` would read `chunks` before the
                    # await and lose the other workers' additions made meanwhile.
                    got = await _one_stream(session, url, body, all_headers, ttfts, gaps)
                    chunks += got
                    streams += 1
                except Exception as exc:  # counted and reported, never hidden
                    errors.append(f"{type(exc).__name__}: {exc}")

        stop_at = time.monotonic() + deadline_s
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    ms = 1000.0
    return {
        "streams": streams,
        "chunks": chunks,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ttft_p50_ms": percentile(ttfts, 50) * ms,
        "ttft_p99_ms": percentile(ttfts, 99) * ms,
        "gap_p50_ms": percentile(gaps, 50) * ms,
        "gap_p99_ms": percentile(gaps, 99) * ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load generators for the gateway benchmark.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("paced", help="per-chunk timing of concurrent streams")
    p.add_argument("--url", required=True)
    p.add_argument("--body-file", type=Path, required=True)
    p.add_argument("--header", action="append", default=[], help="name:value")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--streams-per-worker", type=int, default=5)
    p.add_argument("--deadline-s", type=float, default=120.0)
    p.add_argument(
        "--stagger-s", type=float, default=0.0, help="spread the workers' starts over this time"
    )
    args = parser.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    import uvloop

    result = uvloop.run(
        paced(
            args.url,
            args.body_file.read_bytes(),
            {k.strip(): v.strip() for k, v in headers.items()},
            args.concurrency,
            args.streams_per_worker,
            args.deadline_s,
            args.stagger_s,
        )
    )
    print("PACED_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
