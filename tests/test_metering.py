"""Metering at the edges: several choices per request, errors after admission, and limits
that apply to one model or one key only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_settings
from gateway.tokens import TokenCounter
from tests.harness import ACME_KEY, ACME_LIMITED_KEY, RunningGateway, base_config

MESSAGES = [{"role": "user", "content": "Name a colour."}]
OUTPUT_ROOM = 5
"""Tokens of output the daily budget leaves after the prompt."""


def metering_config(tmp: Path, tokenizer_dir: Path) -> dict[str, Any]:
    config = base_config(tmp, tokenizer_dir)
    config["providers"].append(
        {"name": "broken", "type": "simulated", "time_scale": 0, "errors": {"rate_500": 1}}
    )
    config["models"].append(
        {"name": "gpt-broken", "deployments": [{"provider": "broken", "model": "sim-broken"}]}
    )
    config["pricing"]["models"]["gpt-broken"] = config["pricing"]["models"]["gpt-4o-mini"]
    prompt = TokenCounter(parse_settings(config).tokenizers).count_chat("gpt-4o-mini", MESSAGES)
    config["tenants"][0]["limits"]["tokens_per_day"] = prompt + OUTPUT_ROOM
    return config


@pytest.fixture
async def http(tmp_path: Path, tokenizer_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        RunningGateway(parse_settings(metering_config(tmp_path, tokenizer_dir))) as gw,
        httpx.AsyncClient(
            base_url=gw.url + "/v1", headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=30
        ) as client,
    ):
        yield client


def chat(n: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "n": n, "max_tokens": 50}


async def test_more_choices_than_the_budget_pays_for_are_refused(
    http: httpx.AsyncClient,
) -> None:
    # Each choice needs at least one token: 8 choices cannot fit in 5 tokens of room.
    refused = await http.post("/chat/completions", json=chat(OUTPUT_ROOM + 3))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    # Two choices share the room; together they never use more than it.
    answer = await http.post("/chat/completions", json=chat(2))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["choices"]) == 2
    assert 2 <= body["usage"]["completion_tokens"] <= OUTPUT_ROOM
    assert int(answer.headers["x-maas-completion-tokens"]) == body["usage"]["completion_tokens"]


async def test_an_upstream_failure_after_admission_keeps_the_rate_limit_headers(
    http: httpx.AsyncClient,
) -> None:
    failed = await http.post("/chat/completions", json=chat(1, "gpt-broken"))
    assert failed.status_code == 502, failed.text
    assert set(failed.json()["error"]) == {"message", "type", "param", "code"}
    for name in ("limit", "remaining", "reset"):
        for kind in ("requests", "tokens"):
            assert f"x-ratelimit-{name}-{kind}" in failed.headers, failed.headers
    # The failed request spent nothing: the whole output room is still there.
    answer = await http.post("/chat/completions", json={**chat(1), "max_tokens": OUTPUT_ROOM})
    assert answer.status_code == 200, answer.text


@pytest.fixture
async def limited(tmp_path: Path, tokenizer_dir: Path) -> AsyncIterator[RunningGateway]:
    """Acme: at most 2 gpt-4 requests a minute; its limited key at most 3 requests a minute."""
    config = base_config(tmp_path, tokenizer_dir)
    acme = config["tenants"][0]
    acme["model_limits"] = {"gpt-4": {"rpm": 2}}
    acme["keys"][1]["limits"] = {"rpm": 3}
    async with RunningGateway(parse_settings(config)) as gw:
        yield gw


async def send(gw: RunningGateway, key: str, model: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url + "/v1", timeout=30) as http:
        return await http.post(
            "/chat/completions",
            json={"model": model, "messages": MESSAGES, "max_tokens": 5},
            headers={"authorization": f"Bearer {key}"},
        )


async def test_a_model_limit_refuses_that_model_only(limited: RunningGateway) -> None:
    answers = [await send(limited, ACME_KEY, "gpt-4") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert int(answers[2].headers["retry-after"]) >= 1
    assert (await send(limited, ACME_KEY, "gpt-4o-mini")).status_code == 200


async def test_a_key_limit_refuses_that_key_only(limited: RunningGateway) -> None:
    answers = [await send(limited, ACME_LIMITED_KEY, "gpt-4o-mini") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[3].json()["error"]["code"] == "rate_limit_exceeded"
    assert answers[2].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert (await send(limited, ACME_KEY, "gpt-4o-mini")).status_code == 200  # same tenant
