"""What exposing Prometheus metrics costs the request path: the gateway with metrics on and off.

    python bench/metrics_overhead.py                  # 5 runs of 8 s per side and kind
    python bench/metrics_overhead.py --repeat 3 --seconds 5 --kinds json

What runs, all on 127.0.0.1 (a 2-core machine is assumed; see --proxy-core, --load-core):

- nginx (Debian package) as a fixed-response upstream (`bench/nginx.conf.template`): a
  chat.completion with usage, or a stream of 64 chunks and a usage chunk; on the load core.
- two gateways (`maas-gateway serve`, one worker each, pinned with taskset to the proxy core),
  identical but for `metrics: {enabled: true}` and `{enabled: false}`: key auth, validation,
  token counting, pricing, in-memory quotas and the SQLite ledger, as in production.
- wrk (one thread, on the load core) drives one gateway at a time with the same load; the
  runs alternate on/off (ABBA order) `--repeat` times per kind, after a warm-up of each.
- during every "on" run a scraper on the load core GETs /metrics from the metrics listener
  (`metrics.port`) once a second, as Prometheus would; its requests are not part of the
  figures.

It prints, per kind, the median requests/s, p50/p99 latency and gateway CPU time per
request of each side and the differences in percent; the target is "on" within 5% of "off".
CPU time per request is the steadiest of these on a machine shared with other work. It also
times, in this process, what metrics add per request (`Metrics.observe_request`) and what
rendering one scrape costs (`Metrics.render()` with series for 20 tenants x 3 models).
`--json FILE` keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = PROJECT_ROOT / "bench"
sys.path.insert(0, str(PROJECT_ROOT))

from bench.gateway_bench import (  # noqa: E402
    Processes,
    cpu_seconds,
    free_port,
    pinned,
    request_body,
    upstream_json_body,
    upstream_sse_body,
    wait_http,
)
from bench.loadgen import WrkResult, run_wrk, write_wrk_script  # noqa: E402
from billing.record import UsageRecord  # noqa: E402
from billing.usage import Usage  # noqa: E402
from gateway.auth import hash_key  # noqa: E402
from gateway.metrics import Metrics, MetricsConfig  # noqa: E402

API_KEY = "sk-bench-metrics-0000000000000000000000000000000000"
MODELS = {"json": "bench-json", "stream": "bench-stream"}
#: What Prometheus sends when it scrapes.
SCRAPE_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@dataclass
class Run:
    """One wrk run against one side."""

    kind: str
    metrics: bool
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    scrapes: int
    cpu_us_per_request: float
    """The gateway process's CPU time (user + system) per request, scrapes included."""


def start_nginx(procs: Processes, folder: Path, core: int) -> str:
    """The fixed-response upstream of bench/gateway_bench.py; returns its base URL."""
    port = free_port()
    folder.mkdir()
    bodies = folder / "bodies"
    bodies.mkdir()
    (bodies / "completion.json").write_text(upstream_json_body())
    (bodies / "stream.sse").write_text(upstream_sse_body())
    template = (BENCH_DIR / "nginx.conf.template").read_text()
    conf = template.replace("@DIR@", str(folder)).replace("@PORT@", str(port))
    (folder / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    command = [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", "stderr"]
    process = procs.start("nginx", pinned(core, command))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", process)
    return url


def gateway_config(
    nginx: str, folder: Path, metrics: bool, tokenizer_dir: Path | None
) -> dict[str, Any]:
    """The gateway in front of nginx; only `metrics.enabled` differs between the sides."""
    price = [
        {
            "effective_from": "2020-01-01",
            "prices": {"input": "0.15", "cached_input": "0.075", "output": "0.60"},
        }
    ]
    config: dict[str, Any] = {
        "server": {"admin_key_env": "MAAS_BENCH_ADMIN_KEY"},
        "providers": [
            {"name": "nginx-json", "type": "openai_compat", "base_url": nginx + "/json/v1"},
            {"name": "nginx-stream", "type": "openai_compat", "base_url": nginx + "/stream/v1"},
        ],
        "models": [
            {"name": "bench-json", "deployments": [{"provider": "nginx-json", "model": "up"}]},
            {"name": "bench-stream", "deployments": [{"provider": "nginx-stream", "model": "up"}]},
        ],
        "pricing": {"currency": "USD", "models": {name: price for name in MODELS.values()}},
        "quotas": {"backend": "memory"},
        "ledger": {"url": f"sqlite+aiosqlite:///{folder / 'ledger.db'}", "url_env": None},
        "metrics": {"enabled": metrics},
        "tenants": [
            {
                "id": "bench",
                "balance": "1000000",
                "limits": {"rpm": 10**9, "tpm": 10**12, "tokens_per_day": 10**14},
                "keys": [{"id": "bench-key", "hash": hash_key(API_KEY)}],
            }
        ],
    }
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        config["tokenizers"] = {"dir": str(tokenizer_dir)}
    return config


def start_gateway(
    procs: Processes, folder: Path, config: dict[str, Any], core: int
) -> tuple[str, int]:
    """`maas-gateway serve` with one worker, pinned; returns its URL and pid."""
    folder.mkdir()
    config["ledger"]["url"] = f"sqlite+aiosqlite:///{folder / 'ledger.db'}"
    metrics_port = free_port()
    config["metrics"]["port"] = metrics_port
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)]
    command += ["--port", str(port), "--workers", "1"]
    process = procs.start(folder.name, pinned(core, command), {"MAAS_LOG_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    METRICS_URLS[url] = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_http(url + "/healthz", process)
    return url, process.pid


#: Each gateway's metrics listener (`metrics.port`), by its public URL.
METRICS_URLS: dict[str, str] = {}


def check(url: str, metrics: bool) -> None:
    """Both kinds answer and are metered; /metrics shows the requests only when enabled."""
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for kind, model in MODELS.items():
            answer = client.post(
                "/v1/chat/completions", content=request_body(model, kind == "stream")
            )
            if answer.status_code != 200 or (
                kind == "json" and "x-maas-cost" not in answer.headers
            ):
                raise RuntimeError(f"{kind}: {answer.status_code} {answer.text[:300]}")
        exposed = "maas_requests_total{" in client.get(METRICS_URLS[url]).text
        if exposed != metrics:
            raise RuntimeError(f"metrics {'on' if metrics else 'off'} but exposed={exposed}")


class Scraper:
    """GETs the metrics listener's URL once a second on a thread, the way Prometheus does."""

    def __init__(self, url: str, interval_s: float = 1.0) -> None:
        self.url = url
        self.interval_s = interval_s
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=10, headers={"accept": SCRAPE_ACCEPT}) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.scrapes += ok
                self.failures += not ok
                next_at += self.interval_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))


