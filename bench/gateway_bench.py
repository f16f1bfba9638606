"""Gateway benchmark: the fully metered gateway against a bare relay, in one run.

    python bench/gateway_bench.py                      # full run, ~5 minutes + the soak
    python bench/gateway_bench.py --quick              # shorter runs, no soak
    python bench/gateway_bench.py --soak-seconds 600   # with a 10-minute memory soak
    python bench/gateway_bench.py --profile 20         # also sample the gateway with py-spy

What runs, all on 127.0.0.1 (a 2-core machine is assumed; cores are set by --proxy-core
and --load-core):

- nginx (Debian package) as the upstream, answering POST /json/v1/chat/completions with a
  fixed chat.completion (64 tokens, with usage) and POST /stream/v1/chat/completions with a
  fixed stream of 64 chunks, a usage chunk and [DONE]; on the load core.
- redis-server (no persistence), the gateway's quota store; on the load core.
- the proxy under test, pinned to the proxy core with one worker: first the bare relay
  (`bench/bare_relay.py`: same Litestar + httpx-over-aiohttp + uvicorn stack, no
  metering), then the gateway (`maas-gateway serve`: key auth, validation, token
  counting, pricing, quotas in Redis, SQLite ledger, Prometheus metrics).
- wrk, one thread on the load core, for RPS and p50/p99 latency at concurrency 1, 16 and
  64, for JSON and for 64-chunk streams. nginx is measured directly too, which shows the
  load generator and upstream are not what limits the proxies.
- paced: `maas-gateway simulate` (20 ms between chunks, 64 chunks, no jitter) on the load
  core, and `bench/loadgen.py paced` timing every chunk of 64 concurrent streams, direct
  and through each proxy: added TTFT and added inter-chunk gap.
- soak: steady mixed load on the gateway for --soak-seconds; resident memory (VmRSS) after
  a warm-up and at the end.

It prints one table with the ratios gateway/bare and PASS/FAIL per target, and writes the
raw figures as JSON with --json FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = PROJECT_ROOT / "bench"
sys.path.insert(0, str(PROJECT_ROOT))

from bench.loadgen import WrkResult, parse_wrk, run_wrk, write_wrk_script, wrk_command  # noqa: E402
from gateway.auth import hash_key  # noqa: E402

API_KEY = "sk-bench-000000000000000000000000000000000000000000"
CONCURRENCIES = (1, 16, 64)
KINDS = ("json", "stream")
CHUNKS = 64
PACED_FIRST_TOKEN_MS, PACED_CHUNK_GAP_MS = 5, 20
PACED_STREAM_S = (PACED_FIRST_TOKEN_MS + CHUNKS * PACED_CHUNK_GAP_MS) / 1000
"""How long one paced stream lasts: the steady paced load starts its streams this far apart
in all (one every PACED_STREAM_S / 64 seconds)."""
PROMPT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Explain in a few sentences why a gateway should be fast."},
]
WORDS = (
    "A gateway sits in the path of every request, so each microsecond it spends is paid on "
    "every token by every caller; keep the hot path short, avoid allocations, batch the "
    "writes, and measure before and after each change with the same load on the same core"
).split()


# --- upstream bodies ---------------------------------------------------------------------------


def completion_tokens() -> list[str]:
    return [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(CHUNKS)]


def upstream_json_body() -> str:
    usage = {"prompt_tokens": 31, "completion_tokens": CHUNKS, "total_tokens": 31 + CHUNKS}
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764000000,
        "model": "upstream-json",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(completion_tokens())},
                "finish_reason": "length",
            }
        ],
        "usage": usage,
    }
    return json.dumps(body, separators=(",", ":"))


def upstream_sse_body() -> str:
    events = []
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764000000}
    for i, token in enumerate(completion_tokens()):
        delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
        finish = "length" if i == CHUNKS - 1 else None
        chunk = {
            **base,
            "model": "upstream-stream",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        events.append("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n")
    usage = {"prompt_tokens": 31, "completion_tokens": CHUNKS, "total_tokens": 31 + CHUNKS}
    final = {**base, "model": "upstream-stream", "choices": [], "usage": usage}
    events.append("data: " + json.dumps(final, separators=(",", ":")) + "\n\n")
    events.append("data: [DONE]\n\n")
    return "".join(events)


def request_body(model: str, stream: bool) -> str:
    body: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": CHUNKS}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":"))


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(core: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *command]


class Processes:
    """Child processes with logs in one folder; all are stopped on exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, command: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "ab")
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def wait_redis(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise TimeoutError("redis-server did not answer")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_times(core: int) -> tuple[float, float]:
    """(busy, total) seconds of one core so far, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(v) for v in line.split()[1:]]
            idle = ticks[3] + ticks[4]
            total = sum(ticks[:8])
            hz = os.sysconf("SC_CLK_TCK")
            return (total - idle) / hz, total / hz
    raise RuntimeError(f"no cpu{core} in /proc/stat")


def core_busy(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Seconds the core was busy between two `core_times` readings."""
    return after[0] - before[0]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Target:
    """A server under load and the request paths and headers that reach it."""

    name: str
    base_url: str
    json_path: str
    stream_path: str
    json_model: str
    stream_model: str
    headers: dict[str, str] = field(default_factory=dict)
    pid: int | None = None


@dataclass
class Point:
    target: str
    kind: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    cpu_us_per_request: float | None
    other_load_pct: float = 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.ledger_file = (args.ledger_path or tmp / "ledger.db").resolve()  # e.g. 10M rows
        self.started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())  # as the ledger stores
        self.procs = Processes(tmp)
        self.proxy_core = args.proxy_core
        self.load_core = args.load_core
        self.points: list[Point] = []
        self.paced_runs: dict[str, list[dict[str, Any]]] = {}
        self.soak: dict[str, Any] | None = None
        self.profile: dict[str, Any] | None = None
        self.notes: list[str] = []

    # upstreams

    def start_nginx(self) -> str:
        port = free_port()
        folder = self.tmp / "nginx"
        folder.mkdir()
        template = (BENCH_DIR / "nginx.conf.template").read_text()
        bodies = folder / "bodies"
        bodies.mkdir()
        (bodies / "completion.json").write_text(upstream_json_body())
        (bodies / "stream.sse").write_text(upstream_sse_body())
        conf = template.replace("@DIR@", str(folder)).replace("@PORT@", str(port))
        (folder / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        command = [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", "stderr"]
        process = self.procs.start("nginx", pinned(self.load_core, command))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", process)
        return url

    def start_redis(self) -> str:
        port = free_port()
        folder = self.tmp / "redis"
        folder.mkdir()
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", str(folder), "--daemonize", "no"]
        process = self.procs.start("redis", pinned(self.load_core, command))
        wait_redis(port, process)
        return f"redis://127.0.0.1:{port}/0"

    def start_simulator(self) -> str:
        port = free_port()
        config = {
            "sim-paced": {
                "ttft_overhead_ms": PACED_FIRST_TOKEN_MS,
                "prefill_ms_per_token": 0,
                "itl_ms": PACED_CHUNK_GAP_MS,
                "jitter": 0,
                "capacity": 4096,
                "slowdown_at_capacity": 1,
                "max_queue": 4096,
                "output": {"distribution": "fixed", "mean": CHUNKS, "min": CHUNKS, "max": CHUNKS},
                "seed": 1,
            }
        }
        path = self.tmp / "simulator.yaml"
        path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "gateway.cli", "simulate", "--config", str(path)]
        command += ["--port", str(port)]
        process = self.procs.start("simulator", pinned(self.load_core, command))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", process)
        return url

    # proxies

    def start_bare(self, json_url: str, stream_url: str) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        command = [sys.executable, str(BENCH_DIR / "bare_relay.py"), "--port", str(port)]
        command += ["--json-url", json_url, "--stream-url", stream_url]
        command += ["--answers", self.args.bare_answers]
        process = self.procs.start("bare", pinned(self.proxy_core, command))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", process)
        return url, process

    def gateway_config(self, nginx: str, redis_url: str, simulator: str) -> dict[str, Any]:
        models = {
            "bench-json": ("nginx-json", "upstream-json"),
            "bench-stream": ("nginx-stream", "upstream-stream"),
            "bench-paced": ("simulator", "sim-paced"),
        }
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
                {
                    "name": "nginx-stream",
                    "type": "openai_compat",
                    "base_url": nginx + "/stream/v1",
                },
                {"name": "simulator", "type": "openai_compat", "base_url": simulator + "/v1"},
            ],
            "models": [
                {"name": name, "deployments": [{"provider": provider, "model": upstream}]}
                for name, (provider, upstream) in models.items()
            ],
            "pricing": {"currency": "USD", "models": {name: price for name in models}},
            "quotas": {"backend": "redis", "redis_url": redis_url, "redis_url_env": None},
            "ledger": {"url": f"sqlite+aiosqlite:///{self.ledger_file}", "url_env": None},
            "metrics": {"enabled": True, "port": 0},  # the listener on any free port
            "tenants": [
                {
                    "id": "bench",
                    "name": "Benchmark tenant",
                    "limits": {"rpm": 10**9, "tpm": 10**12, "tokens_per_day": 10**14},
                    "keys": [{"id": "bench-key", "hash": hash_key(API_KEY)}],
                }
            ],
        }
        tokenizers = self.args.tokenizer_dir or PROJECT_ROOT.parent / "shared" / "tokenizers"
        if tokenizers.is_dir():
            config["tokenizers"] = {"dir": str(tokenizers)}
        return config

    def start_gateway(self, config: dict[str, Any]) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        path = self.tmp / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)]
        command += ["--port", str(port)]
        env = {"MAAS_LOG_LEVEL": "WARNING"}
        process = self.procs.start("gateway", pinned(self.proxy_core, command), env)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", process)
        return url, process

    # measuring

    def check(self, target: Target, metered: bool) -> None:
        """One JSON and one stream request answer correctly (and are metered, if metered)."""
        with httpx.Client(base_url=target.base_url, headers=target.headers, timeout=10) as c:
            answer = c.post(
                target.json_path,
                content=request_body(target.json_model, False),
                headers={"content-type": "application/json"},
            )
            if answer.status_code != 200 or answer.json()["usage"]["completion_tokens"] != CHUNKS:
                raise RuntimeError(f"{target.name} JSON: {answer.status_code} {answer.text[:300]}")
            if metered and "x-maas-cost" not in answer.headers:
                raise RuntimeError(f"{target.name}: no x-maas-cost header: not metered?")
            answer = c.post(
                target.stream_path,
                content=request_body(target.stream_model, True),
                headers={"content-type": "application/json"},
            )
            text = answer.text
            events = text.count("data: {")
            if answer.status_code != 200 or not text.endswith("data: [DONE]\n\n"):
                raise RuntimeError(f"{target.name} stream: {answer.status_code} {text[:300]}")
            if events != CHUNKS + 1 or (metered and '"maas":' not in text):
                raise RuntimeError(f"{target.name} stream: {events} events, unexpected")

    def script(self, target: Target, kind: str) -> Path:
        stream = kind == "stream"
        path = self.tmp / f"wrk-{target.name.replace(' ', '_')}-{kind}.lua"
        return write_wrk_script(
            path,
            target.stream_path if stream else target.json_path,
            [request_body(target.stream_model if stream else target.json_model, stream)],
            {"Content-Type": "application/json", **target.headers},
        )

    def measure(self, targets: list[Target]) -> None:
        """Every point, the targets interleaved, `--repeat` times; all runs are kept."""
        seconds = self.args.seconds
        wanted = self.args.targets.split(",") if self.args.targets else None
        targets = [t for t in targets if wanted is None or t.name.split()[0] in wanted]
        kinds = self.args.kinds.split(",") if self.args.kinds else KINDS
        concurrencies = (
            [int(c) for c in self.args.concurrency.split(",")]
            if self.args.concurrency
            else CONCURRENCIES
        )
        for kind in kinds:
            scripts = {t.name: self.script(t, kind) for t in targets}
            for t in targets:
                run_wrk(t.base_url, scripts[t.name], 16, self.args.warmup_seconds, self.load_core)
            for concurrency in concurrencies:
                for _ in range(self.args.repeat):
                    for t in targets:
                        cpu0 = cpu_seconds(t.pid) if t.pid else None
                        core0 = core_times(self.proxy_core)
                        result = run_wrk(
                            t.base_url, scripts[t.name], concurrency, seconds, self.load_core
                        )
                        busy = core_busy(core0, core_times(self.proxy_core))
                        cpu = cpu_seconds(t.pid) - cpu0 if t.pid and cpu0 is not None else None
                        self.add_point(t, kind, concurrency, result, cpu, busy)

    def add_point(
        self,
        target: Target,
        kind: str,
        concurrency: int,
        result: WrkResult,
        cpu_s: float | None,
        core_busy_s: float,
    ) -> None:
        per_request = (
            cpu_s / result.requests * 1e6 if cpu_s is not None and result.requests else None
        )
        other = (core_busy_s - (cpu_s or 0)) / result.seconds * 100 if result.seconds else 0
        point = Point(
            target.name,
            kind,
            concurrency,
            result.rps,
            result.p50_ms,
            result.p99_ms,
            result.errors,
            result.requests,
            per_request,
            max(0.0, other),
        )
        self.points.append(point)
        cpu = f", {per_request:5.0f} µs CPU/req" if per_request is not None else ""
        print(
            f"  {target.name:12} {kind:6} c={concurrency:<3} {result.rps:8.0f}/s "
            f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
            f"errors {result.errors}{cpu}, other load on core {self.proxy_core}: {other:3.0f}%",
            flush=True,
        )
        if result.errors:
            self.notes.append(f"{target.name} {kind} c={concurrency}: {result.errors} errors")

    def run_paced(
        self,
        name: str,
        url: str,
        model: str,
        headers: dict[str, str],
        herd: bool = False,
        pid: int | None = None,
    ) -> None:
        """64 concurrent paced streams: started evenly over one stream's length (a steady
        load, the target), or all at once (`herd`, shown for information). With the
        proxy's `pid`, its CPU per stream too: each chunk is then its own upstream read and
        its own write to the client, as at a real model's pace."""
        body = self.tmp / f"paced-{model}.json"
        body.write_text(request_body(model, True))
        stagger = 0.0 if herd else PACED_STREAM_S
        name = f"{name} (herd)" if herd else name
        command = [sys.executable, str(BENCH_DIR / "loadgen.py"), "paced", "--url", url]
        concurrency = str(self.args.paced_concurrency)
        command += [
            "--body-file",
            str(body),
            "--concurrency",
            concurrency,
            "--stagger-s",
            str(stagger),
        ]
        command += ["--streams-per-worker", str(self.args.paced_streams), "--deadline-s", "120"]
        for key, value in headers.items():
            command += ["--header", f"{key}:{value}"]
        cpu0 = cpu_seconds(pid) if pid else None
        done = subprocess.run(
            pinned(self.load_core, command),
            capture_output=True,
            text=True,
            timeout=200,
            check=False,
            cwd=PROJECT_ROOT,
        )
        cpu = cpu_seconds(pid) - cpu0 if pid and cpu0 is not None else None
        for line in done.stdout.splitlines():
            if line.startswith("PACED_RESULT "):
                result = json.loads(line[len("PACED_RESULT ") :])
                if cpu is not None and result["streams"]:
                    result["cpu_us_per_stream"] = cpu / result["streams"] * 1e6
                self.paced_runs.setdefault(name, []).append(result)
                print(
                    f"  {name:14} streams {result['streams']:4}  "
                    f"TTFT p50 {result['ttft_p50_ms']:6.2f} p99 {result['ttft_p99_ms']:6.2f} ms  "
                    f"gap p50 {result['gap_p50_ms']:6.2f} p99 {result['gap_p99_ms']:6.2f} ms  "
                    f"errors {result['errors']}"
                    + (
                        f", {result['cpu_us_per_stream']:.0f} µs CPU/stream"
                        if "cpu_us_per_stream" in result
                        else ""
                    ),
                    flush=True,
                )
                if result["errors"]:
                    self.notes.append(f"paced {name}: {result['first_error']}")
                return
        raise RuntimeError(f"paced client printed no result:\n{done.stdout}\n{done.stderr}")

    def run_soak(self, target: Target, pid: int) -> None:
        seconds = self.args.soak_seconds
        warmup = min(60.0, max(10.0, seconds / 10))
        path = self.tmp / "wrk-soak.lua"
        script = write_wrk_script(
            path,
            target.json_path,
            [request_body(target.json_model, False), request_body(target.stream_model, True)],
            {"Content-Type": "application/json", **target.headers},
        )
        print(f"  warm-up {warmup:.0f} s, then {seconds} s at concurrency 16", flush=True)
        run_wrk(target.base_url, script, 16, warmup, self.load_core)
        start_rss = rss_kib(pid)
        samples = [(0.0, start_rss)]
        command = wrk_command(target.base_url, script, 16, seconds, self.load_core)
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        while load.poll() is None and time.monotonic() - started < seconds + 60:
            time.sleep(min(10.0, max(1.0, seconds / 20)))
            samples.append((time.monotonic() - started, rss_kib(pid)))
        stdout, stderr = load.communicate(timeout=60)
        result = parse_wrk(stdout, stderr)
        end_rss = rss_kib(pid)
        self.soak = {
            "seconds": seconds,
            "warmup_seconds": warmup,
            "requests": result.requests,
            "rps": result.rps,
            "errors": result.errors,
            "rss_start_kib": start_rss,
            "rss_end_kib": end_rss,
            "rss_max_kib": max(r for _, r in samples),
            "growth_pct": (end_rss - start_rss) / start_rss * 100,
            "samples": samples,
        }
        print(
            f"  {result.requests} requests ({result.rps:.0f}/s, {result.errors} errors); RSS "
            f"{start_rss / 1024:.1f} -> {end_rss / 1024:.1f} MiB "
            f"({self.soak['growth_pct']:+.1f}%), max {self.soak['rss_max_kib'] / 1024:.1f} MiB",
            flush=True,
        )

    def run_profile(self, target: Target, pid: int) -> None:
        """Sample the gateway with py-spy under load (JSON at concurrency 64 by default)."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        seconds = self.args.profile
        out = self.tmp / "profile.txt"
        script = self.script(target, self.args.profile_kind)
        load = subprocess.Popen(
            wrk_command(
                target.base_url, script, self.args.profile_concurrency, seconds + 4, self.load_core
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        cpu0 = cpu_seconds(pid)
        spy = subprocess.run(
            pinned(
                self.load_core,
                [
                    *(py_spy, "record", "--pid", str(pid), "--duration", str(seconds)),
                    *("--rate", "500", "--format", "raw", "--output", str(out), "--nonblocking"),
                ],
            ),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
        cpu = cpu_seconds(pid) - cpu0
        stdout, stderr = load.communicate(timeout=seconds + 60)
        result = parse_wrk(stdout, stderr)
        if not out.exists():
            self.notes.append(f"py-spy failed: {spy.stderr.strip()[-300:]}")
            return
        from bench.profile_breakdown import breakdown, load_collapsed

        requests_in_window = result.rps * seconds
        us_per_request = cpu / requests_in_window * 1e6 if requests_in_window else 0.0
        steps = breakdown(load_collapsed(out))
        kept = self.args.json.with_suffix(".collapsed.txt") if self.args.json else None
        if kept is not None:
            shutil.copy(out, kept)
        self.profile = {
            "seconds": seconds,
            "rps": result.rps,
            "cpu_us_per_request": us_per_request,
            "steps": steps,
            "collapsed_file": str(kept) if kept else None,
        }
        print(f"  {result.rps:.0f}/s under py-spy, {us_per_request:.0f} µs CPU per request")
        for step, share in steps:
            print(f"    {step:44} {share * 100:5.1f}%  {share * us_per_request:6.0f} µs")

    # the whole run

    def run(self) -> None:
        print(f"upstreams: nginx, redis-server, simulator on core {self.load_core}", flush=True)
        nginx = self.start_nginx()
        redis_url = self.start_redis()
        simulator = self.start_simulator()
        sim_chat = simulator + "/v1/chat/completions"
        direct = Target(
            "nginx direct",
            nginx,
            "/json/v1/chat/completions",
            "/stream/v1/chat/completions",
            "upstream-json",
            "upstream-stream",
        )
        bare_url, bare = self.start_bare(
            nginx + "/json/v1/chat/completions", nginx + "/stream/v1/chat/completions"
        )
        bare_target = Target(
            "bare relay",
            bare_url,
            "/v1/chat/completions",
            "/v1/chat/completions",
            "upstream-json",
            "upstream-stream",
            pid=bare.pid,
        )
        paced_bare_url, paced_bare = self.start_bare(sim_chat, sim_chat)
        gw_url, gw = self.start_gateway(self.gateway_config(nginx, redis_url, simulator))
        auth = {"Authorization": f"Bearer {API_KEY}"}
        gw_target = Target(
            "gateway",
            gw_url,
            "/v1/chat/completions",
            "/v1/chat/completions",
            "bench-json",
            "bench-stream",
            auth,
            pid=gw.pid,
        )
        self.check(direct, metered=False)
        self.check(bare_target, metered=False)
        self.check(gw_target, metered=True)
        print(
            f"wrk on core {self.load_core}; bare relay and gateway (full metering) on core "
            f"{self.proxy_core}, interleaved, {self.args.repeat} run(s) of {self.args.seconds:g} s "
            "per point:",
            flush=True,
        )
        if not self.args.profile_only:
            self.measure([direct, bare_target, gw_target])
        if self.args.profile:
            print(
                f"profile: py-spy for {self.args.profile} s, {self.args.profile_kind} at "
                f"concurrency {self.args.profile_concurrency}:"
            )
            profiled = bare_target if self.args.profile_target == "bare" else gw_target
            self.run_profile(profiled, profiled.pid or 0)

        if self.args.profile_only or self.args.no_paced:
            self.procs.stop(gw)
            return
        print(
            "paced upstream (simulator, 20 ms between chunks), "
            f"{self.args.paced_concurrency} concurrent streams:"
        )
        for herd in (False, True):
            for _ in range(self.args.repeat):
                self.run_paced("direct", sim_chat, "sim-paced", {}, herd)
                bare_chat = paced_bare_url + "/v1/chat/completions"
                self.run_paced("bare relay", bare_chat, "sim-paced", {}, herd, paced_bare.pid)
                self.run_paced(
                    "gateway", gw_url + "/v1/chat/completions", "bench-paced", auth, herd, gw.pid
                )
        if self.args.soak_seconds > 0:
            print("memory soak (gateway, alternating JSON and stream requests):", flush=True)
            self.run_soak(gw_target, gw.pid)
        self.procs.stop(gw)
        self.count_ledger_rows()

    def count_ledger_rows(self) -> None:
        try:  # this run's rows (a --ledger-path file may hold others)
            with contextlib.closing(sqlite3.connect(self.ledger_file)) as db:
                rows = db.execute(
                    "select count(*) from ledger_entries where tenant_id = 'bench'"
                    " and started_at >= ?",
                    (self.started,),
                ).fetchone()[0]
        except sqlite3.Error as exc:
            self.notes.append(f"could not count ledger rows: {exc}")
            return
        requests = sum(p.requests for p in self.points if p.target == "gateway")
        requests += sum(r["streams"] for r in self.paced_runs.get("gateway", []))
        print(f"ledger rows written: {rows} (load generators counted {requests} completed)")


# --- the report ------------------------------------------------------------------------------


def _point(points: list[Point], target: str, kind: str, concurrency: int) -> Point | None:
    """The run with the highest RPS of one target at one point (best of the repeats)."""
    runs = [p for p in points if (p.target, p.kind, p.concurrency) == (target, kind, concurrency)]
    return max(runs, key=lambda p: p.rps) if runs else None


def best_paced(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each figure's best (lowest) value over the repeats of one paced target."""
    if not runs:
        return None
    best = dict(runs[0])
    for key in ("ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms", "cpu_us_per_stream"):
        if all(key in r for r in runs):
            best[key] = min(r[key] for r in runs)
    best["streams"] = sum(r["streams"] for r in runs)
    best["errors"] = sum(r["errors"] for r in runs)
    return best


