"""The usage ledger and invoices end to end, through real gateways over real sockets.

A mixed run (chat, completions and embeddings; streams with and without usage; cached input
from a real OpenAI-compatible upstream process; injected upstream failures and cuts; client
disconnects; two prompt-length tiers, an off-peak window and a discounted plan) is checked
request by request and in sum: what each caller was told (or, for an interrupted stream, what
the billing policy says it owes for what it received) = the ledger rows = the invoice lines,
to the token and the nano-unit, with reconciliation reporting no difference through the admin
API and the command line. Invoices come out of both as JSON, CSV and HTML.

Then a `maas-gateway serve` process under concurrent load is killed with SIGKILL, on SQLite
and on PostgreSQL: after a restart every response that reached its client completely is in
the ledger exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from billing.money import to_nanos
from billing.record import GATEWAY_DIED
from billing.store.schema import ENTRIES, ROLLUPS
from gateway.config import parse_settings
from gateway.tokens import TokenCounter, TokenizerConfig
from tests.harness import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    PROJECT_ROOT,
    RunningGateway,
    base_config,
    free_port,
    gateway_process,
    wait_for_http,
)

pytestmark = pytest.mark.timeout(120)

KEYS = {"acme": ACME_KEY, "globex": GLOBEX_KEY}
PLAN_MULTIPLIER = {"acme": Decimal(1), "globex": Decimal("0.75")}  # globex is on "partner"
TAX_RATE = {"acme": Decimal(0), "globex": Decimal("0.13")}
OFF_PEAK_MULTIPLIER = Decimal("0.5")  # 00:00-08:00 UTC

# List prices per million tokens (input, cached input, output) by the largest prompt priced.
# Large enough that invoice lines are whole cents and more, with fractions to round; some
# land exactly on half a nano-unit per token after a multiplier (rule 1 rounds half up).
LIST_PRICES: dict[str, list[tuple[int, tuple[str, str, str]]]] = {
    "gpt-4o-mini": [
        (50, ("150.0025", "75.002", "600.006")),
        (100_000, ("300.004", "150.0025", "1200.01")),
    ],
    "gpt-4o-flaky": [(100_000, ("2.50", "1.25", "10"))],
    "gpt-4o-slow": [(100_000, ("0.15", "0.075", "0.60"))],  # x0.75: 112.5 nanos -> 113
    "gpt-4o-cached": [(100_000, ("1250", "312.5005", "5000"))],
    "text-embedding-3-small": [(100_000, ("20.02", "20.02", "0"))],
}


def unit_prices(model: str, prompt_tokens: int, off_peak: bool, tenant: str) -> tuple[int, ...]:
    """The nano-unit prices per token docs/billing.md rule 1 gives, worked out independently."""
    prices = next(p for bound, p in LIST_PRICES[model] if prompt_tokens <= bound)
    scale = PLAN_MULTIPLIER[tenant] * (OFF_PEAK_MULTIPLIER if off_peak else 1)
    return tuple(int((Decimal(p) * scale * 1000).to_integral_value(ROUND_HALF_UP)) for p in prices)


def pricing() -> dict[str, Any]:
    models: dict[str, Any] = {}
    for model, tiers in LIST_PRICES.items():
        sets = [
            {"input": i, "cached_input": c, "output": o, "max_prompt_tokens": bound}
            for bound, (i, c, o) in tiers
        ]
        if len(sets) == 1:
            del sets[0]["max_prompt_tokens"]
            models[model] = [{"effective_from": "2020-01-01", "prices": sets[0]}]
        else:
            models[model] = [{"effective_from": "2020-01-01", "tiers": sets}]
    return {
        "currency": "USD",
        "models": models,
        "off_peak": [
            {"timezone": "UTC", "start": "00:00", "end": "08:00", "multiplier": "0.5"},
        ],
        "plans": {"partner": {"multiplier": "0.75"}},
    }


def previous_month() -> tuple[str, date]:
    """The month before this one (it has ended, so it can be finalised), and its 1st."""
    first = datetime.now(UTC).date().replace(day=1) - timedelta(days=1)
    first = first.replace(day=1)
    return f"{first:%Y-%m}", first


# -- a small OpenAI-compatible upstream that reports cached input ----------------------------

CACHED_UPSTREAM = textwrap.dedent(
    """
    import json, sys
    import uvicorn

    PIECES = ["Cached", " answers", " are", " cheaper", " to", " serve", "."]

    async def send_json(send, body):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] != "/v1/chat/completions":
            await send_json(send, {"status": "ok"})
            return
        request = json.loads(raw)
        words = sum(len(str(m.get("content") or "").split()) for m in request["messages"])
        prompt = 10 + 2 * words
        pieces = PIECES[: 3 + words % 5]
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(pieces),
            "total_tokens": prompt + len(pieces),
            "prompt_tokens_details": {"cached_tokens": prompt // 2 + words % 3},
        }
        base = {"id": "chatcmpl-cached", "created": 0, "model": request["model"]}
        if not request.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            await send_json(send, {**base, "object": "chat.completion", "choices": [choice],
                                   "usage": usage})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        events = []
        for piece in pieces:
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            events.append({**base, "object": "chat.completion.chunk", "choices": [choice]})
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage})
        for event in events:
            data = b"data: " + json.dumps(event).encode() + b"\\n\\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\\n\\n"})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                lifespan="off")
    """
)


@contextlib.contextmanager
def cached_upstream(tmp: Path) -> Iterator[str]:
    """The upstream above as its own process; yields its API root."""
    port = free_port()
    with open(tmp / "cached-upstream.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", CACHED_UPSTREAM, str(port)],
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process=process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(10)


def mixed_config(tmp: Path, tokenizer_dir: Path, cached_url: str) -> dict[str, Any]:
    output = {"distribution": "uniform", "mean": 20, "sd": 8, "min": 5, "max": 40}
    fast: dict[str, Any] = {"time_scale": 0, "output": output}
    providers = [
        {"name": "sim", "type": "simulated", "seed": 7, **fast},
        {
            "name": "flaky",
            "type": "simulated",
            "seed": 3,
            **fast,
            "errors": {"rate_500": 0.25, "rate_cut": 0.35},
        },
        {
            "name": "slow",
            "type": "simulated",
            "seed": 5,
            "time_scale": 1,
            "ttft_overhead_ms": 5,
            "prefill_ms_per_token": 0,
            "itl_ms": 1000,  # a caller hangs up long before the next token, even under load
            "jitter": 0,
            "output": {"distribution": "fixed", "mean": 300, "sd": 0, "max": 1000},
        },
        {"name": "cache", "type": "openai_compat", "base_url": cached_url},
    ]

    def model(name: str, provider: str, upstream: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "deployments": [{"provider": provider, "model": upstream}], **extra}

    models = [
        model("gpt-4o-mini", "sim", "sim-mini"),
        model("gpt-4o-flaky", "flaky", "sim-flaky"),
        model("gpt-4o-slow", "slow", "sim-slow"),
        model("gpt-4o-cached", "cache", "cached-upstream"),
        model("text-embedding-3-small", "sim", "sim-embed", kind="embedding"),
    ]
    config = base_config(
        tmp,
        tokenizer_dir,
        providers=providers,
        models=models,
        routing={
            "retry": {"max_attempts": 1},  # injected failures reach the caller
            "breaker": {"consecutive_failures": 1000, "min_requests": 1000},
        },
    )
    config["pricing"] = pricing()  # replaced whole: merging would keep the default models
    config["tenants"][0]["keys"] = config["tenants"][0]["keys"][:1]
    config["tenants"][1].update(plan="partner", tax_rate="0.13")
    return config


# -- what callers were told -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tokens:
    uncached: int = 0
    cached: int = 0
    output: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(
            self.uncached + other.uncached, self.cached + other.cached, self.output + other.output
        )


@dataclass(slots=True)
class Seen:
    """One request as its caller saw it, and what it owes by docs/billing.md."""

    request_id: str
    tenant: str
    model: str
    off_peak: bool
    prompt_tokens: int  # counted offline, as the gateway counts it: picks the tier
    status: int
    owed: Tokens  # the usage the caller was told, or the policy's for what it received
    told_cost: int | None  # nano-units, when the response said what it cost
    told_usage: bool = False
    cut_by: str | None = None
    delivered_tokens: int | None = None  # of the streamed text, counted offline

    @property
    def cost(self) -> int:
        """What the owed tokens cost at the prices worked out independently."""
        i, c, o = unit_prices(self.model, self.prompt_tokens, self.off_peak, self.tenant)
        return self.owed.uncached * i + self.owed.cached * c + self.owed.output * o


def told_tokens(usage: dict[str, Any]) -> Tokens:
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    prompt = int(usage["prompt_tokens"])
    return Tokens(prompt - cached, cached, int(usage.get("completion_tokens") or 0))


@dataclass(slots=True)
class Caller:
    """Sends requests as a tenant and writes down what came back."""

    http: httpx.AsyncClient
    counter: TokenCounter
    off_peak: bool
    seen: list[Seen] = field(default_factory=list)

    async def call(
        self,
        tenant: str,
        path: str,
        body: dict[str, Any],
        *,
        disconnect_after: int | None = None,
    ) -> None:
        model = body["model"]
        if "messages" in body:
            prompt = self.counter.count_chat(model, body["messages"])
        elif "prompt" in body:
            prompt = self.counter.count_prompt(model, body["prompt"])
        else:
            prompt = self.counter.count_input(model, body["input"])
        seen = Seen("", tenant, model, self.off_peak, prompt, 0, Tokens(), None)
        headers = {"authorization": f"Bearer {KEYS[tenant]}"}
        if disconnect_after is not None:
            await self._hang_up(seen, path, body, headers, disconnect_after)
        elif body.get("stream"):
            await self._stream(seen, path, body, headers)
        else:
            response = await self.http.post(path, json=body, headers=headers)
            seen.request_id = response.headers["x-request-id"]
            seen.status = response.status_code
            if response.status_code == 200:
                usage = response.json()["usage"]
                seen.owed = told_tokens(usage)
                seen.told_usage = True
                seen.told_cost = to_nanos(usage["maas"]["cost"])
                h = response.headers
                assert to_nanos(h["x-maas-cost"]) == seen.told_cost
                assert int(h["x-maas-prompt-tokens"]) == seen.owed.uncached + seen.owed.cached
                assert int(h["x-maas-cached-tokens"]) == seen.owed.cached
                assert int(h["x-maas-completion-tokens"]) == seen.owed.output
        self.seen.append(seen)

    async def _stream(
        self, seen: Seen, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> None:
        async with self.http.stream("POST", path, json=body, headers=headers) as response:
            seen.request_id = response.headers["x-request-id"]
            seen.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                return  # refused or failed before any output: nothing is owed
            events = [line[6:] async for line in response.aiter_lines() if line[:6] == "data: "]
        self._settle(seen, events)

    async def _hang_up(
        self, seen: Seen, path: str, body: dict[str, Any], headers: dict[str, str], after: int
    ) -> None:
        """Read a stream over a plain socket until `after` events have come, then hang up.

        The gateway runs in this event loop, so nothing can be sent between taking in what
        has arrived and closing: the events taken in are exactly what the caller received.
        """
        loop = asyncio.get_running_loop()
        payload = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head.append(f"content-length: {len(payload)}")
        port = self.http.base_url.port
        assert port is not None
        received = b""
        with socket.socket() as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, "\r\n".join(head).encode() + b"\r\n\r\n" + payload)
            while received.count(b"data: {") < after:
                data = await loop.sock_recv(sock, 65536)
                assert data, "the stream ended before the caller hung up"
                received += data
            with contextlib.suppress(BlockingIOError):
                while data := sock.recv(65536):
                    received += data
        status_line, _, rest = received.partition(b"\r\n")
        seen.status = int(status_line.split()[1])
        for line in rest.split(b"\r\n\r\n")[0].split(b"\r\n"):
            name, _, value = line.decode().partition(":")
            if name.lower() == "x-request-id":
                seen.request_id = value.strip()
        events = [m.decode() for m in re.findall(rb"data: (.*?)\n\n", received)]
        self._settle(seen, events, hung_up=True)

    def _settle(self, seen: Seen, events: list[str], hung_up: bool = False) -> None:
        """What a stream's caller was told, or owes by the policy for what it received."""
        texts: list[str] = []
        usage: dict[str, Any] | None = None
        done = failed = False
        for data in events:
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                failed = True
                continue
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                texts.append((choice.get("delta") or {}).get("content") or "")
                texts.append(choice.get("text") or "")
        delivered = self.counter.count_text(seen.model, "".join(texts))
        seen.delivered_tokens = delivered
        if usage is not None and done:
            seen.owed = told_tokens(usage)
            seen.told_usage = True
            seen.told_cost = to_nanos(usage["maas"]["cost"])
        elif failed:  # the upstream failed mid-stream: the output delivered, no prompt
            seen.cut_by, seen.owed = "upstream", Tokens(output=delivered)
        elif done:  # completed without a usage chunk: the prompt and all output
            seen.owed = Tokens(uncached=seen.prompt_tokens, output=delivered)
        else:  # the caller hung up: the prompt and what it received
            assert hung_up, "a stream ended without [DONE] or an error"
            seen.cut_by, seen.owed = "client", Tokens(uncached=seen.prompt_tokens, output=delivered)
            seen.status = 499


