"""Bad input of every kind gets a clear, OpenAI-shaped 4xx, never a 500."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.store.schema import LedgerEntry
from gateway.auth import hash_key
from gateway.config import parse_settings
from gateway.schemas import MAX_JSON_DEPTH, json_depth_exceeds
from tests.harness import ACME_KEY, ACME_LIMITED_KEY, RunningGateway, base_config

REVOKED_KEY = "sk-test-revoked-0000000000000000000000000000000000"
EXPIRED_KEY = "sk-test-expired-0000000000000000000000000000000000"


@pytest.fixture(scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> AsyncIterator[RunningGateway]:
    config = base_config(
        tmp_path_factory.mktemp("errors"), tokenizer_dir, server={"max_body_bytes": 65536}
    )
    config["tenants"][0]["keys"] += [
        {"id": "revoked", "hash": hash_key(REVOKED_KEY), "revoked": True},
        {
            "id": "expired",
            "hash": hash_key(EXPIRED_KEY),
            "expires_at": (datetime.now(UTC) - timedelta(days=1)).isoformat(),
        },
    ]
    async with RunningGateway(parse_settings(config)) as gw:
        yield gw


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=gateway.url, headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=30
    ) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


GOOD = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_missing_and_bad_keys(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert_openai_error(await http.post("/v1/chat/completions", json=GOOD), 401)
        for key in ("sk-wrong", REVOKED_KEY, EXPIRED_KEY):
            response = await http.post(
                "/v1/chat/completions", json=GOOD, headers={"authorization": f"Bearer {key}"}
            )
            assert_openai_error(response, 401, "invalid_api_key")
    api = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await api.chat.completions.create(**GOOD)


async def test_malformed_json(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400)
    assert_openai_error(await http.post("/v1/chat/completions", json=[1, 2]), 400)


async def test_unknown_model_and_allowlist(
    gateway: RunningGateway, http: httpx.AsyncClient
) -> None:
    error = assert_openai_error(
        await http.post("/v1/chat/completions", json={**GOOD, "model": "nope"}),
        404,
        "model_not_found",
    )
    assert error["param"] == "model"
    limited = openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key=ACME_LIMITED_KEY, max_retries=0
    )
    with pytest.raises(openai.NotFoundError):
        await limited.chat.completions.create(**{**GOOD, "model": "gpt-4"})


async def test_wrong_endpoint_for_model(http: httpx.AsyncClient) -> None:
    body = {"model": "text-embedding-3-small", "messages": GOOD["messages"]}
    assert_openai_error(await http.post("/v1/chat/completions", json=body), 400)


async def ledger_row(gateway: RunningGateway, request_id: str) -> LedgerEntry | None:
    await gateway.gateway.ledger.flush()
    async with AsyncSession(gateway.gateway.ledger.engine) as session:
        return await session.get(LedgerEntry, request_id)


async def test_oversized_body(gateway: RunningGateway, http: httpx.AsyncClient) -> None:
    huge = {**GOOD, "messages": [{"role": "user", "content": "x" * 100_000}]}
    response = await http.post("/v1/chat/completions", json=huge)
    assert_openai_error(response, 413)
    # Recorded like every request that got past authentication, at no cost.
    row = await ledger_row(gateway, response.headers["x-request-id"])
    assert row is not None
    assert (row.status_code, row.cost_nanos, row.uncached_input, row.output) == (413, 0, 0, 0)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": ""}, "model"),
    ],
)
async def test_out_of_range_parameters(
    http: httpx.AsyncClient, change: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(
        await http.post("/v1/chat/completions", json={**GOOD, **change}), 400
    )
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_bad_completion_and_embedding_inputs(http: httpx.AsyncClient) -> None:
    for body in (
        {"model": "gpt-4", "prompt": [[1, "x"]]},
        {"model": "gpt-4", "prompt": []},
        {"model": "gpt-4"},
    ):
        assert_openai_error(await http.post("/v1/completions", json=body), 400)
    for body in (
        {"model": "text-embedding-3-small", "input": ""},
        {"model": "text-embedding-3-small", "input": [-1]},
        {"model": "text-embedding-3-small", "input": None},
    ):
        assert_openai_error(await http.post("/v1/embeddings", json=body), 400)


RELAY_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


async def test_unknown_route_and_method(http: httpx.AsyncClient) -> None:
    assert_openai_error(await http.get("/v1/nothing-here"), 404)
    for path in (*RELAY_ROUTES, "/v1/messages"):
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            response = await http.request(method, path)
            if path == "/v1/messages":
                assert_anthropic_error(response, 405)
            else:
                error = assert_openai_error(response, 405, "method_not_allowed")
                assert error["message"] == f"Method {method} is not allowed for {path}."
        assert (await http.head(path)).status_code == 405
        options = await http.options(path)
        assert (options.status_code, options.headers["allow"]) == (204, "OPTIONS, POST")
        assert options.content == b""


async def _in_pieces(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 16384):
        yield data[start : start + 16384]


@pytest.mark.parametrize("path", [*RELAY_ROUTES, "/v1/messages"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_every_relay_route_holds_the_body_limit(
    gateway: RunningGateway, http: httpx.AsyncClient, path: str, framing: str
) -> None:
    """A body over `server.max_body_bytes` gets a 413 in the route's own shape, whether its
    length is announced or only found while reading it, and is recorded at no cost."""
    data = json.dumps({**GOOD, "input": "x" * 100_000, "prompt": "x"}).encode()
    body: Any = data if framing == "content-length" else _in_pieces(data)
    response = await http.post(
        path, content=body, headers={"content-type": "application/json", "x-api-key": ACME_KEY}
    )
    if path == "/v1/messages":
        assert assert_anthropic_error(response, 413)["type"] == "request_too_large"
    else:
        assert assert_openai_error(response, 413, "request_too_large")["message"] == (
            "Request body is larger than the limit of 65536 bytes."
        )
    request_id = response.headers.get("x-request-id") or response.headers["request-id"]
    row = await ledger_row(gateway, request_id)
    assert row is not None
    assert (row.status_code, row.cost_nanos) == (413, 0)


async def test_bad_input_changes_nothing(gateway: RunningGateway, http: httpx.AsyncClient) -> None:
    """A refused request costs nothing: the tenant's month-to-date cost does not move."""
    before = await gateway.gateway.quotas.remaining(_tenant_scope(gateway), datetime.now(UTC))
    for _ in range(3):
        await http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 0})
    after = await gateway.gateway.quotas.remaining(_tenant_scope(gateway), datetime.now(UTC))
    assert before == after


