"""Quotas end to end: real `maas-gateway serve` processes, a real redis-server, httpx and the
official OpenAI SDK over loopback.

What a caller and the operator see: concurrent spending never exceeds a prepaid balance or a
token budget (one process with the in-memory store, and two processes sharing Redis), every
admitted answer is billed exactly what its text counts, RPM and TPM hold across processes,
refusals have OpenAI's shapes, `max_tokens` is clamped to what is left, and a dead or frozen
Redis gives quick 503s (or, failing open, 200s) and recovers without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import redis
import yaml
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from billing.money import format_amount, price_per_token_nanos, to_decimal, to_nanos
from gateway.auth import hash_key
from gateway.config import deep_merge
from gateway.tokens import TokenCounter, TokenizerConfig
from tests.fixtures.redis_server import RedisServer
from tests.harness import ADMIN_KEY, PROJECT_ROOT, base_config, free_port, wait_for_http

PACED_MODEL = "gpt-4o-mini"
"""Served by a backend that takes ~0.1 s and whose answers often run to max_tokens."""
FULL_MODEL = "gpt-4"
"""Served by an instant backend whose every answer runs to max_tokens."""
MESSAGES = [
    {"role": "system", "content": "You are a storyteller."},
    {"role": "user", "content": "Tell me a long story about tokens and budgets."},
]
SDK_MESSAGES = cast(list[ChatCompletionMessageParam], MESSAGES)
MAX_TOKENS = 48
BUDGETED_REQUESTS = 50
CONCURRENT_REQUESTS = 200
PRICES = {PACED_MODEL: ("0.15", "0.60"), FULL_MODEL: ("30", "60")}  # as in harness.base_config
LATENCY_BOUND_S = 2.0
TPM_FULL_REQUESTS = 12
EDGE_RPM = 10
"""The `edge` tenant's requests per minute (fired 3x across a minute boundary)."""
"""The `tpm` tenant's limit pays for this many FULL_MODEL answers of 20 tokens."""

PACED_PROVIDER = {
    "name": "paced",
    "type": "simulated",
    "time_scale": 1,
    "ttft_overhead_ms": 40,
    "prefill_ms_per_token": 0,
    "itl_ms": 1,
    "jitter": 0,
    "capacity": 1024,
    "max_queue": 4096,
    "seed": 11,
    # uniform over [24, 96]: two answers in three run into max_tokens=48
    "output": {"distribution": "uniform", "mean": 60, "sd": 20.8, "min": 24, "max": 96},
}
FULL_PROVIDER = {
    "name": "full",
    "type": "simulated",
    "time_scale": 0,
    "seed": 5,
    "output": {"distribution": "fixed", "mean": 4000, "sd": 0, "min": 1, "max": 4096},
}
MODELS = [
    {"name": PACED_MODEL, "deployments": [{"provider": "paced", "model": "sim-paced"}]},
    {"name": FULL_MODEL, "deployments": [{"provider": "full", "model": "sim-full"}]},
    {
        "name": "text-embedding-3-small",
        "kind": "embedding",
        "deployments": [{"provider": "full", "model": "sim-embed"}],
    },
]


def api_key(tenant: str) -> str:
    return f"sk-test-{tenant}-".ljust(48, "0")


def tenant(tenant_id: str, limits: dict[str, int] | None = None, balance: int | None = None) -> Any:
    """A tenant stanza with one key (`api_key(tenant_id)`); `balance` in nanos makes it prepaid."""
    stanza: dict[str, Any] = {
        "id": tenant_id,
        "limits": limits or {},
        "keys": [{"id": f"{tenant_id}-key", "hash": hash_key(api_key(tenant_id))}],
    }
    if balance is not None:
        stanza["balance"] = str(to_decimal(balance))
    return stanza


@dataclass(frozen=True)
class Tariff:
    """One model's prompt size (for MESSAGES) and per-token prices, in nanos."""

    prompt_tokens: int
    input_nanos: int
    output_nanos: int

    def cost(self, completion_tokens: int) -> int:
        return self.prompt_tokens * self.input_nanos + completion_tokens * self.output_nanos


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path) -> TokenCounter:
    return TokenCounter(TokenizerConfig(dir=tokenizer_dir))