def measure(
    args: argparse.Namespace,
    urls: dict[bool, str],
    pids: dict[bool, int],
    scripts: dict[str, Path],
) -> list[Run]:
    """Alternate the sides ABBA-wise, `repeat` times per kind, after a warm-up of each."""
    runs: list[Run] = []
    for kind in args.kinds:
        for url in urls.values():
            run_wrk(url, scripts[kind], args.connections, args.warmup_seconds, args.load_core)
        for repetition in range(args.repeat):
            order = (True, False) if repetition % 2 == 0 else (False, True)
            for metrics in order:
                scraper = Scraper(METRICS_URLS[urls[metrics]]) if metrics else None
                cpu0 = cpu_seconds(pids[metrics])
                if scraper is not None:
                    with scraper:
                        result = run_wrk(
                            urls[metrics], scripts[kind], args.connections, args.seconds,
                            args.load_core,
                        )  # fmt: skip
                else:
                    result = run_wrk(
                        urls[metrics], scripts[kind], args.connections, args.seconds, args.load_core
                    )
                cpu_s = cpu_seconds(pids[metrics]) - cpu0
                runs.append(to_run(kind, metrics, result, scraper, cpu_s))
                last = runs[-1]
                print(
                    f"  {kind:6} metrics {'on ' if metrics else 'off'}  {last.rps:8.0f} req/s  "
                    f"p50 {last.p50_ms:6.2f} ms  p99 {last.p99_ms:6.2f} ms  "
                    f"cpu {last.cpu_us_per_request:5.0f} us/req  errors {last.errors}  "
                    f"scrapes {last.scrapes}",
                    flush=True,
                )
    return runs


def to_run(
    kind: str, metrics: bool, result: WrkResult, scraper: Scraper | None, cpu_s: float
) -> Run:
    if scraper is not None and scraper.failures:
        raise RuntimeError(f"{scraper.failures} scrapes of /metrics failed")
    return Run(
        kind,
        metrics,
        result.rps,
        result.p50_ms,
        result.p99_ms,
        result.errors,
        result.requests,
        scraper.scrapes if scraper is not None else 0,
        cpu_s / result.requests * 1e6 if result.requests else float("nan"),
    )


def summary(runs: list[Run], kinds: list[str]) -> list[dict[str, Any]]:
    """Per kind: the medians of each side and the differences (on vs off) in percent."""
    rows = []
    for kind in kinds:
        side = {m: [r for r in runs if r.kind == kind and r.metrics is m] for m in (True, False)}
        med = {
            m: {
                "rps": statistics.median(r.rps for r in side[m]),
                "p50_ms": statistics.median(r.p50_ms for r in side[m]),
                "p99_ms": statistics.median(r.p99_ms for r in side[m]),
                "cpu_us": statistics.median(r.cpu_us_per_request for r in side[m]),
            }
            for m in (True, False)
        }
        rows.append(
            {
                "kind": kind,
                "on": med[True],
                "off": med[False],
                "rps_diff_pct": (med[True]["rps"] / med[False]["rps"] - 1) * 100,
                "p50_diff_pct": (med[True]["p50_ms"] / med[False]["p50_ms"] - 1) * 100,
                "cpu_diff_pct": (med[True]["cpu_us"] / med[False]["cpu_us"] - 1) * 100,
                "errors": sum(r.errors for r in side[True] + side[False]),
            }
        )
    return rows


