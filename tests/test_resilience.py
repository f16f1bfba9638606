"""Routing and resilience end to end, over real sockets: failover without double billing, the
circuit breaker around a real upstream process that is killed and restarted, an upstream
killed mid-stream, a client that disconnects mid-stream, and the per-deployment connect
timeout. Callers use the official OpenAI SDK with its own retries off; upstreams are
`maas-gateway simulate` processes reached through the OpenAI-compatible provider."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from billing.store.engine import sqlite_file
from gateway.config import parse_settings
from gateway.tokens import TokenCounter, TokenizerConfig
from tests.harness import ACME_KEY, PROJECT_ROOT, RunningGateway, base_config, free_port

pytestmark = pytest.mark.timeout(120)

MODEL = "gpt-4o-mini"
INPUT_NANOS, OUTPUT_NANOS = 150, 600  # gpt-4o-mini's test prices per token

FAST: dict[str, Any] = {
    "time_scale": 0,
    "seed": 11,
    "output": {"distribution": "uniform", "mean": 20, "sd": 8, "min": 5, "max": 40},
}
SLOW: dict[str, Any] = {
    "time_scale": 1,
    "ttft_overhead_ms": 5,
    "prefill_ms_per_token": 0,
    "itl_ms": 40,
    "jitter": 0,
    "output": {"distribution": "fixed", "mean": 400, "sd": 0, "max": 1000},
}
"""One token every 40 ms for 16 s: a stream that is always still running when it is cut."""


# -- upstream processes -------------------------------------------------------------------

SIMULATE = [sys.executable, "-m", "gateway.cli", "simulate"]


class Simulator:
    """`maas-gateway simulate` as its own process on a fixed port: killed and restarted at will."""

    def __init__(self, tmp: Path, name: str, settings: dict[str, Any]) -> None:
        self.tmp = tmp
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._write_config(settings)

    def _write_config(self, settings: dict[str, Any]) -> None:
        (self.tmp / f"{self.name}.yaml").write_text(yaml.safe_dump({"sim-mini": settings}))

    def _spawn(self) -> subprocess.Popen[bytes]:
        config = str(self.tmp / f"{self.name}.yaml")
        with open(self.tmp / f"{self.name}.log", "ab") as log:
            return subprocess.Popen(
                [*SIMULATE, "--config", config, "--port", str(self.port)],
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self, settings: dict[str, Any] | None = None) -> None:
        if settings is not None:
            self._write_config(settings)
        self.process = self._spawn()
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(timeout=1) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"simulator {self.name} exited with {self.process.returncode}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.url + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise TimeoutError(f"simulator {self.name} did not start")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-request, without closing anything itself."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def metric(self, http: httpx.AsyncClient, sample: str, **labels: str) -> float:
        """One sample of the upstream's own /metrics (0 when absent)."""
        text = (await http.get(self.url + "/metrics")).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0


@contextlib.asynccontextmanager
async def simulator(tmp: Path, name: str, settings: dict[str, Any]) -> AsyncIterator[Simulator]:
    sim = Simulator(tmp, name, settings)
    await sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def upstream(name: str, sim: Simulator, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "openai_compat", "base_url": sim.url + "/v1", **fields}


def deployment(provider: str, **fields: Any) -> dict[str, Any]:
    return {"name": provider, "provider": provider, "model": "sim-mini", **fields}


def gateway_settings(
    tmp: Path,
    tokenizer_dir: Path,
    providers: list[dict[str, Any]],
    deployments: list[dict[str, Any]],
    breaker: dict[str, Any] | None = None,
    **routing: Any,
) -> Any:
    """The test configuration with `MODEL` served by `deployments` (other models unchanged)."""
    config = base_config(tmp, tokenizer_dir)
    others = [m for m in config["models"] if m["name"] != MODEL]
    config["providers"] = [*config["providers"], *providers]
    config["models"] = [{"name": MODEL, "deployments": deployments}, *others]
    config["routing"] = {
        "retry": {"max_attempts": 3, "backoff_base_s": 0.01, "budget_min_per_s": 100},
        "breaker": breaker or {},
        **routing,
    }
    return parse_settings(config)