@pytest.fixture(scope="module")
def tariffs(counter: TokenCounter) -> dict[str, Tariff]:
    return {
        model: Tariff(
            counter.count_chat(model, MESSAGES),
            price_per_token_nanos(prices[0]),
            price_per_token_nanos(prices[1]),
        )
        for model, prices in PRICES.items()
    }


# ---- gateway processes -----------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayProcess:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    ledger: Path
    metrics_url: str


SERVE = [sys.executable, "-m", "gateway.cli", "serve"]


@contextlib.contextmanager
def gateway_processes(configs: dict[str, dict[str, Any]], tmp: Path) -> Iterator[list[Any]]:
    """`maas-gateway serve` processes started side by side, each with its own SQLite ledger."""
    started: list[GatewayProcess] = []
    try:
        for name, config in configs.items():
            ledger = tmp / f"{name}.db"
            metrics_port = free_port()
            config = deep_merge(
                config,
                {
                    "ledger": {"url": f"sqlite+aiosqlite:///{ledger}"},
                    "metrics": {"host": "127.0.0.1", "port": metrics_port},
                },
            )
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            port = free_port()
            with open(tmp / f"{name}.log", "wb") as log:
                process = subprocess.Popen(
                    [*SERVE, "--config", str(path), "--port", str(port)],
                    cwd=PROJECT_ROOT,
                    env={**os.environ, "MAAS_TEST_ADMIN_KEY": ADMIN_KEY},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            url = f"http://127.0.0.1:{port}"
            started.append(GatewayProcess(name, url, process, ledger, metrics_url))
        for gw in started:
            wait_for_http(gw.url + "/healthz", timeout=60, process=gw.process)
        yield started
    finally:
        for gw in started:
            if gw.process.poll() is None:
                gw.process.send_signal(signal.SIGTERM)
        for gw in started:
            try:
                gw.process.wait(15)
            except subprocess.TimeoutExpired:
                gw.process.kill()
                gw.process.wait()


def fleet_config(
    tmp: Path, tokenizer_dir: Path, quotas: dict[str, Any], tenants: list[Any]
) -> dict[str, Any]:
    return base_config(
        tmp,
        tokenizer_dir,
        providers=[PACED_PROVIDER, FULL_PROVIDER],
        models=MODELS,
        quotas=quotas,
        tenants=tenants,
    )


@dataclass(frozen=True)
class Fleet:
    solo: list[GatewayProcess]
    """One process with the in-memory quota store."""
    pair: list[GatewayProcess]
    """Two processes sharing one redis-server."""
    redis_url: str


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    tokenizer_dir: Path,
    redis_server: RedisServer,
    tariffs: dict[str, Tariff],
) -> Iterator[Fleet]:
    paced, full = tariffs[PACED_MODEL], tariffs[FULL_MODEL]
    huge = {"rpm": 10**6, "tpm": 10**9}
    tenants = [
        tenant("bal", balance=BUDGETED_REQUESTS * paced.cost(MAX_TOKENS)),
        tenant("tok", {"tokens_per_month": BUDGETED_REQUESTS * (paced.prompt_tokens + MAX_TOKENS)}),
        tenant("rpm", {"rpm": 30, "tpm": 10**9}),
        tenant("tpm", {"rpm": 10**6, "tpm": TPM_FULL_REQUESTS * (full.prompt_tokens + 20)}),
        tenant("rpm1", {"rpm": 1, "tpm": 10**9}),
        tenant("edge", {"rpm": EDGE_RPM, "tpm": 10**9}),
        tenant("broke", huge, balance=0),
        tenant("warm", huge),
        tenant("clamp-tok", {"tokens_per_month": full.prompt_tokens + 10}),
        tenant("clamp-bal", huge, balance=full.cost(10)),
        tenant(
            "lost",
            {"tokens_per_month": full.prompt_tokens + MAX_TOKENS},
            balance=full.cost(MAX_TOKENS),
        ),
    ]
    tmp = tmp_path_factory.mktemp("quota-gateway")
    redis_server.start()
    redis_server.flush()
    memory = fleet_config(tmp, tokenizer_dir, {"backend": "memory"}, tenants)
    shared = fleet_config(
        tmp,
        tokenizer_dir,
        {
            "backend": "redis",
            "redis_url": redis_server.url,
            "redis_url_env": None,
            # A read timeout is measured on the event loop: under a 100-request burst on a
            # busy two-core host the loop can lag past the 250 ms default, and a healthy
            # Redis then looks dead. A hung Redis is still detected within a second.
            "timeout_ms": 1000,
        },
        tenants,
    )
    configs = {"solo": memory, "a": shared, "b": shared}
    with gateway_processes(configs, tmp) as started:
        yield Fleet(solo=started[:1], pair=started[1:], redis_url=redis_server.url)