def short(i: int) -> str:
    return f"Say something about the number {i}."


def long(i: int) -> str:
    return f"Tell me the whole history of the number {i}, please. " * 12  # > 50 tokens


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


async def mixed_traffic(caller: Caller, tenant: str, offset: int) -> None:
    """Every kind of request, for one tenant, concurrently."""
    c = caller.call
    chat_path, completions, embeddings = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
    mini, flaky = {"model": "gpt-4o-mini", "max_tokens": 30}, {"model": "gpt-4o-flaky"}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    jobs = []
    for i, text in enumerate((short(offset), long(offset))):
        jobs += [
            c(tenant, chat_path, {**mini, **chat(text)}),
            c(tenant, chat_path, {**mini, **chat(text + " Stream it."), **usage}),
            c(tenant, chat_path, {**mini, **chat(text + " Stream it, quietly."), "stream": True}),
            c(tenant, completions, {**mini, "prompt": text}),
            c(tenant, completions, {**mini, "prompt": text + " Go on.", **usage}),
            c(tenant, completions, {**mini, "prompt": text + " More.", "stream": True}),
            c(tenant, embeddings, {"model": "text-embedding-3-small", "input": [text, str(i)]}),
            c(tenant, chat_path, {"model": "gpt-4o-cached", **chat(text)}),
            c(tenant, chat_path, {"model": "gpt-4o-cached", **chat(text + " Again."), **usage}),
        ]
    for i in range(10):
        body = {**flaky, **chat(short(offset * 100 + i))}
        if i % 2:
            body.update(usage if i % 4 == 1 else {"stream": True})
        jobs.append(c(tenant, chat_path, body))
    slow = {"model": "gpt-4o-slow", "max_tokens": 300, "stream": True}
    jobs.append(c(tenant, chat_path, {**slow, **chat(short(offset))}, disconnect_after=2))
    jobs.append(c(tenant, completions, {**slow, "prompt": long(offset)}, disconnect_after=3))
    await asyncio.gather(*jobs)


