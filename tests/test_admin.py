"""The admin API and the tenant usage endpoint over HTTP, against a running gateway: prepaid
balances move by exactly what is topped up, admin routes refuse anyone without the admin key
(and all of them when none is configured), a tenant's key sees and spends only its own
tenant's usage and balance, and a Redis outage is a clean 503 that changes nothing."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_settings
from tests.fixtures.redis_server import RedisServer
from tests.harness import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    RunningGateway,
    base_config,
    gateway_process,
)

pytestmark = pytest.mark.timeout(60)

BALANCES = {"acme": "5", "globex": "7.25"}


def prepaid_config(tmp: Path, tokenizer_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The test configuration with both tenants prepaid."""
    config = base_config(tmp, tokenizer_dir, **overrides)
    for stanza in config["tenants"]:
        stanza["balance"] = BALANCES[stanza["id"]]
    return config


@pytest.fixture
async def gateway(tmp_path: Path, tokenizer_dir: Path) -> AsyncIterator[RunningGateway]:
    async with RunningGateway(parse_settings(prepaid_config(tmp_path, tokenizer_dir))) as gw:
        yield gw


@pytest.fixture
async def admin(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway.admin() as client:
        yield client


def as_tenant(gw: RunningGateway, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error  # type: ignore[no-any-return]


async def balance_of(admin: httpx.AsyncClient, tenant: str) -> str:
    response = await admin.get(f"/admin/tenants/{tenant}/balance")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tenant"] == tenant
    return str(body["balance"])


# ---- top-ups and balances --------------------------------------------------------------------


async def test_top_up_moves_the_balance_by_exactly_the_amount(admin: httpx.AsyncClient) -> None:
    assert await balance_of(admin, "acme") == "5.000000000"
    expected = Decimal("5")
    for amount in ("0.000000001", "2.25", "1000000"):
        response = await admin.post("/admin/tenants/acme/topup", json={"amount": amount})
        assert response.status_code == 200, response.text
        expected += Decimal(amount)
        assert response.json() == {"tenant": "acme", "balance": f"{expected:.9f}"}
        assert Decimal(await balance_of(admin, "acme")) == expected
    assert await balance_of(admin, "acme") == "1000007.250000001"
    assert await balance_of(admin, "globex") == "7.250000000"  # the other tenant is untouched


@pytest.mark.parametrize(
    "amount", ["0", "-1", "abc", "0.0000000001", "Infinity", "NaN", "1e400", "9007195"]
)
async def test_an_invalid_top_up_is_refused_and_changes_nothing(
    admin: httpx.AsyncClient, amount: str
) -> None:
    response = await admin.post("/admin/tenants/acme/topup", json={"amount": amount})
    assert assert_openai_error(response, 400)["param"] == "amount"
    assert await balance_of(admin, "acme") == "5.000000000"


async def test_top_up_of_an_unknown_or_postpaid_tenant(admin: httpx.AsyncClient) -> None:
    missing = await admin.post("/admin/tenants/nobody/topup", json={"amount": "1"})
    assert_openai_error(missing, 404, "tenant_not_found")
    assert_openai_error(await admin.get("/admin/tenants/nobody/balance"), 404, "tenant_not_found")
    created = await admin.post("/admin/tenants", json={"id": "postpaid"})
    assert created.status_code == 201, created.text
    refused = await admin.post("/admin/tenants/postpaid/topup", json={"amount": "1"})
    assert_openai_error(refused, 400)
    assert (await admin.get("/admin/tenants/postpaid/balance")).json()["balance"] is None


async def test_a_tenant_created_with_a_balance_can_be_topped_up(admin: httpx.AsyncClient) -> None:
    created = await admin.post("/admin/tenants", json={"id": "initech", "balance": "0.10"})
    assert created.status_code == 201, created.text
    assert created.json()["prepaid"] is True
    assert await balance_of(admin, "initech") == "0.100000000"
    await admin.post("/admin/tenants/initech/topup", json={"amount": "0.05"})
    assert await balance_of(admin, "initech") == "0.150000000"
    for balance in ("-1", "0.0000000001", "Infinity"):
        refused = await admin.post("/admin/tenants", json={"id": "bad", "balance": balance})
        assert_openai_error(refused, 400)
    tenants = (await admin.get("/admin/tenants")).json()["data"]
    assert "bad" not in {t["id"] for t in tenants}


# ---- who may call the admin API --------------------------------------------------------------

ADMIN_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/admin/tenants", None),
    ("POST", "/admin/tenants", {"id": "intruder", "balance": "100"}),
    ("POST", "/admin/tenants/acme/topup", {"amount": "100"}),
    ("GET", "/admin/tenants/acme/balance", None),
    ("POST", "/admin/tenants/acme/keys", {"name": "stolen"}),
    ("GET", "/admin/usage", None),
    ("GET", "/admin/deployments", None),
]

NOT_ADMIN = {
    "no header": None,
    "bearer without a key": "Bearer",
    "wrong key": "Bearer sk-admin-test-0000000000000001",
    "prefix of the key": f"Bearer {ADMIN_KEY[:-1]}",
    "tenant key": f"Bearer {ACME_KEY}",
    "other scheme": f"Basic {ADMIN_KEY}",
}


@pytest.mark.parametrize("authorization", list(NOT_ADMIN.values()), ids=list(NOT_ADMIN))
async def test_admin_routes_refuse_without_the_admin_key_and_change_nothing(
    gateway: RunningGateway, admin: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=30) as http:
        for method, path, body in ADMIN_CALLS:
            response = await http.request(method, path, json=body)
            error = assert_openai_error(response, 401, "invalid_api_key")
            assert "admin" in error["message"].lower(), (method, path)
    assert await balance_of(admin, "acme") == "5.000000000"
    tenants = (await admin.get("/admin/tenants")).json()["data"]
    assert {t["id"] for t in tenants} == {"acme", "globex"}
    keys = (await admin.get("/admin/tenants/acme/keys")).json()["data"]
    assert "stolen" not in {k["name"] for k in keys}


async def test_every_admin_route_the_app_serves_refuses_without_the_admin_key(
    gateway: RunningGateway,
) -> None:
    """Not only the calls listed above: every route under /admin in the app's route table
    (invoices, reconciliation, keys, console users, ...) answers 401 to a tenant's key."""
    app = gateway.server.config.app
    calls = [
        (method, route.path)
        for route in app.routes
        if route.path.startswith("/admin")
        for method in sorted(route.methods - {"HEAD", "OPTIONS"})
    ]
    assert len(calls) >= 15, calls
    async with as_tenant(gateway, ACME_KEY) as http:
        for method, template in calls:
            path = re.sub(r"\{month:str\}", "2026-11", template)
            path = re.sub(r"\{\w+:str\}", "acme", path)
            response = await http.request(method, path, json={})
            assert_openai_error(response, 401, "invalid_api_key")


def test_admin_api_is_disabled_when_no_admin_key_is_configured(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """A real `maas-gateway serve` whose admin key variable is empty: every admin route is a
    403 whatever is presented, while the OpenAI endpoints serve as usual."""
    config = prepaid_config(tmp_path, tokenizer_dir)
    with gateway_process(config, tmp_path, env={"MAAS_TEST_ADMIN_KEY": ""}) as (url, _):
        for authorization in (f"Bearer {ADMIN_KEY}", "Bearer", None):
            headers = {"authorization": authorization} if authorization else {}
            for method, path, body in ADMIN_CALLS:
                response = httpx.request(method, url + path, json=body, headers=headers)
                error = assert_openai_error(response, 403)
                assert error["type"] == "permission_error"
                assert "disabled" in error["message"]
        served = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
            headers={"authorization": f"Bearer {ACME_KEY}"},
            timeout=30,
        )
        assert served.status_code == 200, served.text


# ---- one tenant's key and another tenant's usage --------------------------------------------


async def test_a_tenant_key_sees_and_spends_only_its_own_tenant(
    gateway: RunningGateway, admin: httpx.AsyncClient
) -> None:
    async def spend(key: str, model: str, count: int) -> Decimal:
        total = Decimal(0)
        async with as_tenant(gateway, key) as http:
            for i in range(count):
                response = await http.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": f"Q{i}"}]},
                )
                assert response.status_code == 200, response.text
                total += Decimal(response.headers["x-maas-cost"])
        return total

    acme_spent = await spend(ACME_KEY, "gpt-4o-mini", 3)
    globex_spent = await spend(GLOBEX_KEY, "gpt-4", 2)
    assert acme_spent > 0 and globex_spent > 0
    # Each balance moved by exactly its own tenant's spending.
    assert Decimal(await balance_of(admin, "acme")) == Decimal(BALANCES["acme"]) - acme_spent
    assert Decimal(await balance_of(admin, "globex")) == Decimal(BALANCES["globex"]) - globex_spent

    async with as_tenant(gateway, ACME_KEY) as acme:
        for params in ({}, {"tenant": "globex"}, {"tenant_id": "globex"}):
            usage = await acme.get("/v1/usage", params=params)
            assert usage.status_code == 200, usage.text
            rows = usage.json()["data"]
            assert {r["tenant_id"] for r in rows} == {"acme"}, params
            assert {r["model"] for r in rows} == {"gpt-4o-mini"}
            assert sum(r["requests"] for r in rows) == 3
            assert sum(Decimal(r["cost"]) for r in rows) == acme_spent
        # A tenant key is no admin key: no other tenant's balance, usage or top-up.
        for method, path in (
            ("GET", "/admin/tenants/globex/balance"),
            ("GET", "/admin/usage?tenant=globex"),
            ("POST", "/admin/tenants/acme/topup"),
        ):
            response = await acme.request(method, path, json={"amount": "1"})
            assert_openai_error(response, 401)
    async with as_tenant(gateway, GLOBEX_KEY) as globex:
        rows = (await globex.get("/v1/usage")).json()["data"]
        assert {r["tenant_id"] for r in rows} == {"globex"}
        assert sum(r["requests"] for r in rows) == 2
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as anonymous:
        assert_openai_error(await anonymous.get("/v1/usage"), 401, "missing_api_key")


