"""OpenAI's Responses API and Anthropic's Messages API through the official SDKs, unmodified
but for base_url and key, against `maas-gateway serve` processes over real sockets: one on
the simulated provider, one on a `maas-gateway simulate` process reached as an
OpenAI-compatible upstream. What each SDK reports as usage is the ledger row, to the token
and nano-unit, and the invoice adds them up."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.store.schema import LedgerEntry
from gateway.auth import hash_key
from gateway.config import parse_settings
from gateway.tokens import TokenCounter, TokenizerConfig
from tests.harness import (
    ACME_KEY,
    ADMIN_KEY,
    SLOW_SIMULATOR,
    RunningGateway,
    base_config,
    gateway_process,
    running_gateway,
)
from tests.test_openai_api import simulator_process  # noqa: F401 - a fixture used here

INITECH_KEY = "sk-test-initech-00000000000000000000000000000000000"
TIGHT_KEY = "sk-test-tight-0000000000000000000000000000000000000"
BROKE_KEY = "sk-test-broke-0000000000000000000000000000000000000"
MODEL = "gpt-4o-mini"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class Served:
    """A running gateway process and its SQLite ledger."""

    def __init__(self, url: str, db: Path) -> None:
        self.url = url
        self.db = db

    def row(self, request_id: str) -> dict[str, Any]:
        """The ledger row of a request (the ledger writes in batches: wait for it)."""
        deadline = time.monotonic() + 10
        while True:
            with sqlite3.connect(self.db) as db:
                db.row_factory = sqlite3.Row
                found = db.execute(
                    "SELECT * FROM ledger_entries WHERE request_id = ?", (request_id,)
                ).fetchone()
            if found is not None:
                return dict(found)
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger row for {request_id}")
            time.sleep(0.05)

    def rows(self, tenant: str) -> list[dict[str, Any]]:
        with sqlite3.connect(self.db) as db:
            db.row_factory = sqlite3.Row
            query = "SELECT * FROM ledger_entries WHERE tenant_id = ? ORDER BY started_at"
            return [dict(r) for r in db.execute(query, (tenant,)).fetchall()]

    def openai(self, key: str = INITECH_KEY, retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=retries)

    def anthropic(self, key: str = INITECH_KEY, retries: int = 0) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=retries)


def _tenant(tenant_id: str, key: str, limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": tenant_id,
        "limits": limits,
        "keys": [{"id": f"{tenant_id}-main", "hash": hash_key(key)}],
    }


@pytest.fixture(scope="module", params=["simulated", "upstream"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("apis-" + request.param)
    overrides: dict[str, Any] = {"ledger": {"flush_interval_ms": 20}}
    if request.param == "upstream":
        sim_url = request.getfixturevalue("simulator_process")
        overrides["providers"] = [{"name": "sim", "type": "openai_compat", "base_url": sim_url}]
    config = base_config(tmp, tokenizer_dir, **overrides)
    config["tenants"] += [
        _tenant("initech", INITECH_KEY, {"rpm": 100000, "tpm": 100000000}),
        _tenant("tight", TIGHT_KEY, {"rpm": 2, "tpm": 100000000}),
        _tenant("broke", BROKE_KEY, {"rpm": 100000, "tokens_per_day": 10}),
    ]
    with gateway_process(config, tmp, name=request.param) as (url, _):
        yield Served(url, tmp / "ledger.db")


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path) -> TokenCounter:
    return TokenCounter(TokenizerConfig(dir=tokenizer_dir))


def _assert_row_is(
    row: dict[str, Any], endpoint: str, input_: int, cached: int, output: int
) -> None:
    assert row["endpoint"] == endpoint
    assert row["status_code"] == 200
    assert (row["uncached_input"] + row["cached_input"], row["cached_input"], row["output"]) == (
        input_,
        cached,
        output,
    )
    assert row["cost_nanos"] == row["uncached_input"] * 150 + row["cached_input"] * 75 + (
        row["output"] * 600
    )


def _request_id(object_id: str) -> str:
    return "req_" + object_id.split("_", 1)[1]


def test_responses_create_tool_and_follow_up(served: Served, counter: TokenCounter) -> None:
    client = served.openai()
    first = client.responses.create(
        model=MODEL,
        instructions="You are terse.",
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=60,
    )
    assert first.object == "response" and first.status == "completed"
    assert first.id.startswith("resp_") and first.model == MODEL
    text = first.output_text
    assert text and first.usage is not None
    system = {"role": "system", "content": "You are terse."}
    asked = {"role": "user", "content": "What is the weather in Paris?"}
    # The simulated backends report usage (the ledger's truth) and do not count tools.
    assert first.usage.input_tokens == counter.count_chat(MODEL, [system, asked])
    assert first.usage.output_tokens == counter.count_text(MODEL, text)
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    _assert_row_is(
        served.row(_request_id(first.id)),
        "responses",
        first.usage.input_tokens,
        first.usage.input_tokens_details.cached_tokens,
        first.usage.output_tokens,
    )

    # The follow-up continues the stored conversation: a call and its result, then a question.
    follow_input: list[Any] = [
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
        {"role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]},
    ]
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=follow_input,
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert second.previous_response_id == first.id and second.usage is not None
    # ... exactly as if the whole conversation had been sent again.
    replay = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": text},
            *follow_input,
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        store=False,
    )
    assert replay.usage is not None
    assert second.usage.input_tokens == replay.usage.input_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    _assert_row_is(
        served.row(_request_id(second.id)),
        "responses",
        second.usage.input_tokens,
        0,
        second.usage.output_tokens,
    )


def test_responses_stream(served: Served, counter: TokenCounter) -> None:
    client = served.openai()
    kinds: list[str] = []
    deltas: list[str] = []
    with client.responses.stream(
        model=MODEL, input="Stream a sentence, please.", max_output_tokens=100
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.output_text == "".join(deltas) and final.usage is not None
    assert final.usage.output_tokens == counter.count_text(MODEL, final.output_text)
    row = served.row(_request_id(final.id))
    assert row["stream"]
    _assert_row_is(row, "responses", final.usage.input_tokens, 0, final.usage.output_tokens)
    # Stored: the same response comes back by id.
    again = client.responses.retrieve(final.id)
    assert again.output_text == final.output_text and again.usage == final.usage


def test_stored_responses_belong_to_their_tenant(served: Served) -> None:
    mine = served.openai()
    made = mine.responses.create(
        model=MODEL, input="Remember me.", text={"format": {"type": "json_object"}}
    )
    assert made.text is not None and made.text.format is not None
    assert made.text.format.type == "json_object"
    theirs = served.openai(ACME_KEY)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(made.id)
    with pytest.raises(openai.BadRequestError) as refused:
        theirs.responses.create(model=MODEL, input="Go on.", previous_response_id=made.id)
    assert refused.value.param == "previous_response_id"
    unstored = mine.responses.create(model=MODEL, input="Forget me.", store=False)
    with pytest.raises(openai.NotFoundError):
        mine.responses.retrieve(unstored.id)
    assert mine.responses.retrieve(made.id).id == made.id
    mine.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        mine.responses.retrieve(made.id)


def test_messages_create_and_count_tokens(served: Served, counter: TokenCounter) -> None:
    client = served.anthropic()
    messages: list[Any] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"},
                {"type": "text", "text": "Summarise."},
            ],
        },
    ]
    tools: list[Any] = [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": WEATHER["parameters"],
        }
    ]
    reply = client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=100,
        system="You are terse.",
        messages=messages,
        tools=tools,
        stop_sequences=["\n\n\n"],
    )
    message = reply.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.stop_reason == "end_turn"
    text = "".join(b.text for b in message.content if b.type == "text")
    usage = message.usage
    assert usage.input_tokens > 0
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (0, 0)
    assert usage.output_tokens == counter.count_text(MODEL, text)
    assert "x-ratelimit-remaining-requests" in reply.headers
    row = served.row(_request_id(message.id))
    _assert_row_is(row, "messages", usage.input_tokens, 0, usage.output_tokens)
    assert reply.headers["x-maas-cost"] == f"0.{row['cost_nanos']:09d}"
    # count_tokens counts offline what the gateway admits by; plain text is counted alike
    # upstream (the simulators do not count tools).
    plain: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "Count me."}]}]
    raw_count = client.messages.with_raw_response.count_tokens(
        model=MODEL, system="Be brief.", messages=plain
    )
    counted = raw_count.parse()
    answered = client.messages.create(
        model=MODEL, max_tokens=20, system="Be brief.", messages=plain
    )
    assert counted.input_tokens == answered.usage.input_tokens
    counted_with_tools = client.messages.count_tokens(
        model=MODEL, system="You are terse.", messages=messages, tools=tools
    )
    system = {"role": "system", "content": "You are terse."}
    chat_tools = [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["input_schema"],
            },
        }
        for t in tools
    ]
    translated = [
        system,
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny, 21 C"},
        {"role": "user", "content": "Summarise."},
    ]
    assert counted_with_tools.input_tokens == counter.count_chat(MODEL, translated, chat_tools)
    # Recorded, free: counting is not using.
    count_row = served.row(raw_count.headers["request-id"])
    assert (count_row["endpoint"], count_row["status_code"]) == ("messages.count_tokens", 200)
    assert (count_row["cost_nanos"], count_row["uncached_input"], count_row["output"]) == (0, 0, 0)


def test_messages_stream(served: Served, counter: TokenCounter) -> None:
    client = served.anthropic()
    kinds: list[str] = []
    with client.messages.stream(
        model=MODEL,
        max_tokens=8,
        messages=[{"role": "user", "content": "Tell me a long story."}],
    ) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert final.stop_reason == "max_tokens"
    text = "".join(b.text for b in final.content if b.type == "text")
    assert final.usage.output_tokens == counter.count_text(MODEL, text) == 8
    prompt = counter.count_chat(MODEL, [{"role": "user", "content": "Tell me a long story."}])
    assert final.usage.input_tokens == prompt
    row = served.row(_request_id(final.id))
    assert row["stream"]
    _assert_row_is(row, "messages", prompt, 0, 8)
    # The raw stream carries Anthropic's `ping`.
    with httpx.stream(
        "POST",
        served.url + "/v1/messages",
        headers={"x-api-key": INITECH_KEY, "anthropic-version": "2023-06-01"},
        json={
            "model": MODEL,
            "max_tokens": 5,
            "stream": True,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    ) as raw:
        body = raw.read().decode()
    assert "event: ping\n" in body and body.index("event: message_start") < body.index(
        "event: ping"
    )


def test_invoice_is_the_sum_of_what_the_sdks_reported(served: Served) -> None:
    """A fresh tenant's four calls, one per API and mode: the invoice's token lines and exact
    total are the sum of the usage the SDKs reported and of the ledger rows' costs."""
    tenant = "umbrella" + str(time.monotonic_ns())
    with httpx.Client(
        base_url=served.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ) as admin:
        assert admin.post("/admin/tenants", json={"id": tenant}).status_code == 201
        made = admin.post(f"/admin/tenants/{tenant}/keys", json={"name": "k"}).json()
        key = made["key"]
        oa, an = served.openai(key), served.anthropic(key)
        reported: list[tuple[int, int]] = []
        one = oa.responses.create(model=MODEL, input="One.")
        assert one.usage is not None
        reported.append((one.usage.input_tokens, one.usage.output_tokens))
        with oa.responses.stream(model=MODEL, input="Two.") as stream:
            two = stream.get_final_response()
        assert two.usage is not None
        reported.append((two.usage.input_tokens, two.usage.output_tokens))
        three = an.messages.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "3"}]
        )
        reported.append((three.usage.input_tokens, three.usage.output_tokens))
        with an.messages.stream(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "4"}]
        ) as stream:
            four = stream.get_final_message()
        reported.append((four.usage.input_tokens, four.usage.output_tokens))
        rows = [served.row(_request_id(x)) for x in (one.id, two.id, three.id, four.id)]
        month = datetime.now(UTC).strftime("%Y-%m")
        invoice = admin.get(f"/admin/invoices/{tenant}/{month}").json()
    quantities: dict[str, int] = {}
    for line in invoice["lines"]:
        quantities[line["token_kind"]] = quantities.get(line["token_kind"], 0) + line["quantity"]
    assert quantities.get("uncached_input", 0) == sum(i for i, _ in reported)
    assert quantities.get("output", 0) == sum(o for _, o in reported)
    assert invoice["exact_nanos"] == sum(r["cost_nanos"] for r in rows) > 0
    assert sorted(r["endpoint"] for r in rows) == ["messages", "messages", "responses", "responses"]