def report(bench: Bench) -> list[tuple[str, str, str, bool | None]]:
    points = bench.points
    print()
    print(
        "| kind | conc. | nginx direct RPS | p50 ms | p99 ms | bare relay RPS | p50 ms | p99 ms "
        "| gateway RPS | p50 ms | p99 ms | gateway/bare RPS | CPU µs/req bare | gateway "
        "| gateway/bare per CPU-s | other load on core |"
    )
    print("|---" * 16 + "|")
    for kind in KINDS:
        for c in CONCURRENCIES:
            cells = [kind, str(c)]
            for target in ("nginx direct", "bare relay", "gateway"):
                p = _point(points, target, kind, c)
                cells += [f"{p.rps:,.0f}", f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}"] if p else ["-"] * 3
            bare, gw = _point(points, "bare relay", kind, c), _point(points, "gateway", kind, c)
            cells.append(f"{gw.rps / bare.rps:.2f}" if gw and bare and bare.rps else "-")
            for p in (bare, gw):
                cells.append(f"{p.cpu_us_per_request:.0f}" if p and p.cpu_us_per_request else "-")
            if gw and bare and gw.cpu_us_per_request and bare.cpu_us_per_request:
                cells.append(f"{bare.cpu_us_per_request / gw.cpu_us_per_request:.2f}")
            else:
                cells.append("-")
            loads = [p.other_load_pct for p in (bare, gw) if p]
            cells.append(f"{max(loads):.0f}%" if loads else "-")
            print("| " + " | ".join(cells) + " |")
    print()
    paced = {name: best_paced(runs) for name, runs in bench.paced_runs.items()}
    direct = paced.get("direct")
    for suffix in ("", " (herd)"):
        base = paced.get("direct" + suffix)
        if base is None:
            continue
        print(
            f"paced, {bench.args.paced_concurrency} streams"
            + (" started at once" if suffix else ", steady")
            + "   TTFT p50  TTFT p99   gap p50   gap p99  (ms; added vs direct)"
        )
        for name in ("direct", "bare relay", "gateway"):
            r = paced.get(name + suffix)
            if r is None:
                continue
            added = ""
            if name != "direct":
                added = (
                    f"  (+{r['ttft_p50_ms'] - base['ttft_p50_ms']:.2f} / "
                    f"+{r['ttft_p99_ms'] - base['ttft_p99_ms']:.2f} TTFT, "
                    f"+{r['gap_p99_ms'] - base['gap_p99_ms']:.2f} gap p99)"
                )
            cpu = r.get("cpu_us_per_stream")
            print(
                f"  {name:16} {r['ttft_p50_ms']:8.2f}  {r['ttft_p99_ms']:8.2f}  "
                f"{r['gap_p50_ms']:8.2f}  {r['gap_p99_ms']:8.2f}{added}"
                + (f"  {cpu:.0f} µs CPU/stream" if cpu is not None else "")
            )
        print()
    paced_cpu = {
        n: (paced.get(n) or {}).get("cpu_us_per_stream") for n in ("bare relay", "gateway")
    }
    for name, cpu in paced_cpu.items():
        one = _point(points, name, "json", 64)
        json_cpu = one.cpu_us_per_request if one is not None else None
        if cpu is not None and json_cpu is not None:
            print(
                f"paced {name}: {(cpu - json_cpu) / CHUNKS:.1f} µs CPU per further chunk "
                f"(({cpu:.0f} µs per paced stream - {json_cpu:.0f} per JSON request at "
                f"concurrency 64) / {CHUNKS}), each chunk its own read and write"
            )

    checks: list[tuple[str, str, str, bool | None]] = []

    def add_check(name: str, value: float | None, goal: str, ok: bool | None, unit: str) -> None:
        shown = f"{value:.2f} {unit}" if value is not None else "not measured"
        checks.append((name, shown, goal, ok if value is not None else None))

    gw64 = _point(points, "gateway", "json", 64)
    bare64 = _point(points, "bare relay", "json", 64)
    gw1 = _point(points, "gateway", "json", 1)
    nginx1 = _point(points, "nginx direct", "json", 1)
    bare1 = _point(points, "bare relay", "json", 1)
    gws16 = _point(points, "gateway", "stream", 16)
    value = gw64.rps if gw64 else None
    add_check(
        "JSON RPS, concurrency 64", value, ">= 1000", value is not None and value >= 1000, "/s"
    )
    value = gw64.rps / bare64.rps if gw64 and bare64 else None
    add_check(
        "JSON RPS gateway/bare, conc. 64", value, ">= 0.75", bool(value and value >= 0.75), ""
    )
    if gw1 and nginx1:
        added50, added99 = gw1.p50_ms - nginx1.p50_ms, gw1.p99_ms - nginx1.p99_ms
        add_check("JSON added latency p50, conc. 1", added50, "< 1.5 ms", added50 < 1.5, "ms")
        add_check("JSON added latency p99, conc. 1", added99, "< 3 ms", added99 < 3, "ms")
    if gw1 and bare1:
        checks.append(
            (
                "  (gateway minus bare relay, p50/p99)",
                f"{gw1.p50_ms - bare1.p50_ms:.2f} / {gw1.p99_ms - bare1.p99_ms:.2f} ms",
                "info",
                None,
            )
        )
    if gw64 and bare64:
        _per_cpu_s(checks, "  (JSON per CPU-second, conc. 64)", gw64, bare64)
        _paired(checks, "  (JSON, median of paired runs)", points, "json", 64)
    value = gws16.rps if gws16 else None
    add_check("64-chunk streams/s, conc. 16", value, ">= 400", bool(value and value >= 400), "/s")
    bares16 = _point(points, "bare relay", "stream", 16)
    value = gws16.rps / bares16.rps if gws16 and bares16 else None
    add_check("streams gateway/bare, conc. 16", value, ">= 0.65", bool(value and value >= 0.65), "")
    if gws16 and bares16:
        _per_cpu_s(checks, "  (streams per CPU-second, conc. 16)", gws16, bares16)
        _paired(checks, "  (streams, median of paired runs)", points, "stream", 16)
    gw_paced = paced.get("gateway")
    if direct and gw_paced and bench.args.paced_concurrency == 64:  # the targets' load
        ttft = gw_paced["ttft_p99_ms"] - direct["ttft_p99_ms"]
        gap = gw_paced["gap_p99_ms"] - direct["gap_p99_ms"]
        add_check("paced added TTFT p99, 64 streams", ttft, "< 3 ms", ttft < 3, "ms")
        add_check("paced added gap p99, 64 streams", gap, "< 1 ms", gap < 1, "ms")
    if bench.soak:
        growth = bench.soak["growth_pct"]
        label = f"RSS growth, {bench.soak['seconds']} s soak"
        add_check(label, growth, "< 10 % (600 s)", growth < 10, "%")
    else:
        checks.append(("RSS growth, soak", "not run", "< 10 % (600 s)", None))

    print(f"{'target':40} {'measured':>16}  {'goal':>15}  result")
    for name, shown, goal, ok in checks:
        verdict = "" if goal == "info" else ("PASS" if ok else "FAIL" if ok is False else "-")
        print(f"{name:40} {shown:>16}  {goal:>15}  {verdict}")
    for note in bench.notes:
        print("note:", note)
    return checks


