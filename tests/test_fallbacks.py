"""Fallbacks per request, over real sockets: when every deployment of a model fails a
request before its first byte, that same request goes on to the model's `fallbacks`, within
`max_attempts` and the retry budget, and is billed once. A connection the upstream resets
(its process SIGKILLed mid-request) is a 502, not a timeout. Upstreams are
`maas-gateway simulate` processes behind the OpenAI-compatible provider; callers use the
official SDK with its retries off."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.config import parse_settings
from gateway.tokens import TokenCounter, TokenizerConfig
from tests.harness import RunningGateway, base_config
from tests.test_resilience import (
    FAST,
    MODEL,
    SLOW,
    Simulator,
    chat,
    ledger_rows,
    sdk,
    simulator,
    upstream,
)

pytestmark = pytest.mark.timeout(120)

FALLBACK = "gpt-4"
FALLBACK_INPUT_NANOS, FALLBACK_OUTPUT_NANOS = 30_000, 60_000
INPUT_NANOS, OUTPUT_NANOS = 150, 600  # gpt-4o-mini's, which the caller asked for


def settings_with_fallback(
    tmp: Path, tokenizer_dir: Path, broken: Simulator, healthy: Simulator, **retry: Any
) -> Any:
    config = base_config(tmp, tokenizer_dir)
    config["providers"] += [upstream("broken", broken), upstream("healthy", healthy)]
    others = [m for m in config["models"] if m["name"] not in (MODEL, FALLBACK)]
    config["models"] = [
        {
            "name": MODEL,
            "deployments": [{"name": "broken", "provider": "broken", "model": "sim-mini"}],
            "fallbacks": [FALLBACK],
        },
        {
            "name": FALLBACK,
            "deployments": [{"name": "healthy", "provider": "healthy", "model": "sim-mini"}],
        },
        *others,
    ]
    config["routing"] = {
        "retry": {"max_attempts": 3, "backoff_base_s": 0.01, "budget_min_per_s": 100, **retry},
        # The breaker stays closed throughout: the fallback is taken per request.
        "breaker": {"consecutive_failures": 1000, "min_requests": 1000},
    }
    return parse_settings(config)


async def served(client: openai.AsyncOpenAI, i: int, stream: bool) -> tuple[str, int, int]:
    """(request id, prompt tokens, output tokens) of one successful request."""
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=chat(i), max_tokens=30
        )
        completion = raw.parse()
        assert completion.usage is not None and completion.model == MODEL
        usage = completion.usage
        return raw.headers["x-request-id"], usage.prompt_tokens, usage.completion_tokens
    raw_stream = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=chat(i),
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in raw_stream.parse()]
    final = chunks[-1].usage
    assert final is not None and all(c.model == MODEL for c in chunks)
    return raw_stream.headers["x-request-id"], final.prompt_tokens, final.completion_tokens


async def simulator_count(sim: Simulator, outcome: str) -> float:
    async with httpx.AsyncClient() as http:
        return await sim.metric(http, "maas_simulator_requests_total", outcome=outcome)


async def test_a_failed_request_goes_on_to_the_fallback_and_is_billed_once(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    counter = TokenCounter(TokenizerConfig(dir=tokenizer_dir))
    failing = {**FAST, "errors": {"rate_500": 1.0}}
    async with (
        simulator(tmp_path, "broken", failing) as broken,
        simulator(tmp_path, "healthy", FAST) as healthy,
    ):
        settings = settings_with_fallback(tmp_path, tokenizer_dir, broken, healthy)
        async with RunningGateway(settings) as gw:
            client = sdk(gw)
            told = [await served(client, i, stream=i % 2 == 1) for i in range(6)]
            rows = await ledger_rows(gw)
        failed = await simulator_count(broken, "server_error")
        succeeded = await simulator_count(healthy, "success")

    assert sorted(rows) == sorted(t[0] for t in told), "one ledger row per request"
    for i, (request_id, prompt, output) in enumerate(told):
        row = rows[request_id]
        # One attempt at the failed deployment, then the fallback; never the failed one twice.
        assert (row["status_code"], row["attempts"]) == (200, 2)
        assert (row["model"], row["deployment"], row["provider"]) == (MODEL, "healthy", "healthy")
        assert prompt == counter.count_chat(MODEL, [dict(m) for m in chat(i)])
        assert (row["uncached_input"], row["output"]) == (prompt, output)
        # Billed at the prices of the model the caller asked for.
        assert row["cost_nanos"] == prompt * INPUT_NANOS + output * OUTPUT_NANOS
    assert (failed, succeeded) == (6, 6)


@pytest.mark.parametrize(
    "retry",
    [{"max_attempts": 1}, {"budget_min_per_s": 0, "budget_ratio": 0}],
    ids=["max_attempts", "retry_budget"],
)
async def test_the_fallback_is_within_the_retry_limits(
    tmp_path: Path, tokenizer_dir: Path, retry: dict[str, Any]
) -> None:
    failing = {**FAST, "errors": {"rate_500": 1.0}}
    async with (
        simulator(tmp_path, "broken", failing) as broken,
        simulator(tmp_path, "healthy", FAST) as healthy,
    ):
        settings = settings_with_fallback(tmp_path, tokenizer_dir, broken, healthy, **retry)
        async with RunningGateway(settings) as gw:
            with pytest.raises(openai.InternalServerError) as caught:
                await sdk(gw).chat.completions.create(model=MODEL, messages=chat(0))
            rows = await ledger_rows(gw)
        asked = await simulator_count(healthy, "success")
    assert caught.value.status_code in (500, 502, 503)
    (row,) = rows.values()
    assert (row["status_code"], row["attempts"], row["deployment"]) == (
        caught.value.status_code,
        1,
        "broken",
    )
    assert row["cost_nanos"] == 0
    assert asked == 0


async def test_an_upstream_killed_mid_request_is_a_502_not_a_timeout(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """Retries off: the caller waiting on an upstream that dies gets 502 at once."""
    async with simulator(tmp_path, "doomed", SLOW) as doomed:
        config = base_config(tmp_path, tokenizer_dir)
        config["providers"].append(upstream("doomed", doomed))
        config["models"][0]["deployments"] = [
            {"name": "doomed", "provider": "doomed", "model": "sim-mini"}
        ]
        config["routing"] = {"retry": {"max_attempts": 1}}
        async with RunningGateway(parse_settings(config)) as gw:
            request = asyncio.create_task(
                sdk(gw).chat.completions.with_raw_response.create(
                    model=MODEL, messages=chat(0), max_tokens=400
                )
            )
            await asyncio.sleep(0.5)
            assert not request.done()
            doomed.kill()
            with pytest.raises(openai.APIStatusError) as caught:
                await asyncio.wait_for(request, 10)
            rows = await ledger_rows(gw)
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert body["code"] == "upstream_unreachable", body
    (row,) = rows.values()
    assert (row["status_code"], row["error_type"], row["cost_nanos"]) == (
        502,
        "upstream_unreachable",
        0,
    )