def test_rate_limits_and_budgets(served: Served) -> None:
    """As on Chat Completions: headers on answers, 429s with retry hints in each API's shape;
    a spent budget says `x-should-retry: false` and neither SDK retries it."""
    oa = served.openai(TIGHT_KEY)
    an = served.anthropic(TIGHT_KEY)
    ok = oa.responses.with_raw_response.create(model=MODEL, input="a")
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    an.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "b"}])
    with pytest.raises(openai.RateLimitError) as limited:
        oa.responses.create(model=MODEL, input="c")
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    with pytest.raises(anthropic.RateLimitError) as limited_too:
        an.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "d"}])
    body = limited_too.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "rate_limit_error"
    assert "x-ratelimit-remaining-requests" in limited_too.value.response.headers

    spender = served.anthropic(BROKE_KEY)  # the budget's last tokens are granted, then spent
    spender.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "e"}])
    time.sleep(0.3)
    before = len(served.rows("broke"))
    with pytest.raises(anthropic.RateLimitError) as spent:
        served.anthropic(BROKE_KEY, retries=3).messages.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "e"}]
        )
    assert spent.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.RateLimitError) as spent_too:
        served.openai(BROKE_KEY, retries=3).responses.create(model=MODEL, input="f")
    assert spent_too.value.code == "insufficient_quota"
    time.sleep(0.3)
    refused = served.rows("broke")[before:]
    assert [(r["endpoint"], r["status_code"], r["cost_nanos"]) for r in refused] == [
        ("messages", 429, 0),
        ("responses", 429, 0),
    ]  # one row each: the SDKs did not retry