# -- the mixed run, done once for the tests below --------------------------------------------


@dataclass(slots=True)
class MixedRun:
    month: str
    seen: list[Seen]
    rows: dict[str, dict[str, Any]]
    drafts: dict[str, dict[str, str]]  # tenant -> format -> draft, from the admin API
    reconcile_draft: dict[str, Any]  # GET /admin/reconcile/{month} before finalising
    usage_api: dict[str, list[dict[str, Any]]]  # tenant -> its own /v1/usage rows
    admin_usage: list[dict[str, Any]]
    finals: dict[str, dict[str, Any]]  # tenant -> POST .../finalize answer
    final_csv: dict[str, str]  # tenant -> the finalised invoice as CSV, from the admin API
    reconcile_final: dict[str, Any]
    cli_csv: str  # `maas-gateway invoice --format csv` for globex, after finalising
    cli_reconcile: subprocess.CompletedProcess[str]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `maas-gateway`; its output is kept byte for byte (CSV lines end in CRLF)."""
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=60,
    )
    return subprocess.CompletedProcess(
        run.args, run.returncode, run.stdout.decode(), run.stderr.decode()
    )


def sqlite_rows(path: Path) -> dict[str, dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM ledger_entries")]
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows), "a request id has two ledger rows"
    return by_id


@pytest.fixture(scope="module")
async def mixed_run(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> AsyncIterator[MixedRun]:
    tmp = tmp_path_factory.mktemp("mixed")
    month, first = previous_month()
    peak = datetime(first.year, first.month, 14, 12, 0, tzinfo=UTC)
    off_peak = datetime(first.year, first.month, 15, 3, 0, tzinfo=UTC)
    after = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
    span = {"start": first.isoformat(), "end": (after - timedelta(days=1)).isoformat()}
    counter = TokenCounter(TokenizerConfig(dir=tokenizer_dir))
    with cached_upstream(tmp) as cached_url:
        config = mixed_config(tmp, tokenizer_dir, cached_url)
        config_path = tmp / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        now = [peak]
        running = RunningGateway(parse_settings(config))
        running.gateway.clock = lambda: now[0]  # requests start when the test says
        seen: list[Seen] = []
        async with running as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            for index, moment in enumerate((peak, off_peak)):
                now[0] = moment
                caller = Caller(http, counter, off_peak=moment is off_peak)
                await asyncio.gather(
                    mixed_traffic(caller, "acme", 10 * index + 1),
                    mixed_traffic(caller, "globex", 10 * index + 2),
                )
                seen += caller.seen
            # A disconnected stream is recorded as its handler unwinds: wait for every row.
            for _ in range(100):
                await gw.gateway.ledger.flush()
                if len(sqlite_rows(tmp / "ledger.db")) >= len(seen):
                    break
                await asyncio.sleep(0.05)
            usage_api = {}
            for tenant, key in KEYS.items():
                answer = await http.get(
                    "/v1/usage", params=span, headers={"authorization": f"Bearer {key}"}
                )
                usage_api[tenant] = answer.json()["data"]
            async with gw.admin() as admin:
                invoice = f"/admin/invoices/{{}}/{month}"
                drafts = {
                    tenant: {
                        fmt: (await admin.get(invoice.format(tenant), params={"format": fmt})).text
                        for fmt in ("json", "csv", "html")
                    }
                    for tenant in KEYS
                }
                reconcile_draft = (await admin.get(f"/admin/reconcile/{month}")).json()
                admin_usage = (await admin.get("/admin/usage", params=span)).json()["data"]
                finals = {
                    tenant: (await admin.post(invoice.format(tenant) + "/finalize")).json()
                    for tenant in KEYS
                }
                final_csv = {
                    tenant: (await admin.get(invoice.format(tenant), params={"format": "csv"})).text
                    for tenant in KEYS
                }
                reconcile_final = (await admin.get(f"/admin/reconcile/{month}")).json()
    rows = sqlite_rows(tmp / "ledger.db")
    cfg = ("--config", str(config_path))
    cli_csv = cli("invoice", "--tenant", "globex", "--month", month, "--format", "csv", *cfg)
    assert cli_csv.returncode == 0, cli_csv.stderr
    yield MixedRun(
        month=month,
        seen=seen,
        rows=rows,
        drafts=drafts,
        reconcile_draft=reconcile_draft,
        usage_api=usage_api,
        admin_usage=admin_usage,
        finals=finals,
        final_csv=final_csv,
        reconcile_final=reconcile_final,
        cli_csv=cli_csv.stdout,
        cli_reconcile=cli("reconcile", "--month", month, *cfg),
    )


def ledger_tokens(row: dict[str, Any]) -> Tokens:
    return Tokens(row["uncached_input"], row["cached_input"], row["output"])


# -- 1. every request, and the sums ------------------------------------------------------------


def test_the_run_covers_every_kind_of_request(mixed_run: MixedRun) -> None:
    """A guard: the mix really has what the checks below are about."""
    seen, rows = mixed_run.seen, mixed_run.rows
    assert len(seen) == 2 * 2 * 30
    assert sum(s.cut_by == "client" for s in seen) == 8
    assert any(s.cut_by == "upstream" and s.owed.output for s in seen)
    assert any(s.status >= 500 and not s.cut_by for s in seen)  # failed before any output
    assert any(s.status == 200 and not s.told_usage and s.owed.output for s in seen)
    assert sum(s.owed.cached for s in seen) > 0
    versions = {r["price_version"] for r in rows.values()}
    assert any("tier=51-" in v for v in versions) and any("tier=0-50" in v for v in versions)
    assert any("off-peak" in v for v in versions) and any("plan=partner" in v for v in versions)
    assert any("off-peak" not in v for v in versions)


def test_each_request_is_in_the_ledger_once_as_its_caller_was_told(mixed_run: MixedRun) -> None:
    """One row per request id; its usage and cost are what the caller was told, or for an
    interrupted stream what the policy charges for what the caller received; every cost
    matches the price list worked out independently (tiers, off-peak, plan, rounding)."""
    rows = mixed_run.rows
    assert set(rows) == {s.request_id for s in mixed_run.seen}
    for s in mixed_run.seen:
        row = rows[s.request_id]
        where = f"{s.request_id} ({s.model}, status {s.status}, cut by {s.cut_by})"
        assert ledger_tokens(row) == s.owed, where
        assert row["cost_nanos"] == s.cost, where
        if s.told_cost is not None:
            assert s.told_cost == s.cost, where
        assert row["stream_cut_by"] == s.cut_by, where
        assert row["tenant_id"] == s.tenant and row["model"] == s.model, where
        if s.cut_by != "upstream":  # an upstream cut comes after a 200 has gone out
            assert row["status_code"] == s.status, where
        if s.told_usage and s.model != "gpt-4o-cached":
            # The simulator counts as the gateway does, so the policy's counts above hold.
            assert s.owed.uncached + s.owed.cached == s.prompt_tokens, where
            if s.delivered_tokens is not None:
                assert s.owed.output == s.delivered_tokens, where


def test_client_ledger_invoice_and_usage_sums_agree(mixed_run: MixedRun) -> None:
    """Per tenant and token kind: Σ what callers were told or owe = Σ ledger rows = Σ invoice
    usage lines = Σ /v1/usage = Σ /admin/usage; Σ costs = the invoice's exact total; the
    invoice rounds each line once, then tax (docs/billing.md rule 3)."""
    month = mixed_run.month
    for tenant in KEYS:
        seen = [s for s in mixed_run.seen if s.tenant == tenant]
        rows = [r for r in mixed_run.rows.values() if r["tenant_id"] == tenant]
        told = sum((s.owed for s in seen), Tokens())
        ledger = sum((ledger_tokens(r) for r in rows), Tokens())
        assert told == ledger
        invoice = json.loads(mixed_run.drafts[tenant]["json"])
        assert invoice["month"] == month and invoice["status"] == "draft"
        by_kind: Counter[str] = Counter()
        for line in invoice["lines"]:
            if line["kind"] == "usage":
                by_kind[line["token_kind"]] += line["quantity"]
        assert Tokens(by_kind["uncached_input"], by_kind["cached_input"], by_kind["output"]) == told
        for name, usage in (
            ("/v1/usage", mixed_run.usage_api[tenant]),
            ("/admin/usage", [u for u in mixed_run.admin_usage if u["tenant_id"] == tenant]),
        ):
            summed = Tokens(
                sum(u["uncached_input_tokens"] for u in usage),
                sum(u["cached_input_tokens"] for u in usage),
                sum(u["output_tokens"] for u in usage),
            )
            assert summed == told, name
            assert sum(u["cost_nanos"] for u in usage) == sum(s.cost for s in seen), name
            assert all(to_nanos(u["cost"]) == u["cost_nanos"] for u in usage), name
            assert sum(u["requests"] for u in usage) == len(seen), name

        told_cost = sum(s.cost for s in seen)
        assert told_cost == sum(r["cost_nanos"] for r in rows)
        assert invoice["exact_nanos"] == told_cost
        assert sum(line["amount_nanos"] for line in invoice["lines"]) == told_cost
        cent = Decimal("0.01")
        subtotal = Decimal(0)
        for line in invoice["lines"]:
            exact = Decimal(line["amount_nanos"]).scaleb(-9)
            rounded = exact.quantize(cent, ROUND_HALF_UP)
            assert Decimal(line["amount"]) == rounded
            subtotal += rounded
        tax = (subtotal * TAX_RATE[tenant]).quantize(cent, ROUND_HALF_UP)
        assert Decimal(invoice["subtotal"]) == subtotal
        assert Decimal(invoice["tax"]) == tax
        assert Decimal(invoice["total"]) == subtotal + tax
        half_cent_per_line = len(invoice["lines"]) * Decimal("0.005")
        assert abs(subtotal - Decimal(told_cost).scaleb(-9)) <= half_cent_per_line
        if tenant == "globex":
            assert any(line["kind"] == "discount" for line in invoice["lines"])


def test_reconciliation_reports_no_difference(mixed_run: MixedRun) -> None:
    """The admin API reconciles the month with zero differences as a draft and once
    finalised; so does the CLI (exit status 0)."""
    for report in (mixed_run.reconcile_draft, mixed_run.reconcile_final):
        assert report["ok"] is True, report
        assert report["differences"] == [] and report["pending"] == []
        assert sorted(report["tenants"]) == sorted(KEYS)
    run = mixed_run.cli_reconcile
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"Reconciliation {mixed_run.month}: 2 tenant(s), OK, no differences" in run.stdout
    assert "DIFFERENCE" not in run.stdout and "pending" not in run.stdout


# -- 3. invoice outputs -------------------------------------------------------------------------


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.open: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("meta",):
            self.open.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1:]}>"
        self.open.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_invoice_formats_from_the_admin_api_and_the_cli_agree(mixed_run: MixedRun) -> None:
    """The CSV parses into the JSON's lines and totals; the HTML page is well formed and
    shows every line and the totals; the CLI prints the same CSV as the admin API."""
    assert mixed_run.cli_csv == mixed_run.final_csv["globex"]
    for tenant in KEYS:
        api = json.loads(mixed_run.drafts[tenant]["json"])
        for text, status in (
            (mixed_run.drafts[tenant]["csv"], "draft"),
            (mixed_run.final_csv[tenant], "final"),
        ):
            table = list(csv.DictReader(io.StringIO(text)))
            lines, totals = table[:-3], {row["row_type"]: row for row in table[-3:]}
            assert len(lines) == len(api["lines"])
            for row, line in zip(lines, api["lines"], strict=True):
                assert row["invoice_number"] == api["number"] == f"INV-{tenant}-{mixed_run.month}"
                assert row["status"] == status
                assert row["row_type"] == line["kind"]
                assert row["description"] == line["description"]
                assert row["quantity"] == (str(line["quantity"]) if line["token_kind"] else "")
                assert Decimal(row["amount"]) == Decimal(line["amount"])
                assert to_nanos(row["exact_amount"]) == line["amount_nanos"]
            for name in ("subtotal", "tax", "total"):
                assert Decimal(totals[name]["amount"]) == Decimal(api[name])

        page = _Cells()
        page.feed(mixed_run.drafts[tenant]["html"])
        page.close()
        assert page.open == []  # every element closed
        body = [row for row in page.rows if len(row) == 4 and row[0] != "Description"]
        assert [row[0] for row in body] == [line["description"] for line in api["lines"]]
        amounts = [f"{Decimal(line['amount']):,} USD" for line in api["lines"]]
        assert [row[3] for row in body] == amounts
        foot = {row[0].split(" at ")[0]: row[1] for row in page.rows if len(row) == 2}
        for name in ("Subtotal", "Tax", "Total"):
            assert foot[name] == f"{Decimal(api[name.lower()]):,} USD"
        assert api["number"] in mixed_run.drafts[tenant]["html"]


async def test_a_quiet_stream_is_billed_from_the_usage_the_gateway_asked_for(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The caller asks for no usage; the gateway asks the upstream anyway and bills what the
    upstream reported (cached input, which no local count could know), hiding that chunk."""
    with cached_upstream(tmp_path) as cached_url:
        config = mixed_config(tmp_path, tokenizer_dir, cached_url)
        async with (
            RunningGateway(parse_settings(config)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
        ):
            body = {"model": "gpt-4o-cached", **chat("one two three four"), "stream": True}
            headers = {"authorization": f"Bearer {KEYS['acme']}"}
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as response:
                assert response.status_code == 200
                request_id = response.headers["x-request-id"]
                events = [line[6:] async for line in response.aiter_lines() if line[:6] == "data: "]
            await gw.gateway.ledger.flush()
    assert events[-1] == "[DONE]"
    assert not any("usage" in json.loads(e) for e in events[:-1])  # hidden from the caller
    row = sqlite_rows(tmp_path / "ledger.db")[request_id]
    # The upstream reports 10 + 2 x 4 words = 18 prompt tokens, 18 // 2 + 4 % 3 = 10 of them
    # cached, and 3 + 4 % 5 = 7 output tokens.
    assert (row["uncached_input"], row["cached_input"], row["output"]) == (8, 10, 7)


def test_finalised_invoice_is_the_draft(mixed_run: MixedRun) -> None:
    """Finalising stores the same lines and totals the draft showed."""
    for tenant in KEYS:
        draft = json.loads(mixed_run.drafts[tenant]["json"])
        final = mixed_run.finals[tenant]
        assert final["status"] == "final"
        for name in ("lines", "subtotal", "tax", "total", "exact_nanos", "number"):
            assert final[name] == draft[name], name


# -- 2. SIGKILL under load, SQLite and PostgreSQL ----------------------------------------------


@dataclass(slots=True)
class Load:
    completed: list[str] = field(default_factory=list)  # request ids that fully arrived
    seen: set[str] = field(default_factory=set)  # every x-request-id a client received
    told: dict[str, int] = field(default_factory=dict)  # request id -> cost told (nanos)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def load_worker(http: httpx.AsyncClient, worker: int, load: Load) -> None:
    headers = {"authorization": f"Bearer {ACME_KEY}"}
    n = 0
    while not load.stop.is_set():
        n += 1
        kind = (worker + n) % 3
        text = f"Load {worker} {n}: what is new?"
        with contextlib.suppress(httpx.HTTPError, json.JSONDecodeError):
            if kind == 0:
                body = {"model": "gpt-4o-mini", "max_tokens": 30, **chat(text)}
                response = await http.post("/v1/chat/completions", json=body, headers=headers)
                load.seen.add(response.headers["x-request-id"])
                if response.status_code == 200:
                    cost = response.json()["usage"]["maas"]["cost"]
                    load.told[response.headers["x-request-id"]] = to_nanos(cost)
                    load.completed.append(response.headers["x-request-id"])
                continue
            body = {"model": "gpt-4o-mini", "max_tokens": 30, "stream": True}
            if kind == 1:
                body.update(chat(text), stream_options={"include_usage": True})
                path = "/v1/chat/completions"
            else:
                body["prompt"] = text
                path = "/v1/completions"
            async with http.stream("POST", path, json=body, headers=headers) as response:
                request_id = response.headers["x-request-id"]
                load.seen.add(request_id)
                cost = None
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        if cost is not None:
                            load.told[request_id] = cost
                        load.completed.append(request_id)
                        break
                    if line.startswith("data: ") and '"maas"' in line:
                        cost = to_nanos(json.loads(line[6:])["usage"]["maas"]["cost"])
        await asyncio.sleep(0)


async def ledger_ids(url: str) -> tuple[list[str], dict[str, int], int, int, int]:
    """Request ids, cost per id, Σ raw cost, Σ rollup cost and Σ rollup requests."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(select(ENTRIES.c.request_id, ENTRIES.c.cost_nanos))
            ).all()
            rolled = await connection.scalar(select(func.sum(ROLLUPS.c.cost_nanos)))
            requests = await connection.scalar(select(func.sum(ROLLUPS.c.requests)))
    finally:
        await engine.dispose()
    costs = {request_id: int(cost) for request_id, cost in rows}
    return (
        [request_id for request_id, _ in rows],
        costs,
        sum(costs.values()),
        int(rolled or 0),
        int(requests or 0),
    )


async def crash_rows(url: str) -> dict[str, tuple[int, int]]:
    """Rows closed by the crash policy: request id -> (status, output tokens billed)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(ENTRIES.c.request_id, ENTRIES.c.status_code, ENTRIES.c.output).where(
                        ENTRIES.c.error_type == GATEWAY_DIED
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    return {request_id: (int(status), int(output)) for request_id, status, output in rows}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_sigkill_under_load_loses_no_answered_request(
    backend: str, tmp_path: Path, tokenizer_dir: Path, request: pytest.FixtureRequest
) -> None:
    """`maas-gateway serve` under concurrent load (streams and not) is killed with SIGKILL;
    restarted with the same configuration, every response that reached its client whole is
    in the ledger exactly once, at the cost the client was told, and the rollups agree. Every
    request that got an `x-request-id` has exactly one row: those in flight at the kill are
    closed by the crash policy (`gateway_died`, billed for the output their client got)."""
    if backend == "postgres":
        url = request.getfixturevalue("postgres_database")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    journal = tmp_path / "journal"
    provider = {
        "name": "sim",
        "type": "simulated",
        "time_scale": 1,
        "ttft_overhead_ms": 2,
        "prefill_ms_per_token": 0,
        "itl_ms": 5,  # streams last long enough for some to be mid-way at the kill
        "jitter": 0,
        "output": {"distribution": "uniform", "mean": 20, "sd": 5, "min": 5, "max": 40},
    }
    config = base_config(
        tmp_path,
        tokenizer_dir,
        providers=[provider],
        ledger={"url": url, "journal_dir": str(journal), "flush_interval_ms": 1000},
    )
    load = Load()
    with gateway_process(config, tmp_path, name="killed") as (base_url, process):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base_url, timeout=10, limits=limits) as http:
            workers = [asyncio.create_task(load_worker(http, i, load)) for i in range(24)]
            while len(load.completed) < 250:
                assert not any(w.done() for w in workers), [w.exception() for w in workers]
                await asyncio.sleep(0.01)
            process.send_signal(signal.SIGKILL)  # requests are in flight
            await asyncio.to_thread(process.wait, 10)
            load.stop.set()
            await asyncio.gather(*workers)
    assert process.returncode == -signal.SIGKILL
    completed = list(load.completed)
    assert len(completed) == len(set(completed))
    before, *_ = await ledger_ids(url)
    assert not set(completed) <= set(before), "nothing was left to the journal"

    with gateway_process(config, tmp_path, name="restarted") as (base_url, restarted):
        ids, costs, raw_cost, rolled_cost, rolled_requests = await ledger_ids(url)
        assert len(ids) == len(set(ids)), "duplicate ledger rows"
        missing = set(completed) - set(ids)
        assert not missing, f"{len(missing)} of {len(completed)} answered requests were lost"
        in_flight = load.seen - set(completed)
        assert in_flight, "no request was in flight at the kill"
        lost = load.seen - set(ids)
        assert not lost, f"{len(lost)} of {len(in_flight)} requests in flight have no row"
        crashed = await crash_rows(url)
        assert crashed and set(crashed) <= set(ids) - set(completed)
        assert all(status == 500 for status, _ in crashed.values())
        assert {i: costs[i] for i in load.told} == load.told
        assert raw_cost == rolled_cost and rolled_requests == len(ids)
        leftovers = await asyncio.to_thread(os.listdir, journal)
        assert all(name.startswith(f"{restarted.pid}-") for name in leftovers), leftovers
        month = f"{datetime.now(UTC):%Y-%m}"
        async with httpx.AsyncClient(
            base_url=base_url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
        ) as admin:
            report = (await admin.get(f"/admin/reconcile/{month}")).json()
        assert report["ok"] is True, report