def _per_cpu_s(
    checks: list[tuple[str, str, str, bool | None]], name: str, gw: Point, bare: Point
) -> None:
    """The same ratio from CPU time (bare µs per request over the gateway's): the figure that
    holds when other load shares the proxy's core."""
    if gw.cpu_us_per_request and bare.cpu_us_per_request:
        ratio = bare.cpu_us_per_request / gw.cpu_us_per_request
        checks.append((name, f"{ratio:.2f}", "info", None))


def _paired(
    checks: list[tuple[str, str, str, bool | None]],
    name: str,
    points: list[Point],
    kind: str,
    concurrency: int,
) -> None:
    """The ratio of each gateway run to the bare relay's run just before it (the repeats
    interleave them): their median and range. Load from elsewhere that slows one target's
    best run moves the best-of ratio; it moves the median of pairs much less."""

    def runs(target: str) -> list[Point]:
        return [
            p for p in points if (p.target, p.kind, p.concurrency) == (target, kind, concurrency)
        ]

    pairs = zip(runs("bare relay"), runs("gateway"), strict=False)
    ratios = sorted(gw.rps / bare.rps for bare, gw in pairs if bare.rps)
    if len(ratios) > 1:
        shown = f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
        checks.append((name, shown, "info", None))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("litestar", "httpx", "httpx-aiohttp", "aiohttp", "uvicorn", "uvloop", "redis"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    try:
        version("hiredis")
        found["hiredis"] = version("hiredis")
    except PackageNotFoundError:
        found["hiredis"] = "not installed"
    for name, command in (("nginx", ["nginx", "-v"]), ("redis-server", ["redis-server", "-v"])):
        try:
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            found[name] = (out.stdout + out.stderr).strip().splitlines()[0]
        except OSError:
            found[name] = "-"
    found["wrk"] = "wrk 4" if shutil.which("wrk") else "-"
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    found["cpu"] = f"{os.cpu_count()} x {cpu}"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark the fully metered gateway against a bare relay."
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, fewer paced streams")
    parser.add_argument("--seconds", type=float, default=10.0, help="each wrk run (default 10)")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per point, best kept (default 3)"
    )
    parser.add_argument("--paced-streams", type=int, default=6, help="streams per paced worker")
    parser.add_argument(
        "--paced-concurrency",
        type=int,
        default=64,
        help="concurrent paced streams (default 64; the paced targets are for 64)",
    )
    parser.add_argument("--soak-seconds", type=int, default=0, help="memory soak (0: none)")
    parser.add_argument("--profile", type=int, default=0, help="py-spy seconds (0: none)")
    parser.add_argument("--profile-concurrency", type=int, default=64, help="wrk connections")
    parser.add_argument("--profile-kind", choices=KINDS, default="json")
    parser.add_argument(
        "--profile-target",
        choices=("gateway", "bare"),
        default="gateway",
        help="which proxy py-spy samples (bare: the bare relay, to compare step by step)",
    )
    parser.add_argument(
        "--bare-answers",
        choices=("litestar", "gateway"),
        default="litestar",
        help="the bare relay answers with Litestar's Response and Stream (the baseline), "
        "or with the gateway's JSONAnswer and StreamAnswer and reads bodies as its provider does",
    )
    parser.add_argument("--targets", help="subset, e.g. bare,gateway (default: all)")
    parser.add_argument("--kinds", help="subset of json,stream (default: both)")
    parser.add_argument("--concurrency", help="subset, e.g. 64 (default: 1,16,64)")
    parser.add_argument("--no-paced", action="store_true", help="skip the paced streams")
    parser.add_argument(
        "--profile-only", action="store_true", help="only the py-spy profile (with --profile)"
    )
    parser.add_argument("--proxy-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument("--tokenizer-dir", type=Path, default=None)
    parser.add_argument(
        "--ledger-path",
        type=Path,
        default=None,
        help="the gateway's SQLite ledger file (default: a fresh one in the temp folder)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write raw figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    parser.add_argument("--report", type=Path, help="print the report of a --json file and exit")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        again = Bench(args, Path(tempfile.gettempdir()))
        again.points = [Point(**p) for p in saved["points"]]
        again.paced_runs = saved["paced"]
        again.soak = saved["soak"]
        report(again)
        return 0
    if args.quick:
        args.seconds, args.warmup_seconds, args.paced_streams, args.repeat = 3.0, 1.0, 2, 1
    for program in ("wrk", "nginx", "redis-server", "taskset"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            print(
                f"gateway_bench: {program} is needed (Debian: apt-get install wrk "
                "nginx-light redis-server util-linux)",
                file=sys.stderr,
            )
            return 2
    os.sched_setaffinity(0, {args.load_core})
    found = versions()
    print(" ".join(f"{k}={v}" for k, v in found.items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="maas-bench-"))
    bench = Bench(args, tmp)
    started = time.monotonic()
    try:
        bench.run()
    finally:
        bench.procs.stop_all()
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    checks = report(bench)
    print(f"\ntotal time {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "versions": found,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "points": [asdict(p) for p in bench.points],
                    "paced": bench.paced_runs,
                    "soak": bench.soak,
                    "profile": bench.profile,
                    "checks": checks,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