# ---- calling the gateways --------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    gateway: str
    status: int
    headers: httpx.Headers
    body: dict[str, Any]
    seconds: float

    @property
    def completion_tokens(self) -> int:
        return int(self.headers["x-maas-completion-tokens"])

    @property
    def billed_tokens(self) -> int:
        return int(self.headers["x-maas-prompt-tokens"]) + self.completion_tokens

    @property
    def cost_nanos(self) -> int:
        return to_nanos(self.headers["x-maas-cost"])

    @property
    def error(self) -> dict[str, Any]:
        return self.body["error"]  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=CONCURRENT_REQUESTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        yield client


async def chat(
    client: httpx.AsyncClient,
    gw: GatewayProcess,
    tenant_id: str,
    *,
    model: str = PACED_MODEL,
    max_tokens: int = MAX_TOKENS,
    user: str = "caller",
) -> Reply:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "user": user}
    started = time.perf_counter()
    response = await client.post(
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {api_key(tenant_id)}"},
    )
    seconds = time.perf_counter() - started
    return Reply(gw.name, response.status_code, response.headers, response.json(), seconds)


async def burst(
    gateways: list[GatewayProcess], tenant_id: str, count: int, **kwargs: Any
) -> list[Reply]:
    """`count` requests at once, spread over the gateways in turn."""
    async with http_client() as client:
        calls = [
            chat(client, gateways[i % len(gateways)], tenant_id, user=f"caller-{i}", **kwargs)
            for i in range(count)
        ]
        return list(await asyncio.gather(*calls))


async def admin_get(gw: GatewayProcess, path: str) -> Any:
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {ADMIN_KEY}"}) as client:
        response = await client.get(gw.url + path, timeout=30)
    response.raise_for_status()
    return response.json()


async def balance_nanos(gw: GatewayProcess, tenant_id: str) -> int:
    answer = await admin_get(gw, f"/admin/tenants/{tenant_id}/balance")
    return to_nanos(answer["balance"])


async def month_budget_left(gw: GatewayProcess, tenant_id: str) -> int:
    """The `maas_tenant_budget_remaining_tokens` gauge (the store's `remaining`) for a month."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(gw.metrics_url, timeout=30)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "maas_tenant_budget_remaining_tokens"
                and sample.labels.get("tenant") == tenant_id
                and sample.labels.get("window") == "month"
            ):
                return int(sample.value)
    raise AssertionError(f"no month budget gauge for {tenant_id}")


@dataclass(frozen=True)
class LedgerRow:
    status_code: int
    error_type: str | None
    uncached_input: int
    output: int
    cost_nanos: int


async def ledger_rows(gateways: list[GatewayProcess], tenant_id: str) -> dict[str, LedgerRow]:
    """Every ledger entry of a tenant across the gateways' ledgers, by request id."""
    rows: dict[str, LedgerRow] = {}
    for gw in gateways:
        await admin_get(gw, f"/admin/usage?tenant={tenant_id}")  # flushes that ledger
        with contextlib.closing(sqlite3.connect(gw.ledger)) as db:
            found = db.execute(
                "SELECT request_id, status_code, error_type, uncached_input, output, cost_nanos"
                " FROM ledger_entries WHERE tenant_id = ?",
                (tenant_id,),
            ).fetchall()
        for request_id, *values in found:
            assert request_id not in rows, f"{request_id} is in two ledgers"
            rows[request_id] = LedgerRow(*values)
    return rows


