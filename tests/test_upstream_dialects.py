"""Conformance with the OpenAI dialects of the inference servers and clouds people run.

Each upstream's answers are wire transcripts (`tests/transcripts/`, written from each
server's source or documented format) replayed byte for byte, in randomly segmented reads,
by a stub over a real socket, to a `maas-gateway serve` process; callers use the official
OpenAI SDK. For every transcript, streamed and not, the test asserts what the caller got
(text, reasoning, usage, cost) and the ledger row: uncached input, cached input, output and
reasoning tokens, and the cost to the nano-unit, computed here from the configured prices.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.tokens import TokenCounter, TokenizerConfig
from providers.base import ProviderRequest, TokenUsage
from providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider
from tests.harness import ACME_KEY, base_config, gateway_process
from tests.replay_upstream import ReplayUpstream, replay_upstream

pytestmark = pytest.mark.timeout(180)

# Public model per dialect: (upstream dialect, prices per million tokens).
MODELS: dict[str, tuple[str, dict[str, str]]] = {
    "qwen-vllm": ("vllm", {"input": "0.40", "cached_input": "0.10", "output": "1.20"}),
    "r1-sglang": ("sglang", {"input": "0.55", "cached_input": "0.14", "output": "2.19"}),
    "llama-cpp": ("llamacpp", {"input": "0.05", "cached_input": "0.01", "output": "0.25"}),
    "llama-tgi": ("tgi", {"input": "0.18", "output": "0.18"}),
    "qwen-ollama": ("ollama", {"input": "0.02", "output": "0.06"}),
    "deepseek-reasoner": ("deepseek", {"input": "0.56", "cached_input": "0.07", "output": "1.68"}),
    "doubao-seed": ("ark", {"input": "0.11", "cached_input": "0.022", "output": "1.10"}),
    "o4-mini": ("openai", {"input": "1.10", "cached_input": "0.275", "output": "4.40"}),
    "tiny-starlette": ("sse-starlette", {"input": "0.01", "output": "0.02"}),
}


@dataclass(frozen=True)
class Case:
    """One transcript and what must come of it. `usage` is (uncached, cached, output,
    reasoning) as the upstream reported it; None when the gateway must count."""

    model: str
    case: str
    stream: bool
    content: str
    reasoning: str = ""
    usage: tuple[int, int, int, int] | None = None
    error: str | None = None  # the error the caller gets mid-stream (its message starts so)
    cut: bool = False  # the upstream failed: only delivered output is billed
    code: str | None = None  # the `code` of the error the caller gets


CASES = [
    Case("qwen-vllm", "chat", True, "Hello! How can I help?", usage=(21, 0, 6, 0)),
    Case("qwen-vllm", "chat", False, "Hello! How can I help?", usage=(21, 0, 6, 0)),
    Case("qwen-vllm", "cached", True, "Cached prefix reused.", usage=(8, 32, 5, 0)),
    # The body ended cleanly, but with no [DONE], usage or finish_reason: a cut.
    Case(
        "qwen-vllm",
        "closed",
        True,
        "Hello!",
        error="Upstream replay ended the stream early.",
        cut=True,
        code="stream_cut",
    ),
    Case("r1-sglang", "chat", True, "2 + 2 = 4", "Two plus two.", usage=(10, 8, 12, 0)),
    Case("r1-sglang", "chat", False, "2 + 2 = 4", "Two plus two.", usage=(10, 8, 12, 0)),
    Case(
        "r1-sglang",
        "error",
        True,
        "Partial answer",
        "Think.",
        error="The engine was aborted: out of KV cache memory.",
        cut=True,
        code="InternalServerError",
    ),
    Case("llama-cpp", "chat", True, "The sky is blue.", usage=(9, 16, 4, 0)),
    Case("llama-cpp", "chat", False, "The sky is blue.", usage=(9, 16, 4, 0)),
    Case("llama-cpp", "nodone", True, "The sky is blue.", usage=(9, 16, 4, 0)),
    Case(
        "llama-cpp",
        "error",
        True,
        "The sky",
        error="Context size has been exceeded.",
        cut=True,
        code="exceed_context_size_error",
    ),
    Case("llama-cpp", "cut", True, "The sky", error="Upstream replay", cut=True, code="stream_cut"),
    Case("llama-tgi", "chat", True, "Paris is the capital.", usage=(14, 0, 4, 0)),
    Case("llama-tgi", "chat", False, "Paris is the capital.", usage=(14, 0, 4, 0)),
    Case(
        "llama-tgi",
        "error",
        True,
        "Paris",
        error="Request failed during generation: Server error: CUDA out of memory.",
        cut=True,
        code="generation",
    ),
    Case("qwen-ollama", "chat", True, "Hi there!", "Greet back.", usage=(11, 0, 9, 0)),
    Case("qwen-ollama", "chat", False, "Hi there!", "Greet back.", usage=(11, 0, 9, 0)),
    Case(
        "deepseek-reasoner",
        "reasoner",
        True,
        "9.8 is larger.",
        "9.11 vs 9.8: compare tenths.",
        usage=(14, 50, 30, 22),
    ),
    Case(
        "deepseek-reasoner",
        "reasoner",
        False,
        "9.8 is larger.",
        "9.11 vs 9.8: compare tenths.",
        usage=(14, 50, 30, 22),
    ),
    Case("doubao-seed", "thinking", True, "今天晴。", "用户在问天气。", usage=(24, 96, 25, 19)),
    Case("doubao-seed", "thinking", False, "今天晴。", "用户在问天气。", usage=(24, 96, 25, 19)),
    Case("o4-mini", "chat", True, "Use a binary search.", usage=(132, 1408, 210, 192)),
    Case("o4-mini", "chat", False, "Use a binary search.", usage=(132, 1408, 210, 192)),
    Case(
        "o4-mini",
        "error",
        True,
        "Use",
        error="The server had an error while processing your request.",
        cut=True,
        code="server_error",
    ),
    Case("tiny-starlette", "chat", True, "One two three"),
]
SEED = 12
REPEATS = 3
"""Each streamed transcript is replayed this many times, each in its own segmentation
(drawn from `SEED` and the request's number, so a failure replays)."""


def unit_nanos(price: str) -> int:
    """Nano-units per token of a price per million tokens (exact for these prices)."""
    value = Decimal(price) * 1_000_000_000 / 1_000_000
    assert value == value.to_integral_value()
    return int(value)


def expected_cost(model: str, uncached: int, cached: int, output: int) -> int:
    prices = MODELS[model][1]
    cached_price = prices.get("cached_input", prices["input"])
    return (
        uncached * unit_nanos(prices["input"])
        + cached * unit_nanos(cached_price)
        + output * unit_nanos(prices["output"])
    )


def config(tmp: Path, tokenizer_dir: Path, upstream: ReplayUpstream) -> dict[str, Any]:
    settings = base_config(tmp, tokenizer_dir)
    settings["providers"].append(
        {"name": "replay", "type": "openai_compat", "base_url": upstream.url}
    )
    for name, (dialect, prices) in MODELS.items():
        settings["models"].append(
            {"name": name, "deployments": [{"provider": "replay", "model": dialect}]}
        )
        settings["pricing"]["models"][name] = [{"effective_from": "2026-01-01", "prices": prices}]
    settings["routing"] = {"retry": {"max_attempts": 1}}
    return settings


@dataclass
class Seen:
    """What the caller got."""

    request_id: str
    content: str
    reasoning: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: int | None = None
    error: str | None = None
    error_body: Any = None


def _nanos(amount: str) -> int:
    return int(Decimal(amount) * 1_000_000_000)


async def call(client: openai.AsyncOpenAI, case: Case) -> Seen:
    messages: Any = [{"role": "user", "content": case.case}]
    if not case.stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=case.model, messages=messages
        )
        completion = raw.parse()
        message = completion.choices[0].message
        assert completion.usage is not None
        extra = message.model_extra or {}
        return Seen(
            raw.headers["x-request-id"],
            message.content or "",
            extra.get("reasoning_content") or extra.get("reasoning") or "",
            completion.usage.prompt_tokens,
            completion.usage.completion_tokens,
            _nanos(raw.headers["x-maas-cost"]),
        )
    raw_stream = await client.chat.completions.with_raw_response.create(
        model=case.model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    seen = Seen(raw_stream.headers["x-request-id"], "", "")
    try:
        async for chunk in raw_stream.parse():
            assert chunk.model == case.model  # passed through, spliced or rewritten
            for choice in chunk.choices:
                seen.content += choice.delta.content or ""
                extra = choice.delta.model_extra or {}
                seen.reasoning += extra.get("reasoning_content") or extra.get("reasoning") or ""
            if chunk.usage is not None and not chunk.choices:
                seen.prompt_tokens = chunk.usage.prompt_tokens
                seen.completion_tokens = chunk.usage.completion_tokens
                seen.cost = _nanos((chunk.usage.model_extra or {})["maas"]["cost"])
    except openai.APIError as exc:
        seen.error = exc.message
        seen.error_body = exc.body
    return seen


def ledger_row(tmp: Path, request_id: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(sqlite3.OperationalError):
            with contextlib.closing(sqlite3.connect(tmp / "ledger.db")) as db:
                db.row_factory = sqlite3.Row
                rows = list(
                    db.execute("SELECT * FROM ledger_entries WHERE request_id = ?", (request_id,))
                )
            if rows:
                assert len(rows) == 1
                return dict(rows[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"no ledger row for {request_id}")
        time.sleep(0.05)


@contextlib.asynccontextmanager
async def gateway(
    tmp: Path, tokenizer_dir: Path, seed: int
) -> AsyncIterator[tuple[openai.AsyncOpenAI, ReplayUpstream]]:
    async with replay_upstream(seed) as upstream:
        settings = config(tmp, tokenizer_dir, upstream)
        with gateway_process(settings, tmp) as (url, _process):
            client = openai.AsyncOpenAI(
                base_url=url + "/v1", api_key=ACME_KEY, max_retries=0, timeout=30
            )
            async with client:
                yield client, upstream


async def test_every_dialect_is_relayed_and_billed_exactly(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    counter = TokenCounter(TokenizerConfig(dir=tokenizer_dir))
    checked = 0
    async with gateway(tmp_path, tokenizer_dir, SEED) as (client, upstream):
        for repeat in range(REPEATS):
            for case in CASES:
                if not case.stream and repeat:
                    continue  # a JSON body is one read whatever the segmentation
                where = f"{case.model}/{case.case}/{'stream' if case.stream else 'json'}/{repeat}"
                seen = await call(client, case)
                row = await asyncio.to_thread(ledger_row, tmp_path, seen.request_id)
                assert seen.content == case.content, where
                assert seen.reasoning == case.reasoning, where
                assert row["model"] == case.model and row["deployment"] == (
                    f"replay/{MODELS[case.model][0]}"
                ), where
                assert row["attempts"] == 1 and row["stream"] == int(case.stream), where
                if case.error is not None:
                    assert seen.error is not None and seen.error.startswith(case.error), (
                        where,
                        seen.error,
                    )
                    assert seen.error_body == {
                        "message": seen.error,
                        "type": "upstream_error",
                        "param": None,
                        "code": case.code,
                    }, where
                    # The upstream failed mid-stream: the output delivered is billed, the
                    # prompt is not; the error text is never billed.
                    delivered = case.reasoning + case.content
                    usage = (0, 0, counter.count_text(case.model, delivered), 0)
                    assert (row["status_code"], row["stream_cut_by"]) == (502, "upstream"), where
                elif case.usage is None:  # no usage reported: the gateway counts
                    prompt = counter.count_chat(
                        case.model, [{"role": "user", "content": case.case}]
                    )
                    usage = (prompt, 0, counter.count_text(case.model, case.content), 0)
                    assert (row["status_code"], row["stream_cut_by"]) == (200, None), where
                else:
                    usage = case.usage
                    assert (row["status_code"], row["stream_cut_by"]) == (200, None), where
                uncached, cached, output, _reasoning = usage
                got = (row["uncached_input"], row["cached_input"], row["output"], row["reasoning"])
                assert got == usage, where
                cost = expected_cost(case.model, uncached, cached, output)
                assert row["cost_nanos"] == cost, where
                if case.error is None:
                    assert seen.prompt_tokens == uncached + cached, where
                    assert seen.completion_tokens == output, where
                    assert seen.cost == cost, where
                checked += 1
            # The gateway asked every upstream for its usage in streams.
            streamed = [r for r in upstream.requests if r.get("stream")]
            assert streamed and all(
                r["stream_options"] == {"include_usage": True} for r in streamed
            )
    assert checked == REPEATS * sum(c.stream for c in CASES) + sum(not c.stream for c in CASES)


async def test_a_stream_not_asked_for_usage_has_no_usage_key(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The gateway asks every upstream for usage; a caller that did not gets its chunks as
    OpenAI sends them then, without a `usage` key, whatever the upstream put in them (OpenAI,
    SGLang, TGI and Ark write `"usage":null` in every chunk), and with the text and the
    public model name intact."""
    cases = [c for c in CASES if c.stream and c.error is None]
    async with gateway(tmp_path, tokenizer_dir, SEED) as (client, _upstream):
        url = str(client.base_url).rstrip("/") + "/chat/completions"
        headers = {"authorization": f"Bearer {ACME_KEY}"}
        async with httpx.AsyncClient(timeout=30) as http:
            for repeat in range(REPEATS):
                for case in cases:
                    where = f"{case.model}/{case.case}/{repeat}"
                    body = {
                        "model": case.model,
                        "messages": [{"role": "user", "content": case.case}],
                        "stream": True,
                    }
                    answer = await http.post(url, json=body, headers=headers)
                    assert answer.status_code == 200, where
                    blocks = answer.content.split(b"\n\n")
                    assert blocks[-2:] == [b"data: [DONE]", b""], where
                    content = ""
                    for block in blocks[:-2]:
                        assert block.startswith(b"data: "), where
                        chunk = json.loads(block[6:])
                        assert "usage" not in chunk, (where, chunk)
                        assert chunk["model"] == case.model, where
                        for choice in chunk["choices"]:
                            content += choice["delta"].get("content") or ""
                    assert content == case.content, where


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {"prompt_tokens": 21, "completion_tokens": 6, "prompt_tokens_details": None},
            (21, 0, 6, 0),
        ),
        (
            {
                "prompt_cache_hit_tokens": 50,
                "prompt_cache_miss_tokens": 14,
                "completion_tokens": 30,
            },
            (14, 50, 30, 0),
        ),
        (
            {
                "prompt_tokens": 120,
                "completion_tokens": 25,
                "prompt_tokens_details": {"cached_tokens": 96},
                "completion_tokens_details": {"reasoning_tokens": 19},
            },
            (24, 96, 25, 19),
        ),
        (
            {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 9},
            },
            (0, 5, 1, 0),
        ),
    ],
)
def test_usage_objects_normalise(usage: dict[str, Any], expected: tuple[int, ...]) -> None:
    got = TokenUsage.from_openai(usage)
    assert (got.uncached_input, got.cached_input, got.output, got.reasoning) == expected
    assert got.source == "upstream"


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 50, "completion_tokens": 2, "cache_creation_input_tokens": 30},
        {
            "prompt_tokens": 50,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 30},
        },
    ],
)
def test_cache_writes_are_read_at_the_seam(usage: dict[str, Any]) -> None:
    got = TokenUsage.from_openai(usage)
    assert (got.uncached_input, got.cache_written, got.output) == (50, 30, 2)


async def test_events_of_one_read_come_as_one_chunks_with_typed_usage() -> None:
    """A provider hands a stream over one upstream read at a time: every event of a read in
    one `Chunks` (the gateway sends it in one write), its usage typed."""
    async with replay_upstream(whole=True) as upstream:
        provider = OpenAICompatProvider("replay", OpenAICompatConfig(base_url=upstream.url))
        try:
            for dialect, case in (
                ("openai", "chat"),
                ("sse-starlette", "chat"),
                ("llamacpp", "nodone"),
            ):
                body = {"model": dialect, "messages": [{"role": "user", "content": case}]}
                request = ProviderRequest("chat.completions", dialect, {**body, "stream": True})
                response = await provider.send(request)
                stream = response.stream
                assert stream is not None
                reads = [read async for read in stream]
                assert len(reads) == 1 and len(reads[0].raw) > 3, dialect
                assert len(reads[0].views) == len(reads[0].raw) == len(reads[0].objects())
                reported = [c["usage"] for c in reads[0].objects() if c.get("usage")]
                usage = reads[0].usage
                assert usage == (TokenUsage.from_openai(reported[-1]) if reported else None)
                assert usage is None or usage.output > 0
        finally:
            await provider.aclose()