# -- what the caller and the ledger see ---------------------------------------------------


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path) -> TokenCounter:
    return TokenCounter(TokenizerConfig(dir=tokenizer_dir))


def sdk(gw: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ACME_KEY, max_retries=0, timeout=30)


def chat(i: int) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"Question number {i}: what is a token?"}]


def prompt_tokens(counter: TokenCounter, i: int) -> int:
    return counter.count_chat(MODEL, [dict(message) for message in chat(i)])


def nanos(amount: str) -> int:
    return int(Decimal(amount) * 1_000_000_000)


async def ledger_rows(gw: RunningGateway) -> dict[str, dict[str, Any]]:
    """Every ledger row by request id, after flushing what is queued."""
    await gw.gateway.ledger.flush()
    path = sqlite_file(gw.settings.ledger.resolved_url())
    assert path is not None
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM ledger_entries")]
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows)
    return by_id


async def ask(client: openai.AsyncOpenAI, i: int, *, stream: bool) -> dict[str, Any]:
    """One request; what the caller was told: request id, usage and cost."""
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=chat(i),
            max_tokens=40,
        )
        completion = raw.parse()
        assert completion.usage is not None
        return {
            "id": raw.headers["x-request-id"],
            "prompt": completion.usage.prompt_tokens,
            "output": completion.usage.completion_tokens,
            "cost": nanos(raw.headers["x-maas-cost"]),
        }
    raw_stream = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=chat(i),
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in raw_stream.parse()]
    usage = chunks[-1].usage
    assert usage is not None and any(c.choices for c in chunks)
    return {
        "id": raw_stream.headers["x-request-id"],
        "prompt": usage.prompt_tokens,
        "output": usage.completion_tokens,
        "cost": nanos((usage.model_extra or {})["maas"]["cost"]),
    }


async def health(gw: RunningGateway, name: str) -> dict[str, Any]:
    async with gw.admin() as admin:
        response = await admin.get("/admin/deployments")
    response.raise_for_status()
    return next(d for d in response.json()["data"] if d["name"] == name)


async def state(gw: RunningGateway, name: str) -> str:
    return str((await health(gw, name))["state"])


# -- failover without double billing ------------------------------------------------------


async def test_failover_before_first_byte_bills_each_request_once(
    tmp_path: Path, tokenizer_dir: Path, counter: TokenCounter
) -> None:
    """Two deployments, one failing 30% of requests with HTTP 500: the caller sees no error,
    and the ledger has one row per request, costed at exactly what the caller was told."""
    flaky_settings = {**FAST, "errors": {"rate_500": 0.3}}
    async with simulator(tmp_path, "flaky", flaky_settings) as flaky:
        settings = gateway_settings(
            tmp_path,
            tokenizer_dir,
            [upstream("flaky", flaky), {"name": "steady", "type": "simulated", **FAST}],
            [deployment("flaky"), deployment("steady")],
            breaker={"consecutive_failures": 8, "failure_rate": 0.9, "min_requests": 50},
        )
        async with RunningGateway(settings) as gw:
            client = sdk(gw)
            gate = asyncio.Semaphore(24)

            async def one(i: int) -> dict[str, Any]:
                async with gate:
                    return await ask(client, i, stream=i % 2 == 1)

            told = await asyncio.gather(*(one(i) for i in range(240)))  # any error fails here
            async with httpx.AsyncClient() as http:
                failed_at_flaky = await flaky.metric(
                    http, "maas_simulator_requests_total", outcome="server_error"
                )
                served_by_flaky = await flaky.metric(
                    http, "maas_simulator_requests_total", outcome="success"
                )
            rows = await ledger_rows(gw)

    assert sorted(rows) == sorted(t["id"] for t in told), "not exactly one row per request"
    prompts = {prompt_tokens(counter, i) for i in range(240)}
    for t in told:
        row = rows[t["id"]]
        assert row["status_code"] == 200 and row["stream_cut_by"] is None
        assert t["prompt"] in prompts  # one prompt, not one per attempt
        assert (row["uncached_input"] + row["cached_input"], row["output"]) == (
            t["prompt"],
            t["output"],
        )
        assert row["cost_nanos"] == t["cost"]
        assert row["cost_nanos"] == t["prompt"] * INPUT_NANOS + t["output"] * OUTPUT_NANOS
    retried = [r for r in rows.values() if r["attempts"] > 1]
    assert len(retried) >= 20, "the flaky deployment should have failed some first attempts"
    # A retry goes to the deployment not yet tried, which is the one that served it.
    assert {(r["attempts"], r["deployment"], r["provider"]) for r in retried} == {
        (2, "steady", "steady")
    }
    # The upstream's own counts agree: every failed attempt is one retried row, every
    # success at the flaky upstream one row that names it.
    assert failed_at_flaky == len(retried)
    assert served_by_flaky == sum(1 for r in rows.values() if r["deployment"] == "flaky")
    assert served_by_flaky > 40