def minute_now() -> int:
    return int(time.time() // 60)


def assert_openai_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    assert set(reply.error) == {"message", "type", "param", "code"}
    assert reply.error["code"] == code
    assert reply.error["message"]
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["x-request-id"].startswith("req_")


RATELIMIT_HEADERS = {
    f"x-ratelimit-{what}-{unit}"
    for what in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens")
}


# ---- spending: balance and token budget ------------------------------------------------------


@pytest.mark.parametrize(
    "where", ["solo", "pair"], ids=["one-process-memory", "two-processes-redis"]
)
@pytest.mark.parametrize("budget", ["balance", "tokens_per_month"])
async def test_concurrent_spending_never_exceeds_the_budget_and_bills_what_was_used(
    fleet: Fleet, counter: TokenCounter, tariffs: dict[str, Tariff], budget: str, where: str
) -> None:
    gateways: list[GatewayProcess] = getattr(fleet, where)
    paced = tariffs[PACED_MODEL]
    tenant_id = "bal" if budget == "balance" else "tok"
    limit = BUDGETED_REQUESTS * (
        paced.cost(MAX_TOKENS) if budget == "balance" else paced.prompt_tokens + MAX_TOKENS
    )

    replies = await burst(gateways, tenant_id, CONCURRENT_REQUESTS)

    statuses = Counter((r.gateway, r.status) for r in replies)
    assert {status for _, status in statuses} <= {200, 429}, statuses
    admitted = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status != 200]
    for reply in refused:
        assert_openai_error(reply, 429, "insufficient_quota")
        assert reply.error["type"] == "insufficient_quota"
        assert reply.headers["x-should-retry"] == "false"
    # the budget pays for 50 answers at max_tokens; shorter answers leave room for a few more
    assert BUDGETED_REQUESTS <= len(admitted) < CONCURRENT_REQUESTS

    for reply in admitted:  # billed exactly what the delivered text counts, never less
        text = reply.body["choices"][0]["message"]["content"]
        used = counter.count_output(PACED_MODEL, text)
        assert used == reply.completion_tokens == reply.body["usage"]["completion_tokens"]
        assert int(reply.headers["x-maas-prompt-tokens"]) == paced.prompt_tokens
        assert 0 < used <= MAX_TOKENS
        assert reply.cost_nanos == paced.cost(used)
        assert reply.body["usage"]["maas"]["cost"] == format_amount(paced.cost(used))
    at_max = [r for r in admitted if r.completion_tokens == MAX_TOKENS]
    assert len(at_max) >= len(admitted) // 3, "the backend should often run to max_tokens"

    if budget == "balance":
        billed = sum(r.cost_nanos for r in admitted)
        left = await balance_nanos(gateways[-1], tenant_id)
    else:
        billed = sum(r.billed_tokens for r in admitted)
        left = await month_budget_left(gateways[-1], tenant_id)
    assert billed <= limit
    assert left == limit - billed  # every reservation settled: nothing held, nothing lost

    ledger = await ledger_rows(gateways, tenant_id)
    assert set(ledger) == {r.headers["x-request-id"] for r in replies}
    for reply in replies:
        row = ledger[reply.headers["x-request-id"]]
        assert row.status_code == reply.status
        if reply.status == 200:
            assert (row.uncached_input, row.output) == (
                paced.prompt_tokens,
                reply.completion_tokens,
            )
            assert row.cost_nanos == reply.cost_nanos
        else:
            assert (row.error_type, row.output, row.cost_nanos) == ("insufficient_quota", 0, 0)
    if budget == "balance":
        assert sum(row.cost_nanos for row in ledger.values()) == billed
    else:
        assert sum(row.uncached_input + row.output for row in ledger.values()) == billed


# ---- RPM and TPM across two processes --------------------------------------------------------


