"""The official OpenAI SDK against the gateway, over real sockets, with two kinds of backend:
the in-process simulated provider, and a real second process (`maas-gateway simulate`)
reached through the OpenAI-compatible provider."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.config import parse_settings
from gateway.tokens import TokenCounter, TokenizerConfig
from tests.harness import (
    ACME_KEY,
    ACME_LIMITED_KEY,
    PROJECT_ROOT,
    RunningGateway,
    base_config,
    free_port,
    wait_for_http,
)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something about tokens."},
]


@pytest.fixture(scope="module")
def simulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`maas-gateway simulate` as its own process; yields its /v1 URL."""
    tmp = tmp_path_factory.mktemp("sim")
    config = tmp / "sim.yaml"
    fast = {"time_scale": 0, "seed": 3, "output": {"distribution": "uniform", "min": 5, "max": 40}}
    config.write_text(yaml.safe_dump({"sim-mini": fast, "sim-4": fast, "sim-embed": fast}))
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "simulate",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process=process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module", params=["simulated", "upstream"])
async def gateway(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tokenizer_dir: Path,
) -> AsyncIterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp(request.param)
    overrides: dict[str, Any] = {}
    if request.param == "upstream":
        sim_url = request.getfixturevalue("simulator_process")
        overrides["providers"] = [{"name": "sim", "type": "openai_compat", "base_url": sim_url}]
    settings = parse_settings(base_config(tmp, tokenizer_dir, **overrides))
    async with RunningGateway(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path) -> TokenCounter:
    return TokenCounter(TokenizerConfig(dir=tokenizer_dir))


def client(gw: RunningGateway, key: str = ACME_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


async def test_chat_completion(gateway: RunningGateway, counter: TokenCounter) -> None:
    raw = await client(gateway).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=CHAT, max_tokens=30
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    text = completion.choices[0].message.content or ""
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == counter.count_chat("gpt-4o-mini", CHAT)
    assert completion.usage.completion_tokens == counter.count_text("gpt-4o-mini", text)
    assert completion.usage.completion_tokens <= 30
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-maas-currency"] == "USD"
    expected_nanos = completion.usage.prompt_tokens * 150 + completion.usage.completion_tokens * 600
    assert raw.headers["x-maas-cost"] == f"0.{expected_nanos:09d}"
    assert "x-ratelimit-remaining-requests" in raw.headers


async def test_chat_stream_without_usage(gateway: RunningGateway) -> None:
    stream = await client(gateway).chat.completions.create(
        model="mini", messages=CHAT, max_tokens=20, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks, "no chunks"
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.model == "mini" or chunk.model == "gpt-4o-mini" for chunk in chunks)


async def test_chat_stream_with_usage(gateway: RunningGateway, counter: TokenCounter) -> None:
    stream = await client(gateway).chat.completions.create(
        model="gpt-4o-mini",
        messages=CHAT,
        max_tokens=25,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert final.usage.completion_tokens == counter.count_text("gpt-4o-mini", text)
    assert final.usage.prompt_tokens == counter.count_chat("gpt-4o-mini", CHAT)
    extra = final.usage.model_extra or {}
    assert extra["maas"]["currency"] == "USD"


async def test_completions(gateway: RunningGateway, counter: TokenCounter) -> None:
    api = client(gateway)
    result = await api.completions.create(model="gpt-4", prompt="Once upon a time", max_tokens=12)
    assert result.object == "text_completion"
    assert result.usage is not None
    assert result.usage.prompt_tokens == counter.count_prompt("gpt-4", "Once upon a time")
    assert result.usage.completion_tokens == counter.count_text("gpt-4", result.choices[0].text)
    stream = await api.completions.create(
        model="gpt-4",
        prompt=[1, 2, 3, 4],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 4
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == counter.count_text("gpt-4", text)


async def test_embeddings(gateway: RunningGateway, counter: TokenCounter) -> None:
    api = client(gateway)
    inputs = ["hello world", "tokens are the unit"]
    first = await api.embeddings.create(model="text-embedding-3-small", input=inputs)
    again = await api.embeddings.create(
        model="text-embedding-3-small", input=inputs, encoding_format="float"
    )
    assert len(first.data) == 2
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding, abs=1e-6)
    assert first.data[0].embedding != first.data[1].embedding
    assert first.usage.prompt_tokens == counter.count_input("text-embedding-3-small", inputs)


async def test_models_listing_respects_the_key(gateway: RunningGateway) -> None:
    everything = {m.id async for m in client(gateway).models.list()}
    assert {"gpt-4o-mini", "mini", "gpt-4", "text-embedding-3-small"} <= everything
    limited = {m.id async for m in client(gateway, ACME_LIMITED_KEY).models.list()}
    assert limited == {"gpt-4o-mini", "mini"}
    model = await client(gateway).models.retrieve("gpt-4")
    assert model.id == "gpt-4"


async def test_health_and_readiness(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert "x-request-id" in ready.headers
