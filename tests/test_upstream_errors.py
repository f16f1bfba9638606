"""What an upstream's refusals do, over real sockets: a scripted OpenAI-compatible upstream
(served by uvicorn on loopback) answers 429s with `retry-after` / `retry-after-ms` and 4xx
errors with OpenAI bodies, reached through the `openai_compat` provider of a running
gateway. The deployment cools down for exactly the upstream's hint, and the caller sees
the upstream's status and error in OpenAI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
import uvicorn

from tests.harness import ACME_KEY, RunningGateway, free_port
from tests.test_resilience import FAST, MODEL, gateway_settings, health, ledger_rows, sdk

pytestmark = pytest.mark.timeout(60)

_JSON = [(b"content-type", b"application/json")]


@dataclass
class Reply:
    """One scripted answer of the upstream."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(
    status: int, message: str, type: str, code: str | None, param: str | None = None, **headers: str
) -> Reply:
    error = {"message": message, "type": type, "param": param, "code": code}
    return Reply(status, msgspec.json.encode({"error": error}), headers)


class ScriptedUpstream:
    """An OpenAI-compatible chat endpoint that plays queued replies, then answers 200s."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.calls: list[float] = []  # monotonic time of each request
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls.append(time.monotonic())
        request = msgspec.json.decode(raw)
        if self.replies:
            reply = self.replies.popleft()
            headers = [*_JSON, *((k.encode(), v.encode()) for k, v in reply.headers.items())]
            await _respond(send, reply.status, headers, reply.body)
        elif request.get("stream"):
            await _respond(send, 200, [(b"content-type", b"text/event-stream")], _sse(request))
        else:
            await _respond(send, 200, _JSON, msgspec.json.encode(_completion(request)))


def _completion(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": request["model"],
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Fine, thanks."},
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    }


def _sse(request: dict[str, Any]) -> bytes:
    chunk = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": request["model"],
        "choices": [{"index": 0, "delta": {"content": "Fine."}, "finish_reason": "stop"}],
    }
    return b"data: " + msgspec.json.encode(chunk) + b"\n\ndata: [DONE]\n\n"


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def scripted_upstream() -> AsyncIterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    config = uvicorn.Config(
        upstream, host="127.0.0.1", port=upstream.port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield upstream
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def gateway_before(
    tmp: Path, tokenizer_dir: Path, upstream: ScriptedUpstream, *, spare: bool
) -> AsyncIterator[RunningGateway]:
    """A gateway whose MODEL goes to `upstream` first, and to a simulated spare (a lower
    tier) only when the upstream cannot take it."""
    providers: list[dict[str, Any]] = [
        {"name": "scripted", "type": "openai_compat", "base_url": upstream.url}
    ]
    deployments: list[dict[str, Any]] = [
        {"name": "scripted", "provider": "scripted", "model": "up"}
    ]
    if spare:
        providers.append({"name": "spare", "type": "simulated", **FAST})
        deployments.append({"name": "spare", "provider": "spare", "model": "sim", "priority": 1})
    settings = gateway_settings(tmp, tokenizer_dir, providers, deployments)
    async with RunningGateway(settings) as gw:
        yield gw


def chat_body(stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "How are you?"}],
        "max_tokens": 20,
    }
    if stream:
        body["stream"] = True
    return body


async def post_chat(http: httpx.AsyncClient, gw: RunningGateway, **kwargs: Any) -> httpx.Response:
    return await http.post(
        gw.url + "/v1/chat/completions",
        json=chat_body(**kwargs),
        headers={"authorization": f"Bearer {ACME_KEY}"},
    )


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"].startswith("req_")
    return error  # type: ignore[no-any-return]


def http_date_in(seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


# -- 429: the deployment cools down for the upstream's retry-after -------------------------


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        pytest.param(lambda: {"retry-after-ms": "1500"}, 1.2, 1.5, id="retry-after-ms"),
        pytest.param(lambda: {"retry-after": "2"}, 1.7, 2.0, id="retry-after-seconds"),
        pytest.param(
            lambda: {"retry-after-ms": "1500", "retry-after": "30"}, 1.2, 1.5, id="ms-wins"
        ),
        pytest.param(
            lambda: {"retry-after": http_date_in(3)},  # whole seconds: 2 to 3 s from now
            1.7,
            3.0,
            id="retry-after-http-date",
        ),
    ],
)
async def test_upstream_429_cools_the_deployment_down_for_its_retry_after(
    tmp_path: Path,
    tokenizer_dir: Path,
    headers: Callable[[], dict[str, str]],
    low: float,
    high: float,
) -> None:
    """A 429 with a wait hint: the caller is served by the spare, and the deployment gets
    no request until the hint has passed (between `low` and `high` seconds)."""
    async with (
        scripted_upstream() as upstream,
        gateway_before(tmp_path, tokenizer_dir, upstream, spare=True) as gw,
    ):
        upstream.replies.append(
            error_reply(429, "Rate limit reached.", "requests", "rate_limit_exceeded", **headers())
        )
        client = sdk(gw)
        first = await client.chat.completions.with_raw_response.create(**chat_body())
        limited_at = upstream.calls[0]
        report = await health(gw, "scripted")
        # The caller never saw the 429: the request went on to the spare.
        assert first.http_response.status_code == 200
        assert report["state"] == "closed" and report["healthy"] is False  # cooling, not failed
        waited = time.monotonic() - limited_at
        assert low - waited <= report["cooldown_remaining_s"] <= high, report

        during: list[str] = []
        while time.monotonic() - limited_at < low - 0.2:
            raw = await client.chat.completions.with_raw_response.create(**chat_body())
            during.append(raw.headers["x-request-id"])
            await asyncio.sleep(0.05)
        assert len(upstream.calls) == 1, "the upstream was called while cooling down"

        await asyncio.sleep(max(0.0, limited_at + high + 0.1 - time.monotonic()))
        assert (await health(gw, "scripted"))["healthy"] is True
        after = await client.chat.completions.with_raw_response.create(**chat_body())
        rows = await ledger_rows(gw)

    assert len(upstream.calls) == 2
    served_by = {rid: (row["deployment"], row["attempts"]) for rid, row in rows.items()}
    assert served_by[first.headers["x-request-id"]] == ("spare", 2)  # failed over once
    assert during and {served_by[rid] for rid in during} == {("spare", 1)}
    assert rows[after.headers["x-request-id"]]["deployment"] == "scripted"


async def test_upstream_429_reaches_the_caller_as_429_without_another_deployment(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    async with (
        scripted_upstream() as upstream,
        gateway_before(tmp_path, tokenizer_dir, upstream, spare=False) as gw,
    ):
        upstream.replies.append(
            error_reply(
                429,
                "Rate limit reached for requests per minute.",
                "requests",
                "rate_limit_exceeded",
                **{"retry-after-ms": "2500", "retry-after": "3"},
            )
        )
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk(gw).chat.completions.create(**chat_body())
        rows = await ledger_rows(gw)

    response = caught.value.response
    error = assert_openai_error(response, 429)
    assert error["message"] == "Rate limit reached for requests per minute."
    assert error["code"] == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 3  # whole seconds, rounded up
    assert len(upstream.calls) == 1  # not retried against the deployment that refused
    row = rows[response.headers["x-request-id"]]
    assert (row["status_code"], row["cost_nanos"], row["output"]) == (429, 0, 0)


# -- other 4xx: relayed as they are, not retried, no harm to the deployment ----------------


@pytest.mark.parametrize(
    ("reply", "stream"),
    [
        pytest.param(
            error_reply(
                400,
                "This model's maximum context length is 8192 tokens.",
                "invalid_request_error",
                "context_length_exceeded",
                param="messages",
            ),
            False,
            id="400-openai-body",
        ),
        pytest.param(
            error_reply(400, "Unsupported parameter: 'logprobs'.", "invalid_request_error", None),
            True,
            id="400-stream",
        ),
        pytest.param(
            error_reply(
                404, "The model `up` does not exist.", "invalid_request_error", "model_not_found"
            ),
            False,
            id="404-openai-body",
        ),
        pytest.param(Reply(422, b"<html>Unprocessable</html>"), False, id="422-not-json"),
    ],
)
async def test_upstream_4xx_reaches_the_caller_with_its_status_and_openai_error(
    tmp_path: Path, tokenizer_dir: Path, reply: Reply, stream: bool
) -> None:
    async with (
        scripted_upstream() as upstream,
        gateway_before(tmp_path, tokenizer_dir, upstream, spare=True) as gw,
        httpx.AsyncClient(timeout=30) as http,
    ):
        upstream.replies.append(reply)
        refused = await post_chat(http, gw, stream=stream)
        report = await health(gw, "scripted")
        served = await post_chat(http, gw)
        rows = await ledger_rows(gw)

    error = assert_openai_error(refused, reply.status)
    sent = msgspec.json.decode(reply.body) if reply.body.startswith(b"{") else None
    if sent is not None:
        assert (error["message"], error["type"], error["param"], error["code"]) == (
            sent["error"]["message"],
            sent["error"]["type"],
            sent["error"]["param"],
            sent["error"]["code"],
        )
    else:
        assert error["message"] == f"Upstream scripted answered HTTP {reply.status}."
    # Not retried and not failed over (the spare would have answered 200): the request itself
    # was refused, and the upstream is as healthy as before.
    assert len(upstream.calls) == 2
    row = rows[refused.headers["x-request-id"]]
    assert row["status_code"] == reply.status
    assert row["cost_nanos"] == 0
    assert (row["deployment"], row["attempts"]) == ("scripted", 1)  # who refused, once
    assert report["state"] == "closed" and report["healthy"] is True
    assert report["consecutive_failures"] == 0
    assert served.status_code == 200
    assert rows[served.headers["x-request-id"]]["deployment"] == "scripted"


@pytest.mark.parametrize("status", [401, 403])
async def test_an_upstream_refusing_the_gateways_credential_is_a_gateway_error(
    tmp_path: Path, tokenizer_dir: Path, status: int
) -> None:
    """The caller's own key is fine: it gets a 502, not a 401 that would blame its key."""
    async with (
        scripted_upstream() as upstream,
        gateway_before(tmp_path, tokenizer_dir, upstream, spare=False) as gw,
        httpx.AsyncClient(timeout=30) as http,
    ):
        refusal = error_reply(status, "Incorrect API key.", "invalid_request_error", "bad_key")
        upstream.replies.extend([refusal] * 10)  # every attempt is refused
        refused = await post_chat(http, gw)
    error = assert_openai_error(refused, 502)
    assert error["code"] == "upstream_auth_failed"
    assert "Incorrect API key" not in error["message"]
    assert len(upstream.calls) > 1  # retried: another attempt may have a good credential


async def test_a_deployment_whose_credential_is_refused_fails_over(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    async with (
        scripted_upstream() as upstream,
        gateway_before(tmp_path, tokenizer_dir, upstream, spare=True) as gw,
        httpx.AsyncClient(timeout=30) as http,
    ):
        upstream.replies.append(
            error_reply(401, "Incorrect API key provided.", "invalid_request_error", "bad_key")
        )
        served = await post_chat(http, gw)
        rows = await ledger_rows(gw)
    assert served.status_code == 200, served.text
    row = rows[served.headers["x-request-id"]]
    assert row["deployment"] != "scripted" and row["attempts"] == 2