async def test_rpm_holds_across_two_processes_sharing_redis(fleet: Fleet) -> None:
    replies = await burst(fleet.pair, "rpm", 90, model=FULL_MODEL, max_tokens=5)

    admitted = [r for r in replies if r.status == 200]
    per_gateway = {gw.name: sum(r.gateway == gw.name for r in admitted) for gw in fleet.pair}
    # Each process alone would admit 30: together they must not (a rolling window, so
    # whether the burst crosses a clock minute makes no difference).
    assert len(admitted) == 30, per_gateway
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(30))
    for reply in admitted:
        assert RATELIMIT_HEADERS <= set(reply.headers)
        assert reply.headers["x-ratelimit-limit-requests"] == "30"
    for reply in replies:
        if reply.status == 200:
            continue
        assert_openai_error(reply, 429, "rate_limit_exceeded")
        assert reply.error["type"] == "requests"
        assert 1 <= int(reply.headers["retry-after"]) <= 61
        assert reply.headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-should-retry" not in reply.headers


async def test_three_times_the_rpm_across_a_minute_boundary_admits_the_limit_once(
    fleet: Fleet,
) -> None:
    """RPM is a rolling window in both stores: the limit fired just before a UTC minute
    turns and twice the limit just after it admit the limit once, not once per minute."""
    left = 60 - time.time() % 60  # into the last 1.5 s of a minute
    await asyncio.sleep(left - 1.5 if left >= 1.5 else left + 58.5)
    minute = minute_now()
    stores = {"memory": fleet.solo, "redis": fleet.pair}
    before = await asyncio.gather(
        *(burst(g, "edge", EDGE_RPM, model=FULL_MODEL, max_tokens=5) for g in stores.values())
    )
    assert minute_now() == minute, "the first burst should end before the minute turns"
    await asyncio.sleep(60 - time.time() % 60 + 0.3)  # the next clock minute has begun
    assert minute_now() == minute + 1
    after = await asyncio.gather(
        *(burst(g, "edge", 2 * EDGE_RPM, model=FULL_MODEL, max_tokens=5) for g in stores.values())
    )
    for store, first, second in zip(stores, before, after, strict=True):
        assert [r.status for r in first] == [200] * EDGE_RPM, store
        refused = [r for r in second if r.status != 200]
        assert len(refused) == 2 * EDGE_RPM, f"{store}: a new minute admitted more"
        for reply in refused:
            assert_openai_error(reply, 429, "rate_limit_exceeded")
            # The window frees when the first burst leaves it, about a minute after it.
            assert 55 <= int(reply.headers["retry-after"]) <= 61, store
            assert reply.headers["x-ratelimit-remaining-requests"] == "0"


async def test_tpm_holds_across_two_processes_sharing_redis(
    fleet: Fleet, tariffs: dict[str, Tariff]
) -> None:
    full = tariffs[FULL_MODEL]
    tpm = TPM_FULL_REQUESTS * (full.prompt_tokens + 20)
    replies = await burst(fleet.pair, "tpm", 40, model=FULL_MODEL, max_tokens=20)

    admitted = [r for r in replies if r.status == 200]
    used = sum(r.billed_tokens for r in admitted)
    assert used <= tpm
    assert len(admitted) == TPM_FULL_REQUESTS  # every answer runs to max_tokens
    for reply in admitted:
        assert RATELIMIT_HEADERS <= set(reply.headers)
        assert reply.completion_tokens == 20
    for reply in replies:
        if reply.status == 200:
            continue
        assert_openai_error(reply, 429, "rate_limit_exceeded")
        assert reply.error["type"] == "tokens"
        assert 1 <= int(reply.headers["retry-after"]) <= 61


# ---- refusal shapes through the official SDK -------------------------------------------------


@contextlib.asynccontextmanager
async def counting_sdk(
    gw: GatewayProcess, tenant_id: str, max_retries: int
) -> AsyncIterator[tuple[openai.AsyncOpenAI, list[str]]]:
    """The official SDK for a tenant, and the list of requests it actually sent."""
    sent: list[str] = []

    async def note(request: httpx.Request) -> None:
        sent.append(request.url.path)

    async with httpx.AsyncClient(event_hooks={"request": [note]}, timeout=30) as http:
        client = openai.AsyncOpenAI(
            base_url=gw.url + "/v1",
            api_key=api_key(tenant_id),
            max_retries=max_retries,
            http_client=http,  # type: ignore[arg-type]
        )
        yield client, sent