# ---- Redis away ------------------------------------------------------------------------------


async def test_balance_routes_answer_503_while_redis_is_down_and_change_nothing(
    tmp_path: Path, tokenizer_dir: Path, redis_server: RedisServer, redis_url: str
) -> None:
    quotas = {
        "backend": "redis",
        "redis_url": redis_url,
        "redis_url_env": None,
        "timeout_ms": 200,
        "retry_interval_ms": 100,
    }
    settings = parse_settings(prepaid_config(tmp_path, tokenizer_dir, quotas=quotas))
    async with RunningGateway(settings) as gw, gw.admin() as admin:
        assert await balance_of(admin, "acme") == "5.000000000"
        redis_server.stop()
        try:
            calls = [
                admin.get("/admin/tenants/acme/balance"),
                admin.post("/admin/tenants/acme/topup", json={"amount": "1"}),
                admin.post("/admin/tenants", json={"id": "initech", "balance": "3"}),
            ]
            for call in calls:
                error = assert_openai_error(await call, 503, "service_unavailable")
                assert error["type"] == "service_unavailable"
            listed = (await admin.get("/admin/tenants")).json()["data"]  # needs no Redis
            assert "initech" not in {t["id"] for t in listed}
        finally:
            await asyncio.to_thread(redis_server.start)
        await asyncio.sleep(0.15)  # past the store's fail-fast interval
        created = await admin.post("/admin/tenants", json={"id": "initech", "balance": "3"})
        assert created.status_code == 201, created.text  # the refused call stored nothing
        assert await balance_of(admin, "initech") == "3.000000000"