def test_bad_input_gets_each_apis_own_shape(served: Served) -> None:
    an = served.anthropic()
    with pytest.raises(anthropic.BadRequestError) as bad:
        an.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        an.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.AuthenticationError):
        served.anthropic("sk-wrong").messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    with httpx.Client(base_url=served.url) as http:
        missing = http.post("/v1/messages", json={"model": MODEL})
        assert missing.status_code == 401
        assert missing.json()["type"] == "error"
        assert missing.json()["error"]["type"] == "authentication_error"
        bearer = http.post(
            "/v1/messages",
            headers={"authorization": f"Bearer {INITECH_KEY}"},
            content=b"{not json",
        )
        assert (
            bearer.status_code == 400 and bearer.json()["error"]["type"] == "invalid_request_error"
        )
    oa = served.openai()
    with pytest.raises(openai.BadRequestError) as wrong:
        oa.responses.create(model=MODEL, input=[{"role": "wizard", "content": "x"}])  # type: ignore[list-item]
    assert wrong.value.param == "input[0]"
    with pytest.raises(openai.BadRequestError) as small:
        oa.responses.create(model=MODEL, input="x", max_output_tokens=2)
    assert small.value.param == "max_output_tokens"
    assert json.loads(small.value.response.text)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "endpoint"),
    [
        ("/v1/responses", {"input": "Tell me a long story.", "stream": True}, "responses"),
        (
            "/v1/messages",
            {
                "max_tokens": 400,
                "stream": True,
                "messages": [{"role": "user", "content": "Tell me a long story."}],
            },
            "messages",
        ),
    ],
)
async def test_a_client_leaving_a_translated_stream_is_recorded_at_once(
    tmp_path: Path, tokenizer_dir: Path, path: str, body: dict[str, Any], endpoint: str
) -> None:
    """Cut by the client: the relay's own bookkeeping runs (row 499, the delivered output
    billed, the upstream closed), not left to the garbage collector."""
    async with (
        running_gateway(tmp_path, tokenizer_dir, providers=[SLOW_SIMULATOR]) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        headers = (
            {"x-api-key": ACME_KEY}
            if endpoint == "messages"
            else {"authorization": f"Bearer {ACME_KEY}"}
        )
        async with http.stream(
            "POST",
            path,
            json={"model": MODEL, **body},
            headers=headers,
        ) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            received = b""
            async for piece in response.aiter_bytes():
                received += piece
                if received.count(b"delta") >= 3:
                    break
        simulated = gw.gateway.simulated["sim"]
        for _ in range(100):
            await gw.gateway.ledger.flush()
            async with AsyncSession(gw.gateway.ledger.engine) as session:
                row = await session.get(LedgerEntry, request_id)
            if row is not None:
                break
            await asyncio.sleep(0.02)
        assert row is not None, "no ledger row for the cut stream"
        assert (row.endpoint, row.status_code, row.stream_cut_by) == (endpoint, 499, "client")
        assert 0 < row.output < 300 and row.cost_nanos > 0
        assert simulated.stats().running == 0  # the upstream work was cancelled


async def test_an_upstream_failing_mid_stream_ends_each_stream_in_its_apis_error(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The SDKs raise their own errors; the row says the upstream cut the stream."""
    cutting = {
        "name": "sim",
        "type": "simulated",
        "time_scale": 0,
        "output": {"distribution": "uniform", "min": 50, "max": 60},
        "errors": {"rate_cut": 1},
    }
    async with running_gateway(tmp_path, tokenizer_dir, providers=[cutting]) as gw:
        oa = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ACME_KEY, max_retries=0)
        kinds: list[str] = []
        with pytest.raises(openai.APIError):
            async with oa.responses.stream(model=MODEL, input="Go on.") as stream:
                async for event in stream:
                    kinds.append(event.type)
        assert "response.output_text.delta" in kinds and kinds[-1] == "response.failed"
        an = anthropic.AsyncAnthropic(base_url=gw.url, api_key=ACME_KEY, max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as failed:
            async with an.messages.stream(
                model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "Go on."}]
            ) as stream:
                async for _ in stream:
                    pass
        assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        await gw.gateway.ledger.flush()
        async with AsyncSession(gw.gateway.ledger.engine) as session:
            rows = (await session.exec(select(LedgerEntry))).all()
        assert sorted((r.endpoint, r.stream_cut_by) for r in rows) == [
            ("messages", "upstream"),
            ("responses", "upstream"),
        ]
        assert all(r.status_code >= 500 and r.output > 0 for r in rows)


async def test_stored_responses_expire_after_the_retention_period(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    retention_s = 1.5
    async with running_gateway(
        tmp_path, tokenizer_dir, responses={"retention_days": retention_s / 86400}
    ) as gw:
        api = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ACME_KEY, max_retries=0)
        made = await api.responses.create(model=MODEL, input="Keep me a moment.")
        assert (await api.responses.retrieve(made.id)).id == made.id
        await api.responses.create(model=MODEL, input="Go on.", previous_response_id=made.id)
        await asyncio.sleep(retention_s + 0.2)
        with pytest.raises(openai.NotFoundError):
            await api.responses.retrieve(made.id)
        with pytest.raises(openai.BadRequestError):
            await api.responses.create(model=MODEL, input="Go on.", previous_response_id=made.id)
        async with httpx.AsyncClient() as http:
            scraped = (await http.get(gw.metrics_url)).text
        assert 'maas_gateway_overhead_seconds_count{endpoint="responses",stream="false"} 3.0' in (
            scraped
        )


async def test_the_sdks_wait_out_a_concurrency_429_and_retry(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """A tenant at its concurrency limit gets a 429 with `retry-after: 1`; each SDK waits
    that long, retries once the slot is free, and succeeds. The refused attempt and the
    answered one are one row each."""
    config = base_config(tmp_path, tokenizer_dir, providers=[SLOW_SIMULATOR])
    config["tenants"][0]["limits"]["max_concurrent"] = 1
    async with RunningGateway(parse_settings(config)) as gw, httpx.AsyncClient(timeout=30) as http:
        oa = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ACME_KEY, max_retries=2)
        an = anthropic.AsyncAnthropic(base_url=gw.url, api_key=ACME_KEY, max_retries=2)
        calls = {
            "responses": lambda: oa.responses.create(model=MODEL, input="Hi", max_output_tokens=16),
            "messages": lambda: an.messages.create(
                model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
            ),
        }
        for endpoint, call in calls.items():
            async with http.stream(
                "POST",
                gw.url + "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "stream": True,
                    "messages": [{"role": "user", "content": "x"}],
                },
                headers={"authorization": f"Bearer {ACME_KEY}"},
            ) as holding:  # takes the tenant's one slot
                assert holding.status_code == 200
                begun = time.monotonic()
                answer = asyncio.ensure_future(call())
                await asyncio.sleep(0.4)
            await answer
            waited = time.monotonic() - begun
            assert waited >= 0.9, f"{endpoint}: retried after {waited:.2f}s, not retry-after"
            await gw.gateway.ledger.flush()
            async with AsyncSession(gw.gateway.ledger.engine) as session:
                rows = (
                    await session.exec(select(LedgerEntry).where(LedgerEntry.endpoint == endpoint))
                ).all()
            assert sorted(r.status_code for r in rows) == [200, 429], endpoint