async def test_sdk_raises_rate_limit_error_and_does_not_retry_insufficient_quota(
    fleet: Fleet,
) -> None:
    gw = fleet.pair[0]
    async with counting_sdk(gw, "broke", max_retries=3) as (client, sent):
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model=PACED_MODEL,
                messages=SDK_MESSAGES,
                max_tokens=5,
            )
    assert refused.value.status_code == 429
    assert refused.value.code == "insufficient_quota"
    assert refused.value.type == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert sent == ["/v1/chat/completions"]  # the SDK did not retry
    usage = await admin_get(gw, "/admin/usage?tenant=broke")
    assert [(row["requests"], row["error_requests"]) for row in usage["data"]] == [(1, 1)]


async def test_sdk_sees_rpm_refusal_with_retry_after_and_ratelimit_headers(fleet: Fleet) -> None:
    first, second = fleet.pair
    async with counting_sdk(first, "rpm1", max_retries=0) as (client, _):
        ok = await client.chat.completions.with_raw_response.create(
            model=FULL_MODEL,
            messages=SDK_MESSAGES,
            max_tokens=5,
        )
    assert ok.status_code == 200
    assert RATELIMIT_HEADERS <= set(ok.headers)
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    async with counting_sdk(second, "rpm1", max_retries=0) as (client, sent):
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model=FULL_MODEL,
                messages=SDK_MESSAGES,
                max_tokens=5,
            )
    assert refused.value.code == "rate_limit_exceeded"
    headers = refused.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 61
    assert 0 < int(headers["retry-after-ms"]) <= 61_000
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert sent == ["/v1/chat/completions"]


# ---- max_tokens clamped to what the budget still pays for ------------------------------------


@pytest.mark.parametrize("tenant_id", ["clamp-tok", "clamp-bal"])
async def test_max_tokens_is_clamped_to_what_is_left_then_refused(
    fleet: Fleet, tariffs: dict[str, Tariff], tenant_id: str
) -> None:
    full = tariffs[FULL_MODEL]
    first, second = fleet.pair
    async with http_client() as client:
        clamped = await chat(client, first, tenant_id, model=FULL_MODEL, max_tokens=MAX_TOKENS)
        nothing_left = await chat(client, second, tenant_id, model=FULL_MODEL, max_tokens=1)
    assert clamped.status == 200, clamped.body
    assert clamped.completion_tokens == 10  # what the budget paid for, not the 48 asked
    assert clamped.body["choices"][0]["finish_reason"] == "length"
    assert clamped.cost_nanos == full.cost(10)
    assert_openai_error(nothing_left, 429, "insufficient_quota")
    if tenant_id == "clamp-bal":
        assert await balance_nanos(second, tenant_id) == 0
    else:
        assert await month_budget_left(second, tenant_id) == 0


# ---- an admission whose answer Redis sent too late ------------------------------------------

BUSY_LUA = """
local start = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - start[1]) * 1000000 + (now[2] - start[2]) >= tonumber(ARGV[1])
return 1
"""


async def test_request_refused_on_a_redis_timeout_keeps_no_reservation(
    fleet: Fleet, tariffs: dict[str, Tariff]
) -> None:
    """Redis runs the admission after the gateway gave up on it: the hold must not linger.

    The tenant's balance and monthly budget each pay for exactly one answer at max_tokens.
    """
    full = tariffs[FULL_MODEL]
    first, second = fleet.pair
    async with http_client() as client:  # Redis has the admission script loaded
        assert (await chat(client, first, "warm", model=FULL_MODEL)).status == 200
    blocker = redis.Redis.from_url(fleet.redis_url)
    blocker.ping()  # connected: the script below starts as soon as it is sent
    busy = asyncio.create_task(asyncio.to_thread(blocker.eval, BUSY_LUA, 0, 2_500_000))
    try:
        await asyncio.sleep(0.3)  # Redis is now busy: the admission waits behind the script
        async with http_client() as client:
            timed_out = await chat(client, first, "lost", model=FULL_MODEL)
        assert_openai_error(timed_out, 503, "service_unavailable")
        assert timed_out.seconds < LATENCY_BOUND_S
    finally:
        await busy
        blocker.close()
    await asyncio.sleep(0.6)  # past the store's fail-fast interval
    await month_budget_left(first, "lost")  # the first answered call replays what was queued
    await asyncio.sleep(0.2)

    async with http_client() as client:
        served = await chat(client, second, "lost", model=FULL_MODEL)
    assert served.status == 200, served.body
    assert served.completion_tokens == MAX_TOKENS  # the whole budget was still there
    assert served.cost_nanos == full.cost(MAX_TOKENS)
    assert await balance_nanos(second, "lost") == 0
    assert await month_budget_left(second, "lost") == 0


