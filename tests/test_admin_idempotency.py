"""`Idempotency-Key` on admin writes, through a running `maas-gateway serve` process, with the
in-memory quota store and with a real redis-server: a repeated top-up applies once (also
when the first attempt timed out against a frozen Redis and was applied anyway), the same
key with another body is a 409, and concurrent repeats of one key creation create one key
whose secret is never replayed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.redis_server import RedisServer, free_port
from tests.harness import ADMIN_KEY, base_config, gateway_process


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to freeze without disturbing others."""
    server = RedisServer("redis-server", tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def quotas_for(backend: str, redis: RedisServer | None) -> dict[str, Any]:
    if backend == "memory":
        return {"backend": "memory"}
    assert redis is not None
    return {
        "backend": "redis",
        "redis_url": redis.url,
        "redis_url_env": None,
        "timeout_ms": 300,
        "retry_interval_ms": 100,
    }


def admin_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )


async def balance(admin: httpx.AsyncClient, tenant: str) -> Decimal:
    answer = await admin.get(f"/admin/tenants/{tenant}/balance")
    assert answer.status_code == 200, answer.text
    return Decimal(answer.json()["balance"])


def key(value: str) -> dict[str, str]:
    return {"idempotency-key": value}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_repeated_top_up_applies_once(
    backend: str, tmp_path: Path, tokenizer_dir: Path, request: pytest.FixtureRequest
) -> None:
    redis = request.getfixturevalue("own_redis") if backend == "redis" else None
    config = base_config(tmp_path, tokenizer_dir, quotas=quotas_for(backend, redis))
    with gateway_process(config, tmp_path) as (url, _):
        async with admin_client(url) as admin:
            tenant = {"id": "prepaid", "balance": "10"}
            created = await admin.post("/admin/tenants", json=tenant, headers=key("t-1"))
            again = await admin.post("/admin/tenants", json=tenant, headers=key("t-1"))
            assert (created.status_code, again.status_code) == (201, 201)
            assert again.json() == created.json()
            assert again.headers["idempotent-replayed"] == "true"
            assert "idempotent-replayed" not in created.headers
            other = await admin.post("/admin/tenants", json={"id": "x"}, headers=key("t-1"))
            assert other.status_code == 409
            assert other.json()["error"]["code"] == "idempotency_key_reused"

            top_up = {"amount": "5"}
            first = await admin.post("/admin/tenants/prepaid/topup", json=top_up, headers=key("u1"))
            assert first.status_code == 200 and Decimal(first.json()["balance"]) == 15
            for _ in range(3):  # retries (the same body, keys in another order too)
                repeat = await admin.post(
                    "/admin/tenants/prepaid/topup",
                    content=b'{ "amount" : "5" }',
                    headers={**key("u1"), "content-type": "application/json"},
                )
                assert repeat.status_code == 200, repeat.text
                assert repeat.json() == first.json()
                assert repeat.headers["idempotent-replayed"] == "true"
            assert await balance(admin, "prepaid") == Decimal("15")

            changed = await admin.post(
                "/admin/tenants/prepaid/topup", json={"amount": "6"}, headers=key("u1")
            )
            assert changed.status_code == 409
            assert changed.json()["error"]["code"] == "idempotency_key_reused"
            elsewhere = await admin.post(
                "/admin/tenants/prepaid/topup", json=top_up, headers=key("t-1")
            )
            assert elsewhere.status_code == 409  # a key belongs to its first request
            fresh = await admin.post("/admin/tenants/prepaid/topup", json=top_up, headers=key("u2"))
            plain = await admin.post("/admin/tenants/prepaid/topup", json=top_up)
            assert (fresh.status_code, plain.status_code) == (200, 200)
            assert await balance(admin, "prepaid") == Decimal("25")

            bad = await admin.post("/admin/tenants/prepaid/topup", json=top_up, headers=key(""))
            assert bad.status_code == 400
            assert bad.json()["error"]["param"] == "idempotency-key"


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_concurrent_repeats_of_a_key_creation_create_one_key(
    backend: str, tmp_path: Path, tokenizer_dir: Path, request: pytest.FixtureRequest
) -> None:
    redis = request.getfixturevalue("own_redis") if backend == "redis" else None
    config = base_config(tmp_path, tokenizer_dir, quotas=quotas_for(backend, redis))
    with gateway_process(config, tmp_path) as (url, _):
        async with admin_client(url) as admin:
            before = (await admin.get("/admin/tenants/acme/keys")).json()["data"]
            body = {"name": "ci"}
            answers = await asyncio.gather(
                *(
                    admin.post("/admin/tenants/acme/keys", json=body, headers=key("k-1"))
                    for _ in range(8)
                )
            )
            after = (await admin.get("/admin/tenants/acme/keys")).json()["data"]
            assert len(after) == len(before) + 1
            statuses = sorted(a.status_code for a in answers)
            assert set(statuses) <= {201, 409}, [a.text for a in answers]
            with_secret = [a for a in answers if a.status_code == 201 and "key" in a.json()]
            assert len(with_secret) == 1  # the secret is shown once, never replayed
            for answer in answers:
                if answer.status_code == 409:
                    assert answer.json()["error"]["code"] == "idempotency_key_in_use"
            replay = await admin.post("/admin/tenants/acme/keys", json=body, headers=key("k-1"))
            assert replay.status_code == 201 and "key" not in replay.json()
            assert replay.json()["id"] == with_secret[0].json()["id"]
            assert replay.headers["idempotent-replayed"] == "true"


async def test_a_top_up_that_timed_out_on_a_frozen_redis_is_not_applied_twice(
    tmp_path: Path, tokenizer_dir: Path, own_redis: RedisServer
) -> None:
    config = base_config(tmp_path, tokenizer_dir, quotas=quotas_for("redis", own_redis))
    process = own_redis._process
    assert process is not None
    with gateway_process(config, tmp_path) as (url, _):
        async with admin_client(url) as admin:
            created = await admin.post("/admin/tenants", json={"id": "p", "balance": "1"})
            assert created.status_code == 201, created.text
            top_up = {"amount": "2.5"}
            # One top-up first: Redis then knows the script, and runs the frozen call's
            # EVALSHA when it wakes (an unknown script would be refused, not applied).
            warm = await admin.post("/admin/tenants/p/topup", json=top_up, headers=key("w"))
            assert warm.status_code == 200, warm.text
            os.kill(process.pid, signal.SIGSTOP)
            try:
                lost = await admin.post("/admin/tenants/p/topup", json=top_up, headers=key("h"))
            finally:
                os.kill(process.pid, signal.SIGCONT)
            assert lost.status_code == 503
            assert "Idempotency-Key" in lost.json()["error"]["message"]
            await asyncio.sleep(0.3)  # Redis runs what it had received: the top-up applied
            assert await balance(admin, "p") == Decimal("6")
            retried = await admin.post("/admin/tenants/p/topup", json=top_up, headers=key("h"))
            assert retried.status_code == 200, retried.text
            assert Decimal(retried.json()["balance"]) == 6
            assert retried.headers["idempotent-replayed"] == "true"
            assert await balance(admin, "p") == Decimal("6")
