"""Tenants and keys created through the admin API are stored in the ledger's database:
they survive a restart, every gateway process sharing the database sees them within a
couple of seconds, revocation is immediate where it was made, and only the key's hash and
display prefix are ever written down."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.auth import hash_key
from gateway.config import deep_merge
from tests.harness import ACME_KEY, ADMIN_KEY, base_config, gateway_process, running_gateway

PROPAGATION_SECONDS = 3.0
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def _config(tmp: Path, tokenizer_dir: Path, name: str, ledger_url: str) -> Any:
    ledger = {"url": ledger_url, "journal_dir": str(tmp / f"{name}.journal")}
    return deep_merge(base_config(tmp, tokenizer_dir), {"ledger": ledger})


def _admin_post(url: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(url + path, json=body or {}, headers=ADMIN, timeout=10)


def _models_status(url: str, key: str) -> int:
    answer = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5)
    return answer.status_code


def _create_tenant_and_key(url: str, tenant_id: str) -> dict[str, Any]:
    tenant = _admin_post(
        url,
        "/admin/tenants",
        {"id": tenant_id, "name": "Initech", "timezone": "Europe/Berlin", "balance": "25.50"},
    )
    assert tenant.status_code == 201, tenant.text
    key = _admin_post(url, f"/admin/tenants/{tenant_id}/keys", {"name": "ci", "models": ["gpt-4"]})
    assert key.status_code == 201, key.text
    return dict(key.json())


def _seconds_until(check: Callable[[], bool], limit: float = PROPAGATION_SECONDS) -> float:
    """Seconds until `check()` holds; fails the test when it does not within `limit`."""
    started = time.monotonic()
    while not check():
        elapsed = time.monotonic() - started
        assert elapsed < limit, f"not true within {limit}s"
        time.sleep(0.05)
    return time.monotonic() - started


def _chat(url: str, key: str, model: str = "gpt-4") -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hello"}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )


def _two_processes_share_keys(tmp: Path, tokenizer_dir: Path, ledger_url: str) -> dict[str, Any]:
    """Two processes on one database: what one creates or revokes, the other follows.
    Returns the keys made: `kept` (still valid) and `revoked`."""
    config_a = _config(tmp, tokenizer_dir, "a", ledger_url)
    config_b = _config(tmp, tokenizer_dir, "b", ledger_url)
    with (
        gateway_process(config_a, tmp, name="a") as (url_a, _),
        gateway_process(config_b, tmp, name="b") as (url_b, _),
    ):
        created = _create_tenant_and_key(url_a, "initech")
        secret = created["key"]
        assert _models_status(url_a, secret) == 200
        _seconds_until(lambda: _models_status(url_b, secret) == 200)
        assert _chat(url_b, secret).status_code == 200
        assert _chat(url_b, secret, model="gpt-4o-mini").status_code != 200  # allowlist kept

        # A tenant created on A moments ago takes keys on B at once.
        assert _admin_post(url_a, "/admin/tenants", {"id": "hooli"}).status_code == 201
        kept = _admin_post(url_b, "/admin/tenants/hooli/keys", {"name": "from b"})
        assert kept.status_code == 201, kept.text
        _seconds_until(lambda: _models_status(url_a, kept.json()["key"]) == 200)
        assert _admin_post(url_b, "/admin/tenants", {"id": "hooli"}).status_code == 409

        revoked = _admin_post(url_a, f"/admin/keys/{created['id']}/revoke")
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        assert _models_status(url_a, secret) == 401  # at once where it was revoked
        _seconds_until(lambda: _models_status(url_b, secret) == 401)
    return {"kept": kept.json(), "revoked": created}


def test_sqlite_keys_are_shared_survive_restarts_and_store_no_secret(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    ledger_url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    made = _two_processes_share_keys(tmp_path, tokenizer_dir, ledger_url)
    kept, revoked = made["kept"], made["revoked"]

    config = _config(tmp_path, tokenizer_dir, "a", ledger_url)
    with gateway_process(config, tmp_path, name="restarted") as (url, _):
        assert _chat(url, kept["key"]).status_code == 200
        assert _models_status(url, revoked["key"]) == 401
        assert _chat(url, revoked["key"]).status_code == 401
        tenants = httpx.get(url + "/admin/tenants", headers=ADMIN).json()["data"]
        initech = next(t for t in tenants if t["id"] == "initech")
        assert initech["name"] == "Initech" and initech["prepaid"] is True
        keys = httpx.get(url + "/admin/tenants/initech/keys", headers=ADMIN).json()["data"]
        assert [(k["id"], k["revoked"], k["models"]) for k in keys] == [
            (revoked["id"], True, ["gpt-4"])
        ]
        balance = httpx.get(url + "/admin/tenants/initech/balance", headers=ADMIN).json()
        assert balance["balance"] is not None
        assert _admin_post(url, "/admin/tenants", {"id": "initech"}).status_code == 409

    stored = b"".join(path.read_bytes() for path in tmp_path.glob("ledger.db*"))
    for key in (kept, revoked):
        assert key["key"].encode() not in stored
        assert key["key"][len(key["prefix"]) :].encode() not in stored
        assert hash_key(key["key"]).encode() in stored
        assert key["prefix"].encode() in stored


def test_postgres_keys_are_shared(
    tmp_path: Path, tokenizer_dir: Path, postgres_database: str
) -> None:
    _two_processes_share_keys(tmp_path, tokenizer_dir, postgres_database)


async def test_the_configuration_file_stays_authoritative(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    async with running_gateway(tmp_path, tokenizer_dir) as gw, gw.admin() as admin:
        assert (await admin.post("/admin/tenants", json={"id": "acme"})).status_code == 409
        stored = await admin.post("/admin/tenants", json={"id": "hooli", "name": "From the API"})
        assert stored.status_code == 201
        refused = await admin.post("/admin/keys/acme-main/revoke")
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "key_in_config"
        assert (await admin.post("/admin/keys/key_nope/revoke")).status_code == 404
        acme = {"authorization": f"Bearer {ACME_KEY}"}
        assert (await admin.get("/v1/models", headers=acme)).status_code == 200

    # A file that defines the same tenant id wins over the stored row.
    in_file = {"id": "hooli", "name": "From the file", "keys": []}
    tenants = [*base_config(tmp_path, tokenizer_dir)["tenants"], in_file]
    async with running_gateway(tmp_path, tokenizer_dir, tenants=tenants) as gw:
        assert gw.gateway.directory.tenants["hooli"].name == "From the file"