# ---- Redis dies, freezes and comes back ------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill and freeze without disturbing others."""
    server = RedisServer("redis-server", tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Traffic:
    """Requests sent to each gateway in a loop until stopped, with when each was sent."""

    replies: list[tuple[float, Reply]]

    def of(self, name: str, since: float = 0.0, until: float = float("inf")) -> list[Reply]:
        return [r for t, r in self.replies if r.gateway == name and since <= t < until]


@contextlib.asynccontextmanager
async def traffic(gateways: list[GatewayProcess], tenant_id: str) -> AsyncIterator[Traffic]:
    record = Traffic([])
    stop = asyncio.Event()

    async def caller(client: httpx.AsyncClient, gw: GatewayProcess, index: int) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            reply = await chat(
                client, gw, tenant_id, model=FULL_MODEL, max_tokens=3, user=f"{index}"
            )
            record.replies.append((sent, reply))
            await asyncio.sleep(0.01)

    async with http_client() as client:
        tasks = [asyncio.create_task(caller(client, gw, i)) for gw in gateways for i in range(3)]
        try:
            yield record
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def test_redis_outage_gives_quick_503s_or_fails_open_and_recovers_without_restart(
    tmp_path: Path, tokenizer_dir: Path, own_redis: RedisServer
) -> None:
    steady = [tenant("steady", {"rpm": 10**6, "tpm": 10**9})]
    quotas = {"backend": "redis", "redis_url": own_redis.url, "redis_url_env": None}
    configs = {
        "closed": fleet_config(tmp_path, tokenizer_dir, quotas, steady),
        "open": fleet_config(tmp_path, tokenizer_dir, {**quotas, "on_unavailable": "open"}, steady),
    }
    with gateway_processes(configs, tmp_path) as gateways:
        closed, opened = gateways
        async with traffic(gateways, "steady") as seen:
            await asyncio.sleep(1.0)
            killed = time.monotonic()
            await asyncio.to_thread(own_redis.stop)
            await asyncio.sleep(1.5)
            restarted = time.monotonic()
            await asyncio.to_thread(own_redis.start)
            await asyncio.sleep(1.5)
            frozen = time.monotonic()
            os.kill(own_redis_pid(own_redis), signal.SIGSTOP)
            try:
                await asyncio.sleep(1.5)
            finally:
                os.kill(own_redis_pid(own_redis), signal.SIGCONT)
            thawed = time.monotonic()
            await asyncio.sleep(1.5)
        assert closed.process.poll() is None and opened.process.poll() is None  # no restarts

    for t, reply in seen.replies:
        assert reply.seconds < LATENCY_BOUND_S, (reply.gateway, t - killed, reply.seconds)
        if reply.status != 200:
            assert reply.gateway == "closed"
            assert_openai_error(reply, 503, "service_unavailable")
            assert reply.error["type"] == "service_unavailable"
    before = seen.of("closed", until=killed - 0.5)
    assert before and all(r.status == 200 for r in before)
    # fail closed while Redis is dead or frozen (requests in flight at either edge may pass)
    for since, until in ((killed + 0.3, restarted - 0.3), (frozen + 0.3, thawed - 0.3)):
        outage = seen.of("closed", since, until)
        assert outage and all(r.status == 503 for r in outage), timeline(seen, killed)
    # recovered by itself after each outage, in the same process
    for since, until in ((restarted + 1.0, frozen - 0.3), (thawed + 1.0, float("inf"))):
        after = seen.of("closed", since, until)
        assert after and all(r.status == 200 for r in after), timeline(seen, killed)
    # failing open keeps serving throughout
    served = seen.of("open")
    assert len(served) > 20 and all(r.status == 200 for r in served)
    assert seen.of("open", killed + 0.3, restarted)


def timeline(seen: Traffic, start: float) -> str:
    return " ".join(f"{r.gateway[0]}{t - start:+.2f}:{r.status}" for t, r in seen.replies)


def own_redis_pid(server: RedisServer) -> int:
    process = server._process
    assert process is not None
    return process.pid


# ---- Redis down at start-up --------------------------------------------------------------------


async def admin_call(gw: GatewayProcess, method: str, path: str, **kwargs: Any) -> Reply:
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {ADMIN_KEY}"}) as client:
        started = time.perf_counter()
        response = await client.request(method, gw.url + path, timeout=30, **kwargs)
    seconds = time.perf_counter() - started
    return Reply(gw.name, response.status_code, response.headers, response.json(), seconds)


async def test_gateways_start_with_redis_down_and_open_prepaid_balances_when_it_returns(
    tmp_path: Path, tokenizer_dir: Path, own_redis: RedisServer
) -> None:
    """Redis is down when the gateways start: both start and answer (503s failing closed,
    200s failing open, 503s from the admin API); once Redis is up the configured balance
    is opened and everything spent meanwhile is charged to it, exactly; a restart later
    does not reset the balance."""
    initial = 10**9  # 1 USD in nanos
    prepaid = [tenant("prepaid", {"rpm": 10**6, "tpm": 10**9}, balance=initial)]
    quotas = {
        "backend": "redis",
        "redis_url": own_redis.url,
        "redis_url_env": None,
        "retry_interval_ms": 200,
    }
    configs = {
        "closed": fleet_config(tmp_path, tokenizer_dir, quotas, prepaid),
        "open": fleet_config(
            tmp_path, tokenizer_dir, {**quotas, "on_unavailable": "open"}, prepaid
        ),
    }
    own_redis.stop()
    served: list[Reply] = []
    with gateway_processes(configs, tmp_path) as gateways:
        closed, opened = gateways
        async with http_client() as client:
            for gw in gateways:
                assert (await client.get(gw.url + "/readyz")).status_code == 200
            refused = await chat(client, closed, "prepaid", model=FULL_MODEL, max_tokens=5)
            assert_openai_error(refused, 503, "service_unavailable")
            while_down = await chat(client, opened, "prepaid", model=FULL_MODEL, max_tokens=5)
            assert while_down.status == 200, while_down.body
            served.append(while_down)
            for gw in gateways:
                balance = await admin_call(gw, "GET", "/admin/tenants/prepaid/balance")
                assert_openai_error(balance, 503, "service_unavailable")
                topup = await admin_call(
                    gw, "POST", "/admin/tenants/prepaid/topup", json={"amount": "5"}
                )
                assert_openai_error(topup, 503, "service_unavailable")

            await asyncio.to_thread(own_redis.start)
            await asyncio.sleep(0.3)  # past the fail-fast interval
            for gw in (closed, opened, closed):
                reply = await chat(client, gw, "prepaid", model=FULL_MODEL, max_tokens=5)
                assert reply.status == 200, reply.body
                served.append(reply)
        spent = sum(r.cost_nanos for r in served)
        assert spent > 0

        async def charged() -> bool:
            return await balance_nanos(opened, "prepaid") == initial - spent

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while not await charged():  # noqa: ASYNC110 - replayed by the other process
                    await asyncio.sleep(0.05)
        assert await balance_nanos(opened, "prepaid") == initial - spent
        assert await balance_nanos(closed, "prepaid") == initial - spent

    with gateway_processes({"restarted": configs["closed"]}, tmp_path) as (restarted,):
        assert await balance_nanos(restarted, "prepaid") == initial - spent  # not reset
