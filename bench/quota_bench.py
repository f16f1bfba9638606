"""Quota store benchmark: the CPU, Redis commands and bytes of one request's admit + settle,
and the ceiling of one Redis shard running the quota scripts.

    python bench/quota_bench.py                    # everything, against its own redis-server
    python bench/quota_bench.py --only cpu         # client CPU per request, memory and Redis
    python bench/quota_bench.py --only traffic     # Redis commands and bytes per request
    python bench/quota_bench.py --only ceiling     # admit+settle pairs/s of one redis-server
    python bench/quota_bench.py --redis-url redis://127.0.0.1:6379/0   # an existing Redis
    python bench/quota_bench.py --cluster-url redis://127.0.0.1:7000/0 --only traffic

Each request is what the gateway's relay sends for a prepaid tenant whose key has limits of
its own: three scopes (the tenant with rpm, tpm, a daily and a monthly token budget; its key
with rpm; the tenant x model with tpm) and the tenant's balance account. Requests spread over
`--tenants` tenants; the request id is unique per request, as in the gateway.

- cpu: `--concurrency` tasks in one process run admit then settle, `--requests` in all;
  CPU time of this process (time.process_time) per request, best of `--rounds`.
- traffic: `INFO commandstats` and `INFO stats` (total_net_input_bytes, output bytes) before
  and after `--requests` requests: commands and bytes per request.
- ceiling: `--processes` client processes, each with `--concurrency` tasks running admit +
  settle for `--seconds`; pairs per second and the redis-server's CPU (used_cpu_user +
  used_cpu_sys from INFO) over the same span. The shard's ceiling is pairs/s divided by its
  CPU share (one core is 100 %), and is printed beside Redis's own time per script call.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing.quota import (
    AdmitRequest,
    Limits,
    MemoryQuotaStore,
    QuotaConfig,
    QuotaStore,
    Scope,
    build_quota_store,
)

TENANT_LIMITS = Limits(
    rpm=10**9, tpm=10**12, tokens_per_day=10**14, tokens_per_month=10**15, max_concurrent=10**6
)
KEY_LIMITS = Limits(rpm=10**9)
MODEL_LIMITS = Limits(tpm=10**12)
MODEL = "gpt-sim"
PROMPT, MAX_TOKENS, USED_OUT = 120, 256, 180
INPUT_NANOS, OUTPUT_NANOS = 150, 600
BALANCE = 10**15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def own_redis() -> Iterator[str]:
    """A private redis-server on a free port, no persistence."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="quota-bench-") as directory:
        process = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            yield url
        finally:
            process.terminate()
            process.wait(10)


class Traffic:
    """The requests of the benchmark: tenants, their keys and models, prepaid."""

    def __init__(self, tenants: int, name: str) -> None:
        self.tenants = [f"t{n:04d}" for n in range(tenants)]
        self.name = name
        self.count = 0

    def request(self) -> AdmitRequest:
        self.count += 1
        tenant = self.tenants[self.count % len(self.tenants)]
        scopes = [  # built per request, as the relay does
            Scope(f"tenant:{tenant}", TENANT_LIMITS, "UTC"),
            Scope(f"key:{tenant}-key", KEY_LIMITS, "UTC", shard=tenant),
            Scope(f"tenant:{tenant}:model:{MODEL}", MODEL_LIMITS, "UTC"),
        ]
        return AdmitRequest(
            request_id=f"req_{self.name}_{self.count:012d}",
            scopes=scopes,
            prompt_tokens=PROMPT,
            max_tokens=MAX_TOKENS,
            min_tokens=1,
            input_cost_nanos=PROMPT * INPUT_NANOS,
            output_price_nanos=OUTPUT_NANOS,
            balance_account=tenant,
            now=datetime.now(UTC),
        )


async def open_accounts(store: QuotaStore, traffic: Traffic) -> None:
    for tenant in traffic.tenants:
        await store.set_balance(tenant, BALANCE)