def _tenant_scope(gw: RunningGateway) -> Any:
    from billing.quota import Scope

    tenant = gw.gateway.directory.tenants["acme"]
    return Scope("tenant:acme", tenant.limits, tenant.timezone)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "input",
        "stream",
        "max_tokens",
        "n",
        "stream_options",
        "tools",
        "temperature",
        "encoding_format",
        "role",
        "content",
        "instructions",
        "max_output_tokens",
        "previous_response_id",
        "store",
        "system",
        "stop_sequences",
        "tool_choice",
    ]
)
bodies = st.one_of(
    json_values,
    st.dictionaries(field_names, json_values, max_size=6),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["gpt-4o-mini", "gpt-4", "text-embedding-3-small", "x"])},
        optional={
            "messages": st.lists(
                st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values),
                max_size=3,
            ),
            "prompt": json_values,
            "input": json_values,
            "max_tokens": json_values,
            "n": st.integers(-3, 5),
            "stream": st.booleans(),
            "max_output_tokens": json_values,
            "system": json_values,
            "instructions": json_values,
            "tools": st.lists(
                st.dictionaries(
                    st.sampled_from(["type", "name", "input_schema", "parameters"]), json_values
                ),
                max_size=2,
            ),
        },
    ),
)


def assert_anthropic_error(response: httpx.Response, status: int) -> dict:
    """Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["request-id"]
    body = response.json()
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
    return body["error"]


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/messages",
            "/v1/messages/count_tokens",
        ]
    ),
    body=bodies,
)
async def test_fuzzed_bodies_never_get_a_500(gateway: RunningGateway, path: str, body: Any) -> None:
    """Every API answers bad input with its own 4xx shape (Anthropic's on /v1/messages)."""
    async with httpx.AsyncClient(
        base_url=gateway.url, headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=30
    ) as http:
        response = await http.post(path, content=json.dumps(body))
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            if path.startswith("/v1/messages"):
                assert_anthropic_error(response, response.status_code)
            else:
                assert_openai_error(response, response.status_code)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "gpt-4o-mini"}, "input"),
        ({"model": "gpt-4o-mini", "input": []}, "input"),
        ({"model": "gpt-4o-mini", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "gpt-4o-mini", "input": "x", "temperature": 9}, "temperature"),
        ({"model": "gpt-4o-mini", "input": [{"type": "item_reference"}]}, "input[0]"),
        (
            {"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "web_search"}]},
            "tools[0].type",
        ),
        (
            {"model": "gpt-4o-mini", "input": "x", "previous_response_id": "resp_nope"},
            "previous_response_id",
        ),
    ],
)
async def test_bad_responses_requests(
    http: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(await http.post("/v1/responses", json=body), 400)
    assert error["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},  # no max_tokens
        {"model": "gpt-4o-mini", "max_tokens": 5, "messages": []},
        {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
        {
            "model": "gpt-4o-mini",
            "max_tokens": 5,
            "temperature": 1.5,
            "messages": [{"role": "user", "content": "x"}],
        },
        {
            "model": "gpt-4o-mini",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "tool_use"}]}],
        },
    ],
)
async def test_bad_messages_requests(
    gateway: RunningGateway, http: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await http.post("/v1/messages", json=body)
    assert assert_anthropic_error(response, 400)["type"] == "invalid_request_error"
    row = await ledger_row(gateway, response.headers["request-id"])
    assert row is not None and (row.endpoint, row.status_code, row.cost_nanos) == (
        "messages",
        400,
        0,
    )


async def test_messages_routes_answer_in_anthropic_shape(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as plain:
        missing = await plain.post("/v1/messages", json={})
        assert assert_anthropic_error(missing, 401)["type"] == "authentication_error"
        wrong = await plain.post("/v1/messages/count_tokens", json={}, headers={"x-api-key": "no"})
        assert assert_anthropic_error(wrong, 401)["type"] == "authentication_error"
        refused = await plain.get("/v1/messages", headers={"x-api-key": ACME_KEY})
        assert assert_anthropic_error(refused, 405)["type"] == "invalid_request_error"


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in a decoded JSON value."""
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


bracket_text = st.text(alphabet='[]{}"\\ ab', max_size=12)
deep_values = st.recursive(
    st.none() | st.integers() | bracket_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(bracket_text, children, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=deep_values, limit=st.integers(1, 8))
def test_the_depth_check_agrees_with_decoding(value: Any, limit: int) -> None:
    """Brackets inside strings (escaped quotes too) never count; nesting is measured exactly."""
    raw = json.dumps(value).encode()
    assert json_depth_exceeds(raw, limit) == (_depth(value) > limit)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
    field=st.sampled_from(["x", "messages", "tools", "input", "prompt", "stream_options"]),
    depth=st.integers(1, 3000),
    opener=st.sampled_from(["[", '{"a":', '[{"a":']),
    terminated=st.booleans(),
    noise=st.integers(0, 200),
)
async def test_fuzzed_nesting_gets_a_400_naming_the_limit(
    gateway: RunningGateway,
    path: str,
    field: str,
    depth: int,
    opener: str,
    terminated: bool,
    noise: int,
) -> None:
    """Nested (or never closed) arrays and objects at any depth: too deep is a 400 naming the
    limit, never a 500; brackets inside strings do not count."""
    closer = {"[": "]", '{"a":': "}", '[{"a":': "}]"}[opener]
    levels = 2 if opener == '[{"a":' else 1
    content = "[{" * noise  # in a string: no nesting at all
    value = opener * depth + "1" + (closer * depth if terminated else "")
    body = f'{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{content}"}}],'
    body += f'"{field}":{value}' + ("}" if terminated else "")
    async with httpx.AsyncClient(
        base_url=gateway.url, headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=30
    ) as http:
        response = await http.post(path, content=body)
    assert response.status_code < 500, (body[:200], response.text)
    if 1 + depth * levels > MAX_JSON_DEPTH:
        assert response.status_code == 400, response.text
        error = assert_openai_error(response, 400)
        assert error["code"] == "json_too_deep"
        assert f"at most {MAX_JSON_DEPTH} levels" in error["message"]
    elif response.status_code >= 400:
        assert_openai_error(response, response.status_code)