# -- the breaker around a real upstream process -------------------------------------------


async def test_breaker_opens_on_killed_upstream_and_closes_when_it_returns(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """SIGKILL one upstream: callers keep succeeding on the other deployment while its
    breaker opens; a half-open probe to the still-dead upstream opens it again; once the
    process is back on the same port, a probe closes it and it serves traffic again."""
    open_s = 2.0
    async with simulator(tmp_path, "primary", FAST) as primary:
        settings = gateway_settings(
            tmp_path,
            tokenizer_dir,
            [upstream("primary", primary), {"name": "spare", "type": "simulated", **FAST}],
            [deployment("primary"), deployment("spare")],
            breaker={"consecutive_failures": 3, "min_requests": 1000, "open_s": open_s},
        )
        async with RunningGateway(settings) as gw:
            client = sdk(gw)
            numbers = itertools.count()
            warm = [await ask(client, next(numbers), stream=False) for _ in range(10)]
            assert await state(gw, "primary") == "closed"

            primary.kill()
            while_failing: list[dict[str, Any]] = []
            while await state(gw, "primary") != "open":
                assert len(while_failing) < 60, "the breaker never opened"
                while_failing.append(await ask(client, next(numbers), stream=False))

            while_open = [await ask(client, next(numbers), stream=i % 2 == 0) for i in range(10)]
            report = await health(gw, "primary")
            assert report["state"] == "open" and report["open_remaining_s"] > 0
            assert report["healthy"] is False

            await asyncio.sleep(open_s)
            assert await state(gw, "primary") == "half_open"
            probing_dead: list[dict[str, Any]] = []
            while await state(gw, "primary") != "open":  # a failed probe opens it again
                assert len(probing_dead) < 60, "no probe reached the dead upstream"
                probing_dead.append(await ask(client, next(numbers), stream=False))

            await primary.start()  # back on the same port
            await asyncio.sleep(open_s)
            assert await state(gw, "primary") == "half_open"
            probing_live: list[dict[str, Any]] = []
            while await state(gw, "primary") != "closed":
                assert len(probing_live) < 60, "no probe reached the restarted upstream"
                probing_live.append(await ask(client, next(numbers), stream=False))
            after = [await ask(client, next(numbers), stream=i % 2 == 0) for i in range(20)]
            rows = await ledger_rows(gw)

    asked = warm + while_failing + while_open + probing_dead + probing_live + after
    assert sorted(rows) == sorted(t["id"] for t in asked)
    assert all(r["status_code"] == 200 for r in rows.values())
    for t in asked:
        assert rows[t["id"]]["cost_nanos"] == t["cost"]
    served = {t["id"]: (rows[t["id"]]["deployment"], rows[t["id"]]["attempts"]) for t in asked}
    # While dead: requests that tried it failed over to the spare; none was served by it.
    assert all(served[t["id"]][0] == "spare" for t in while_failing + probing_dead)
    assert sum(1 for t in while_failing if served[t["id"]][1] == 2) == 3  # = consecutive_failures
    assert served[probing_dead[-1]["id"]] == ("spare", 2)  # the probe that failed over
    # While open: no request even tried it.
    assert {served[t["id"]] for t in while_open} == {("spare", 1)}
    # The probe that closed the circuit was served by the restarted upstream, first try.
    assert served[probing_live[-1]["id"]] == ("primary", 1)
    assert any(served[t["id"]][0] == "primary" for t in after)
    assert all(served[t["id"]][1] == 1 for t in probing_live + after)


async def wait_for_state(
    gw: RunningGateway, name: str, wanted: str, within_s: float
) -> dict[str, Any]:
    """Poll GET /admin/deployments (sending no other traffic) until `name` is `wanted`."""
    deadline = time.monotonic() + within_s
    while True:
        report = await health(gw, name)
        if report["state"] == wanted:
            return report
        assert time.monotonic() < deadline, f"{name} is {report['state']}, not {wanted}"
        await asyncio.sleep(0.05)


async def test_active_health_checks_open_and_close_the_breaker_without_traffic(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """With `health_check_interval_s` set and no caller at all, the gateway probes its
    upstream: killing it opens the breaker, restarting it closes the breaker again, and the
    probes are never billed to anyone."""
    interval, open_s = 0.2, 1.0
    async with simulator(tmp_path, "watched", FAST) as watched, httpx.AsyncClient() as http:
        settings = gateway_settings(
            tmp_path,
            tokenizer_dir,
            [upstream("watched", watched)],
            [deployment("watched")],
            breaker={"consecutive_failures": 2, "min_requests": 1000, "open_s": open_s},
            health_check_interval_s=interval,
        )
        async with RunningGateway(settings) as gw:
            await asyncio.sleep(5 * interval)
            probed = await watched.metric(http, "maas_simulator_requests_total", outcome="success")
            assert probed >= 2, "no probe reached the upstream"
            report = await health(gw, "watched")
            assert report["state"] == "closed" and report["recent_requests"] >= 2

            watched.kill()
            killed = time.monotonic()
            report = await wait_for_state(gw, "watched", "open", within_s=10 * interval)
            assert report["healthy"] is False and report["open_remaining_s"] > 0
            opened_after = time.monotonic() - killed

            await watched.start()  # back on the same port
            restarted = time.monotonic()
            report = await wait_for_state(gw, "watched", "closed", within_s=open_s + 20 * interval)
            assert report["healthy"] is True
            closed_after = time.monotonic() - restarted
            # The model serves again at once.
            told = await ask(sdk(gw), 1, stream=False)
            rows = await ledger_rows(gw)
        stopped_at = await watched.metric(http, "maas_simulator_requests_total", outcome="success")
        await asyncio.sleep(3 * interval)
        assert (
            await watched.metric(http, "maas_simulator_requests_total", outcome="success")
            == stopped_at
        ), "probes went on after the gateway stopped"

    print(f"breaker opened {opened_after:.2f}s after the kill, closed {closed_after:.2f}s after")
    assert list(rows) == [told["id"]], "health probes must not reach the ledger"
    assert rows[told["id"]]["deployment"] == "watched"


# -- streams cut mid-way ------------------------------------------------------------------


async def read_content(stream: openai.AsyncStream[Any], count: int, texts: list[str]) -> None:
    """Read until `count` chunks with text have arrived, collecting the text."""
    seen = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
            seen += 1
            if seen == count:
                return


async def test_upstream_killed_mid_stream_bills_only_what_reached_the_caller(
    tmp_path: Path, tokenizer_dir: Path, counter: TokenCounter
) -> None:
    async with simulator(tmp_path, "doomed", SLOW) as doomed:
        settings = gateway_settings(
            tmp_path, tokenizer_dir, [upstream("doomed", doomed)], [deployment("doomed")]
        )
        async with RunningGateway(settings) as gw:
            raw = await sdk(gw).chat.completions.with_raw_response.create(
                model=MODEL,
                messages=chat(1),
                max_tokens=400,
                stream=True,
                stream_options={"include_usage": True},
            )
            stream = raw.parse()
            texts: list[str] = []
            await read_content(stream, 5, texts)
            doomed.kill()
            with pytest.raises(openai.APIError) as caught:
                async for chunk in stream:  # the rest of what was relayed, then the error
                    assert chunk.usage is None, "a cut stream must not end with usage"
                    if chunk.choices and chunk.choices[0].delta.content:
                        texts.append(chunk.choices[0].delta.content)
            rows = await ledger_rows(gw)

    assert "doomed" in str(caught.value.message)
    row = rows[raw.headers["x-request-id"]]
    delivered = counter.count_text(MODEL, "".join(texts))
    assert 5 <= delivered < 400
    assert row["stream_cut_by"] == "upstream" and row["status_code"] == 502
    assert row["stream"] == 1 and row["deployment"] == "doomed"
    # Only what reached the caller: the delivered output, not the prompt (docs/billing.md).
    assert (row["uncached_input"], row["cached_input"], row["output"]) == (0, 0, delivered)
    assert row["cost_nanos"] == delivered * OUTPUT_NANOS


async def test_client_disconnect_stops_upstream_within_100ms(
    tmp_path: Path, tokenizer_dir: Path, counter: TokenCounter
) -> None:
    """The caller reads a few chunks and closes the connection: the upstream's running
    request count drops within 100 ms, and the caller pays for the prompt and what it got."""
    trials = 5
    stop_times: list[float] = []
    asked: list[tuple[str, list[str], int]] = []
    async with simulator(tmp_path, "slow", SLOW) as slow:
        settings = gateway_settings(
            tmp_path, tokenizer_dir, [upstream("slow", slow)], [deployment("slow")]
        )
        async with RunningGateway(settings) as gw, httpx.AsyncClient() as http:
            client = sdk(gw)
            for i in range(trials):
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL,
                    messages=chat(i),
                    max_tokens=400,
                    stream=True,
                )
                stream = raw.parse()
                texts: list[str] = []
                await read_content(stream, 3 + i, texts)
                assert await slow.metric(http, "vllm:num_requests_running") == 1
                closed_at = time.perf_counter()
                await stream.close()
                while await slow.metric(http, "vllm:num_requests_running") != 0:
                    assert time.perf_counter() - closed_at < 2, "the upstream kept running"
                stop_times.append(time.perf_counter() - closed_at)
                asked.append((raw.headers["x-request-id"], texts, i))
            cancelled = await slow.metric(
                http, "maas_simulator_requests_total", outcome="cancelled"
            )
            rows = await ledger_rows(gw)

    print("disconnect-to-upstream-stop ms:", ", ".join(f"{s * 1000:.1f}" for s in stop_times))
    assert max(stop_times) < 0.1, stop_times
    assert cancelled == trials
    for request_id, texts, i in asked:
        row = rows[request_id]
        delivered = counter.count_text(MODEL, "".join(texts))
        prompt = prompt_tokens(counter, i)
        assert row["stream_cut_by"] == "client" and row["status_code"] == 499
        assert (row["uncached_input"], row["output"]) == (prompt, delivered)
        assert row["cost_nanos"] == prompt * INPUT_NANOS + delivered * OUTPUT_NANOS


# -- the per-deployment connect timeout ---------------------------------------------------


@contextlib.contextmanager
def unaccepting_port() -> Iterator[int]:
    """A port whose accept queue is full, so that new connections hang in the handshake."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in [*fillers, server]:
            sock.close()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_deployment_connect_timeout_fails_over_quickly(
    tmp_path: Path, tokenizer_dir: Path, transport: str
) -> None:
    """A deployment whose upstream never completes the TCP handshake gives up after its own
    `timeouts.connect_s` (not the provider's 5 s default), and the request fails over."""
    with unaccepting_port() as port:
        hanging = {
            "name": "hanging",
            "type": "openai_compat",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "connect_timeout_s": 5,
            "transport": transport,
        }
        settings = gateway_settings(
            tmp_path,
            tokenizer_dir,
            [hanging, {"name": "backup", "type": "simulated", **FAST}],
            [
                deployment("hanging", priority=0, timeouts={"connect_s": 0.3, "ttft_s": 10}),
                deployment("backup", priority=1),
            ],
        )
        async with RunningGateway(settings) as gw:
            started = time.perf_counter()
            told = await ask(sdk(gw), 1, stream=True)
            elapsed = time.perf_counter() - started
            rows = await ledger_rows(gw)
    row = rows[told["id"]]
    assert (row["deployment"], row["attempts"], row["status_code"]) == ("backup", 2, 200)
    assert 0.3 <= elapsed < 2, elapsed