async def run_pairs(
    store: QuotaStore, traffic: Traffic, requests: int, concurrency: int, until: float = 0
) -> int:
    """admit + settle, `requests` in all (or until `until`, a monotonic time); returns pairs."""
    done = 0

    async def worker(share: int) -> None:
        nonlocal done
        for _ in range(share):
            if until and time.monotonic() > until:
                return
            admission = await store.admit(traffic.request())
            used = PROMPT + USED_OUT
            await store.settle(admission, used, PROMPT * INPUT_NANOS + USED_OUT * OUTPUT_NANOS)
            done += 1

    share = -(-requests // concurrency)
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    return done


def store_for(url: str | None, cluster: bool = False) -> QuotaStore:
    if url is None:
        return MemoryQuotaStore()
    config: dict[str, Any] = {"backend": "redis", "redis_url": url, "redis_url_env": None}
    if cluster:
        config["redis_cluster"] = True
    return build_quota_store(QuotaConfig(**config, timeout_ms=5_000))


async def cpu_per_request(url: str | None, args: argparse.Namespace, cluster: bool) -> float:
    """Best-of-rounds CPU µs of this process per admit + settle."""
    store = store_for(url, cluster)
    traffic = Traffic(args.tenants, f"cpu{os.getpid()}")
    await open_accounts(store, traffic)
    await run_pairs(store, traffic, 2_000, args.concurrency)  # warm up
    best = float("inf")
    for _ in range(args.rounds):
        started = time.process_time()
        await run_pairs(store, traffic, args.requests, args.concurrency)
        best = min(best, (time.process_time() - started) / args.requests * 1e6)
    await store.aclose()
    return best


def info(client: redis.Redis, section: str) -> dict[str, Any]:
    return client.info(section)  # type: ignore[no-any-return]


def nodes_of(url: str, cluster: bool) -> list[redis.Redis]:
    if not cluster:
        return [redis.Redis.from_url(url)]
    with redis.cluster.RedisCluster.from_url(url) as probe:
        return [
            redis.Redis(host=node.host, port=node.port)
            for node in probe.get_nodes()
            if node.server_type == "primary"
        ]


def totals(nodes: list[redis.Redis]) -> dict[str, float]:
    """Commands by name, bytes in and out, and CPU seconds, summed over the nodes."""
    out: dict[str, float] = {"bytes_in": 0, "bytes_out": 0, "cpu_s": 0}
    for node in nodes:
        for name, stats in info(node, "commandstats").items():
            command = name.removeprefix("cmdstat_")
            out[f"cmd:{command}"] = out.get(f"cmd:{command}", 0) + stats["calls"]
            out[f"usec:{command}"] = out.get(f"usec:{command}", 0) + stats["usec"]
        stats = info(node, "stats")
        out["bytes_in"] += stats["total_net_input_bytes"]
        out["bytes_out"] += stats["total_net_output_bytes"]
        cpu = info(node, "cpu")
        out["cpu_s"] += cpu["used_cpu_user"] + cpu["used_cpu_sys"]
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def traffic_per_request(url: str, args: argparse.Namespace, cluster: bool) -> None:
    store = store_for(url, cluster)
    traffic = Traffic(args.tenants, f"traffic{os.getpid()}")
    await open_accounts(store, traffic)
    await run_pairs(store, traffic, 1_000, args.concurrency)  # scripts loaded, keys exist
    nodes = nodes_of(url, cluster)
    before = totals(nodes)
    await run_pairs(store, traffic, args.requests, args.concurrency)
    moved = delta(totals(nodes), before)
    await store.aclose()
    n = args.requests
    commands = {k[4:]: v / n for k, v in moved.items() if k.startswith("cmd:") and k != "cmd:info"}
    print(f"traffic: {n} requests (admit + settle), {len(nodes)} Redis node(s)")
    for name, per in sorted(commands.items()):
        usec = moved.get(f"usec:{name}", 0) / moved[f"cmd:{name}"]
        print(f"  {name:<10} {per:6.2f} per request   {usec:6.1f} µs each (Redis's own time)")
    print(f"  bytes to Redis   {moved.get('bytes_in', 0) / n:8.0f} per request")
    print(f"  bytes from Redis {moved.get('bytes_out', 0) / n:8.0f} per request")
    print(f"  Redis CPU        {moved.get('cpu_s', 0) / n * 1e6:8.1f} µs per request")


def ceiling_client(
    url: str, cluster: bool, start_at: float, seconds: float, concurrency: int, name: str
) -> int:
    """One client process: admit + settle from `start_at` (wall clock) for `seconds`."""

    async def main() -> int:
        store = store_for(url, cluster)
        traffic = Traffic(TENANTS_FOR_CEILING, name)
        await run_pairs(store, traffic, 200, concurrency)  # connected, scripts loaded
        await asyncio.sleep(max(start_at - time.time(), 0))
        until = time.monotonic() + seconds
        pairs = await run_pairs(store, traffic, 10**9, concurrency, until)
        await store.aclose()
        return pairs

    use_uvloop()
    return asyncio.run(main())


TENANTS_FOR_CEILING = 100


def ceiling(url: str, args: argparse.Namespace, cluster: bool) -> None:
    async def opened() -> None:
        store = store_for(url, cluster)
        await open_accounts(store, Traffic(TENANTS_FOR_CEILING, "open"))
        await run_pairs(store, Traffic(TENANTS_FOR_CEILING, "warm"), 500, 16)
        await store.aclose()

    asyncio.run(opened())
    nodes = nodes_of(url, cluster)
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 3  # every client connected and warm by then
    with context.Pool(args.processes) as pool:
        jobs = [
            pool.apply_async(
                ceiling_client,
                (url, cluster, start_at, args.seconds, args.concurrency, f"c{index}"),
            )
            for index in range(args.processes)
        ]
        time.sleep(max(start_at - time.time(), 0))
        before = totals(nodes)
        started = time.monotonic()
        pairs = sum(job.get() for job in jobs)
        wall = time.monotonic() - started
        moved = delta(totals(nodes), before)
    cpu_share = moved.get("cpu_s", 0) / wall
    rate = pairs / wall
    evalsha = moved.get("cmd:evalsha", 0)
    script_us = moved.get("usec:evalsha", 0) / evalsha if evalsha else 0
    print(
        f"ceiling: {args.processes} client processes x {args.concurrency} tasks,"
        f" {wall:.1f} s, {len(nodes)} Redis node(s)"
    )
    print(f"  admit+settle pairs   {rate:10.0f} per second")
    print(f"  redis-server CPU     {cpu_share * 100:10.1f} % of one core")
    print(f"  Redis CPU per pair   {moved.get('cpu_s', 0) / max(pairs, 1) * 1e6:10.1f} µs")
    print(f"  script time (Redis)  {script_us:10.1f} µs per EVALSHA (commandstats)")
    if cpu_share > 0:
        print(f"  one shard's ceiling  {rate / cpu_share:10.0f} pairs per second at 100 % CPU")


def use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["cpu", "traffic", "ceiling"])
    parser.add_argument("--redis-url", help="an existing Redis (default: start one)")
    parser.add_argument("--cluster-url", help="a node of an existing Redis Cluster")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    use_uvloop()
    with contextmanager_or(args) as (url, cluster):
        if args.only in (None, "cpu"):
            memory = asyncio.run(cpu_per_request(None, args, False))
            print(f"cpu: in-process store  {memory:7.1f} µs per request (admit + settle)")
            remote = asyncio.run(cpu_per_request(url, args, cluster))
            where = "Redis Cluster" if cluster else "Redis"
            print(f"cpu: {where} store{' ' * (14 - len(where))}{remote:7.1f} µs per request")
        if args.only in (None, "traffic"):
            asyncio.run(traffic_per_request(url, args, cluster))
        if args.only in (None, "ceiling"):
            ceiling(url, args, cluster)


@contextmanager
def contextmanager_or(args: argparse.Namespace) -> Iterator[tuple[str, bool]]:
    if args.cluster_url:
        yield args.cluster_url, True
    elif args.redis_url:
        yield args.redis_url, False
    else:
        with own_redis() as url:
            yield url, False


if __name__ == "__main__":
    main()