def print_summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    print(f"\nmedians of {args.repeat} runs x {args.seconds:g} s, {args.connections} connections")
    print(
        "| kind | metrics on: req/s, p50, p99, CPU/req | metrics off: req/s, p50, p99, CPU/req "
        "| req/s | p50 | CPU/req |"
    )
    print("|---|---|---|---|---|---|")
    passed = True
    for row in rows:
        on, off = row["on"], row["off"]
        print(
            f"| {row['kind']} | {on['rps']:,.0f}, {on['p50_ms']:.2f} ms, {on['p99_ms']:.2f} ms, "
            f"{on['cpu_us']:.0f} µs | {off['rps']:,.0f}, {off['p50_ms']:.2f} ms, "
            f"{off['p99_ms']:.2f} ms, {off['cpu_us']:.0f} µs "
            f"| {row['rps_diff_pct']:+.1f}% | {row['p50_diff_pct']:+.1f}% "
            f"| {row['cpu_diff_pct']:+.1f}% |"
        )
        passed &= row["rps_diff_pct"] >= -5 and row["p50_diff_pct"] <= 5 and not row["errors"]
    print("PASS: metrics on within 5% of off" if passed else "FAIL: over 5% (or errors)")
    return passed


def micro(observations: int = 200_000) -> dict[str, float]:
    """CPU µs of one `observe_request` (flushes included) and ms of one `render()`."""
    metrics = Metrics(MetricsConfig())
    records = [
        UsageRecord(
            request_id=f"req-{i}",
            started_at=datetime.now(UTC),
            tenant_id=f"tenant-{i % 20}",
            key_id="key",
            model=("bench-json", "bench-stream", "bench-embed")[i % 3],
            endpoint="chat.completions",
            provider="nginx",
            deployment="nginx/up",
            usage=Usage(uncached_input=31, output=64),
            cost_nanos=43_050,
            compute_cost_nanos=20_000,
            stream=i % 2 == 0,
            ttft_ms=2.0,
            duration_ms=4.0,
        )
        for i in range(600)
    ]
    for rec in records:  # every series exists before timing
        metrics.observe_request(rec, overhead_s=0.0004, upstream_s=0.003)
    started = time.process_time()
    for i in range(observations):
        metrics.observe_request(records[i % 600], overhead_s=0.0004, upstream_s=0.003)
        if i % 1000 == 999:
            metrics.flush()  # what the timer does in the server
    metrics.flush()
    observe_us = (time.process_time() - started) / observations * 1e6
    started = time.process_time()
    for _ in range(20):
        body, _ = metrics.render()
    render_ms = (time.process_time() - started) / 20 * 1000
    return {"observe_us": observe_us, "render_ms": render_ms, "exposition_bytes": len(body)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Gateway throughput with metrics on vs off.")
    parser.add_argument("--seconds", type=float, default=8.0, help="each wrk run (default 8)")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=5, help="runs per side and kind")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument("--kinds", default="json,stream", help="json,stream (default both)")
    parser.add_argument("--proxy-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument("--tokenizer-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args(argv)
    args.kinds = [kind for kind in args.kinds.split(",") if kind]
    for program in ("wrk", "nginx", "taskset"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            print(f"metrics_overhead: {program} is needed", file=sys.stderr)
            return 2
    os.sched_setaffinity(0, {args.load_core})
    tokenizer_dir = args.tokenizer_dir or PROJECT_ROOT.parent / "shared" / "tokenizers"
    tmp = Path(tempfile.mkdtemp(prefix="maas-metrics-bench-"))
    procs = Processes(tmp)
    try:
        nginx = start_nginx(procs, tmp / "nginx", args.load_core)
        urls: dict[bool, str] = {}
        pids: dict[bool, int] = {}
        for metrics in (True, False):
            config = gateway_config(nginx, tmp, metrics, tokenizer_dir)
            folder = tmp / f"gateway-metrics-{'on' if metrics else 'off'}"
            urls[metrics], pids[metrics] = start_gateway(procs, folder, config, args.proxy_core)
            check(urls[metrics], metrics)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        scripts = {
            kind: write_wrk_script(
                tmp / f"{kind}.lua",
                "/v1/chat/completions",
                [request_body(MODELS[kind], kind == "stream")],
                headers,
            )
            for kind in args.kinds
        }
        runs = measure(args, urls, pids, scripts)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = summary(runs, args.kinds)
    passed = print_summary(rows, args)
    costs = micro()
    print(
        f"in-process: observe_request {costs['observe_us']:.1f} µs CPU per request; one "
        f"render() {costs['render_ms']:.1f} ms CPU for {costs['exposition_bytes']:,} bytes"
    )
    if args.json:
        data = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": rows}
        data["micro"] = costs
        data["runs"] = [asdict(run) for run in runs]
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
