"""Where the gateway's CPU goes per request, from py-spy's collapsed stacks.

Each sample is charged to one step of the request path: the frame nearest the leaf that
belongs to a step (a module or function of the gateway, Litestar or uvicorn). Client
libraries (httpx, aiohttp, redis-py, SQLAlchemy) are transparent: their frames are
charged to the gateway code that called them; when no gateway frame is on the stack
(e.g. aiohttp's socket callbacks, the ledger's SQLite thread) they fall back to a
library bucket.

    python bench/profile_breakdown.py profile.collapsed.txt [--us-per-request 2700]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

#: (step, file fragment, function names or None for any), checked leaf to root.
STEP_RULES: list[tuple[str, str, frozenset[str] | None]] = [
    ("auth (key hash, lookup)", "gateway/auth.py", None),
    ("decode + validate body (msgspec)", "gateway/schemas.py", None),
    ("route (model resolve)", "gateway/relay.py", frozenset({"_route"})),
    ("count prompt tokens", "gateway/relay.py", frozenset({"_count_prompt"})),
    ("count prompt tokens", "gateway/tokens.py", None),
    ("price (quote)", "billing/pricing.py", None),
    ("quota admit (Redis)", "billing/quota/redis_store.py", frozenset({"admit"})),
    (
        "quota settle (Redis)",
        "billing/quota/redis_store.py",
        frozenset({"settle", "_settle_call"}),
    ),
    ("quota admit (Redis)", "gateway/relay.py", frozenset({"_admit"})),
    ("quota settle (Redis)", "gateway/relay.py", frozenset({"_settle", "_settle_later"})),
    ("quota planning + headers (Python)", "billing/quota/", None),
    ("ledger record (journal + queue)", "billing/ledger.py", frozenset({"record"})),
    ("ledger record (journal + queue)", "billing/journal.py", None),
    ("ledger writer (batches, SQLite)", "billing/ledger.py", None),
    ("metrics", "gateway/metrics.py", None),
    (
        "usage record (build, cost)",
        "gateway/relay.py",
        frozenset({"record_usage", "build_record", "_stream_usage", "_provisional"}),
    ),
    ("usage record (build, cost)", "billing/", None),
    ("upstream stream parsing", "providers/openai_compat.py", frozenset({"_events"})),
    ("upstream stream parsing", "providers/sse.py", None),
    ("upstream stream parsing", "providers/base.py", None),
    ("provider send (httpx + aiohttp)", "providers/openai_compat.py", None),
    ("router forward (retries, breaker)", "gateway/routing.py", None),
    ("router forward (retries, breaker)", "gateway/breaker.py", None),
    (
        "stream relay (count, pass or rewrite chunks)",
        "gateway/relay.py",
        frozenset({"_relay_stream"}),
    ),
    ("relay glue + response encode", "gateway/relay.py", None),
    ("relay glue + response encode", "gateway/app.py", None),
    ("relay glue + response encode", "gateway/answers.py", None),
    ("litestar (routing, request, response)", "litestar/", None),
    ("uvicorn + httptools (HTTP server)", "uvicorn/", None),
]

#: Frames skipped when looking for a step: shared wrappers whose callers name the step.
TRANSPARENT: frozenset[tuple[str, str]] = frozenset(
    {
        ("billing/quota/redis_store.py", "_call"),
        ("billing/quota/redis_store.py", "<lambda>"),
        ("gateway/relay.py", "_settle_later"),
        ("gateway/relay.py", "_settle_task"),
    }
)

#: Files that are client libraries of our own: charged like redis-py or aiohttp are.
TRANSPARENT_FILES: tuple[str, ...] = (
    "billing/quota/pipeline.py",
    "billing/quota/cluster_pipeline.py",
)

#: Used only when no step frame is on the stack.
LIBRARY_RULES: list[tuple[str, str]] = [
    ("redis I/O (quota pipeline writes, replies)", "billing/quota/pipeline.py"),
    ("aiohttp client I/O callbacks", "aiohttp/"),
    ("aiohttp client I/O callbacks", "httpx_aiohttp/"),
    ("aiohttp client I/O callbacks", "httpx/"),
    ("redis-py I/O callbacks", "redis/"),
    ("ledger writer (batches, SQLite)", "sqlalchemy/"),
    ("ledger writer (batches, SQLite)", "aiosqlite/"),
    ("ledger writer (batches, SQLite)", "sqlite3"),
    ("event loop (asyncio, uvloop)", "asyncio/"),
    ("event loop (asyncio, uvloop)", "uvloop"),
]


def parse_frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text.strip())
    if match is None:
        return text.strip(), ""
    return match["func"], match["file"]


def classify(frames: list[tuple[str, str]]) -> str:
    """The step one stack (root first) is charged to."""
    for func, file in reversed(frames):
        name = func.rsplit(".", 1)[-1]  # py-spy writes methods as Class.method
        if any(fragment in file and name == skipped for fragment, skipped in TRANSPARENT):
            continue
        if any(fragment in file for fragment in TRANSPARENT_FILES):
            continue
        for step, fragment, names in STEP_RULES:
            if fragment in file and (names is None or name in names):
                return step
    for func, file in reversed(frames):
        for step, fragment in LIBRARY_RULES:
            if fragment in file or fragment in func:
                return step
    return "other (interpreter, GC, unattributed)"


def load_collapsed(path: Path) -> Counter[str]:
    """Samples per step from a py-spy `--format raw` file (`frame;frame;... count`)."""
    steps: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [parse_frame(f) for f in stack.split(";")]
        steps[classify(frames)] += int(count)
    return steps


def breakdown(steps: Counter[str]) -> list[tuple[str, float]]:
    """(step, share of samples), largest first."""
    total = sum(steps.values()) or 1
    return [(step, n / total) for step, n in steps.most_common()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collapsed", type=Path)
    parser.add_argument("--us-per-request", type=float, default=0.0)
    args = parser.parse_args(argv)
    steps = load_collapsed(args.collapsed)
    print(f"{sum(steps.values())} samples")
    for step, share in breakdown(steps):
        us = f"{share * args.us_per_request:7.0f} µs" if args.us_per_request else ""
        print(f"{step:42} {share * 100:5.1f}%  {us}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
