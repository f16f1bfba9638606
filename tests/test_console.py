"""The console over HTTP against a running gateway: users and roles, sign-in throttling,
sessions, CSRF, the usage export, reading rollups only, and the demo user at start-up."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event

from billing.money import format_amount
from gateway.config import parse_settings
from tests.console_helpers import pdf_text, raw_rows, write_past_usage
from tests.harness import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    PROJECT_ROOT,
    RunningGateway,
    base_config,
    free_port,
    running_gateway,
    stop_process,
    wait_for_http,
)

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PASSWORD = "a long enough password"


async def _user(gw: RunningGateway, username: str, role: str, tenant: str | None) -> None:
    body: dict[str, Any] = {"username": username, "role": role, "password": PASSWORD}
    if tenant:
        body["tenant_id"] = tenant
    async with gw.admin() as admin:
        answer = await admin.post("/admin/console-users", json=body)
    assert answer.status_code == 201, answer.text


def _recent(now: datetime) -> datetime:
    """Half an hour ago, but today: 40 requests a minute apart from it stay in today."""
    return max(now - timedelta(minutes=30), now.replace(hour=0, minute=0, second=0))


def _token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


async def _sign_in(
    client: httpx.AsyncClient, username: str, password: str = PASSWORD
) -> httpx.Response:
    page = await client.get("/console/login")
    return await client.post(
        "/console/login",
        data={"csrf_token": _token(page.text), "username": username, "password": password},
    )


def _client(gw: RunningGateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.url, timeout=30, follow_redirects=False)


async def test_console_users_through_the_admin_api(tmp_path: Path, tokenizer_dir: Path) -> None:
    async with running_gateway(tmp_path, tokenizer_dir) as gw, gw.admin() as admin:
        anonymous = await httpx.AsyncClient(base_url=gw.url).get("/admin/console-users")
        assert anonymous.status_code == 401
        made = await admin.post(
            "/admin/console-users", json={"username": "ann", "role": "owner", "tenant_id": "acme"}
        )
        assert made.status_code == 201
        password = made.json()["password"]  # generated, shown once
        assert len(password) >= 12
        listed = (await admin.get("/admin/console-users")).json()["data"]
        assert listed == [{"username": "ann", "tenant_id": "acme", "role": "owner"}]
        assert password not in str(listed)
        for body, status in (
            ({"username": "ann", "role": "owner", "tenant_id": "acme"}, 409),
            ({"username": "bob", "role": "admin", "tenant_id": "acme"}, 400),  # tenant role
            ({"username": "bob", "role": "owner"}, 400),  # an operator is admin or finance
            ({"username": "bob", "role": "owner", "tenant_id": "nobody"}, 404),
            ({"username": "bob", "role": "admin", "password": "short"}, 400),
            ({"username": "b b", "role": "admin"}, 400),
        ):
            answer = await admin.post("/admin/console-users", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert "error" in answer.json()
        async with _client(gw) as client:
            assert (await _sign_in(client, "ann", password)).status_code == 303
            assert (await client.get("/console/tenants/acme/")).status_code == 200
            assert (await admin.delete("/admin/console-users/ann")).status_code == 200
            gone = await client.get("/console/tenants/acme/")  # the session ended with the user
            assert gone.status_code == 303 and gone.headers["location"] == "/console/login"
        assert (await admin.delete("/admin/console-users/ann")).status_code == 404


async def test_users_cli_creates_and_lists(tmp_path: Path, tokenizer_dir: Path) -> None:
    async with running_gateway(tmp_path, tokenizer_dir) as gw:
        env = {"MAAS_ADMIN_KEY": ADMIN_KEY, "NEW_PASSWORD": PASSWORD}

        async def cli(*args: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "users", *args, "--url", gw.url,
                cwd=PROJECT_ROOT, env={**os.environ, **env},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await process.communicate()
            return process.returncode or 0, out.decode()

        code, out = await cli(
            "create", "carol", "--role", "finance", "--tenant", "acme", "--password-env",
            "NEW_PASSWORD",
        )  # fmt: skip
        assert code == 0, out
        code, out = await cli("create", "olga", "--role", "finance")
        assert code == 0 and '"password"' in out
        code, out = await cli("list")
        assert code == 0 and '"carol"' in out and '"olga"' in out
        code, out = await cli("create", "carol", "--role", "finance", "--tenant", "acme")
        assert code == 1 and "taken" in out
        async with _client(gw) as client:
            signed = await _sign_in(client, "carol")
            assert signed.headers["location"] == "/console/tenants/acme/"


async def test_sign_in_is_throttled_and_sessions_end(tmp_path: Path, tokenizer_dir: Path) -> None:
    async with running_gateway(tmp_path, tokenizer_dir) as gw, _client(gw) as client:
        await _user(gw, "dave", "owner", "acme")
        for _ in range(5):
            wrong = await _sign_in(client, "dave", "not the password")
            assert wrong.status_code == 401
            assert "Wrong username or password" in wrong.text
        refused = await _sign_in(client, "dave")  # even the right password, for a while
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert "maas_console" not in refused.cookies

        # A sign-in form posted without its cookie-bound token is refused.
        async with _client(gw) as other:
            forged = await other.post(
                "/console/login", data={"username": "dave", "password": PASSWORD}
            )
            assert forged.status_code == 403

    # A fresh gateway (a fresh window): sign in, then sign out ends the session server-side.
    async with running_gateway(tmp_path, tokenizer_dir) as gw, _client(gw) as client:
        signed = await _sign_in(client, "dave")
        assert signed.status_code == 303
        cookie = client.cookies.get("maas_console")
        assert cookie
        page = await client.get("/console/tenants/acme/")
        assert page.status_code == 200
        no_token = await client.post("/console/logout")
        assert no_token.status_code == 403
        out = await client.post("/console/logout", data={"csrf_token": _token(page.text)})
        assert out.status_code == 303
        async with httpx.AsyncClient(base_url=gw.url, cookies={"maas_console": cookie}) as old:
            stale = await old.get("/console/tenants/acme/", follow_redirects=False)
            assert stale.status_code == 303  # the old cookie no longer opens a session


async def test_roles_decide_what_each_user_may_do(tmp_path: Path, tokenizer_dir: Path) -> None:
    async with running_gateway(tmp_path, tokenizer_dir) as gw:
        for name, role, tenant in (
            ("mia", "member", "acme"),
            ("fred", "finance", "acme"),
            ("opfin", "finance", None),
            ("root", "admin", None),
        ):
            await _user(gw, name, role, tenant)
        expected = {
            "mia": {"/console/tenants/acme/": 200, "/console/tenants/acme/keys": 200,
                    "/console/tenants/acme/invoices": 403, "/console/finance/": 404,
                    "/console/tenants/globex/": 404},
            "fred": {"/console/tenants/acme/": 200, "/console/tenants/acme/keys": 403,
                     "/console/tenants/acme/invoices": 200, "/console/ops/": 404},
            "opfin": {"/console/finance/": 200, "/console/ops/": 403,
                      "/console/tenants/globex/invoices": 200},
            "root": {"/console/ops/": 200, "/console/finance/": 200,
                     "/console/tenants/globex/keys": 200},
        }  # fmt: skip
        for name, pages in expected.items():
            async with _client(gw) as client:
                await _sign_in(client, name)
                for path, status in pages.items():
                    answer = await client.get(path)
                    assert answer.status_code == status, (name, path)
                if name == "mia":  # a member sees keys but may not create one
                    keys = await client.get("/console/tenants/acme/keys")
                    made = await client.post(
                        "/console/tenants/acme/keys",
                        data={"csrf_token": _token(keys.text), "name": "x"},
                    )
                    assert made.status_code == 403
                    assert len(gw.gateway.directory.keys_of("acme")) == 2


async def test_overview_reads_rollups_only(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = base_config(tmp_path, tokenizer_dir)
    now = datetime.now(UTC)
    write_past_usage(config["ledger"]["url"], "acme", _recent(now), 40)
    async with running_gateway(tmp_path, tokenizer_dir) as gw, _client(gw) as client:
        await _user(gw, "eve", "owner", "acme")
        await _sign_in(client, "eve")
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        engine = gw.gateway.ledger.engine.sync_engine
        event.listen(engine, "before_cursor_execute", seen)
        try:
            page = await client.get("/console/tenants/acme/")
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        assert page.status_code == 200
        assert any("usage_rollups" in s for s in statements)
        assert not [s for s in statements if "ledger_entries" in s]
        assert float(page.headers["server-timing"].split("dur=")[1]) < 200
        rows = raw_rows(
            tmp_path / "ledger.db", "acme", now - timedelta(days=1), now + timedelta(days=1)
        )
        tokens = sum(r["uncached_input"] + r["output"] for r in rows)
        assert f'id="month-tokens">{tokens:,}<' in page.text
        assert 'id="month-requests">40<' in page.text
        per_bucket: dict[int, int] = {}
        for row in rows:
            started = datetime.fromisoformat(row["started_at"]).replace(tzinfo=UTC).timestamp()
            per_bucket[int(started) // 900] = per_bucket.get(int(started) // 900, 0) + 1
        busiest = max(per_bucket.values()) / 15
        assert f'id="busiest-rpm">{busiest:,.1f} (' in page.text


async def test_usage_export_is_the_ledger(tmp_path: Path, tokenizer_dir: Path) -> None:
    async with running_gateway(tmp_path, tokenizer_dir) as gw, _client(gw) as client:
        await _user(gw, "uma", "member", "acme")
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as api:
            for _ in range(3):
                answer = await api.post(
                    "/v1/chat/completions",
                    headers={"authorization": f"Bearer {ACME_KEY}"},
                    json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
                )
                assert answer.status_code == 200
        await _sign_in(client, "uma")
        today = datetime.now(UTC).date().isoformat()
        export = await client.get(
            "/console/tenants/acme/usage/export", params={"start": today, "end": today}
        )
        assert export.status_code == 200
        assert export.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(export.text)))
        start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        rows = raw_rows(tmp_path / "ledger.db", "acme", start, start + timedelta(days=1))
        assert len(table) == len(rows) == 3
        assert sorted(r["request_id"] for r in table) == sorted(r["request_id"] for r in rows)
        assert sum(int(r["cost_nanos"]) for r in table) == sum(r["cost_nanos"] for r in rows)
        assert {r["cost"] for r in table} == {format_amount(r["cost_nanos"]) for r in rows}
        empty = await client.get(
            "/console/tenants/acme/usage/export",
            params={"start": "2020-01-01", "end": "2020-01-02"},
        )
        assert empty.text.strip().split(",")[0] == "request_id" and empty.text.count("\n") == 1
        bad = await client.get(
            "/console/tenants/acme/usage/export", params={"start": today, "end": "2020-01-01"}
        )
        assert bad.status_code == 400


def _topup_key(page: str) -> str:
    """The top-up form's own idempotency key."""
    found = re.search(r'name="idempotency_key" value="([^"]+)"', page)
    assert found is not None, "the top-up form has no idempotency key"
    return found.group(1)


async def test_finance_tops_up_and_invoices_carry_tax(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = base_config(tmp_path, tokenizer_dir)
    config["tenants"][1].update(balance="10", tax_rate="0.2")
    config["console"] = {"seller": {"name": "Seller Co", "tax_id": "VAT-1"}}
    async with RunningGateway(parse_settings(config)) as gw, _client(gw) as client:
        await _user(gw, "fin", "finance", None)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as api:
            answer = await api.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {GLOBEX_KEY}"},
                json={"model": "gpt-4", "messages": [{"role": "user", "content": "x " * 3000}]},
            )
            assert answer.status_code == 200
        await _sign_in(client, "fin")
        page = await client.get("/console/finance/")
        before = await gw.gateway.quotas.balance("globex")
        assert before is not None
        refused = await client.post(
            "/console/finance/topup", data={"tenant": "globex", "amount": "5"}
        )
        assert refused.status_code == 403
        assert await gw.gateway.quotas.balance("globex") == before
        form = {"csrf_token": _token(page.text), "idempotency_key": _topup_key(page.text)}
        done = await client.post(
            "/console/finance/topup", data={**form, "tenant": "globex", "amount": "5.5"}
        )
        assert done.status_code == 303
        assert await gw.gateway.quotas.balance("globex") == before + 5_500_000_000
        shown = await client.get(done.headers["location"])
        assert f"balance is now {format_amount(before + 5_500_000_000)}" in shown.text
        again = await client.post(  # the same form sent twice (a double click, a reload)
            "/console/finance/topup", data={**form, "tenant": "globex", "amount": "5.5"}
        )
        assert "already applied" in (await client.get(again.headers["location"])).text
        assert await gw.gateway.quotas.balance("globex") == before + 5_500_000_000
        reused = await client.post(
            "/console/finance/topup", data={**form, "tenant": "globex", "amount": "7"}
        )
        assert "No top-up" in (await client.get(reused.headers["location"])).text
        assert await gw.gateway.quotas.balance("globex") == before + 5_500_000_000
        page = await client.get("/console/finance/")
        bad = await client.post(
            "/console/finance/topup",
            data={
                "csrf_token": _token(page.text),
                "idempotency_key": _topup_key(page.text),
                "tenant": "acme",
                "amount": "5",
            },
        )  # acme is billed in arrears
        assert "No top-up" in (await client.get(bad.headers["location"])).text

        month = datetime.now(UTC).strftime("%Y-%m")
        pdf = await client.get(f"/console/tenants/globex/invoices/{month}/pdf")
        assert pdf.headers["content-type"] == "application/pdf"
        path = tmp_path / "globex.pdf"
        path.write_bytes(pdf.content)
        text = pdf_text(path)
        subtotal = Decimal(re.search(r"Subtotal\s+([\d.]+) USD", text).group(1))  # type: ignore[union-attr]
        tax = Decimal(re.search(r"Tax at 20%\s+([\d.]+) USD", text).group(1))  # type: ignore[union-attr]
        total = Decimal(re.search(r"Total\s+([\d.]+) USD", text).group(1))  # type: ignore[union-attr]
        assert subtotal > 0 and tax == (subtotal * Decimal("0.2")).quantize(Decimal("0.01"))
        assert total == subtotal + tax
        assert "Seller Co" in text and "VAT-1" in text and "Globex" in text


def test_the_embedded_default_prints_a_demo_console_user(tmp_path: Path) -> None:
    """`maas-gateway serve` with no configuration (the README's first command)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(url + "/healthz", process=process)
            found = re.search(r"console: \S+ +user demo .* password: (\S+)", log.read_text())
            assert found is not None, log.read_text()
            with httpx.Client(base_url=url, timeout=30) as client:
                for username, home in (
                    ("demo", "/console/tenants/demo/"),
                    ("operator", "/console/ops/"),
                ):
                    client.cookies.clear()
                    page = client.get("/console/login")
                    signed = client.post(
                        "/console/login",
                        data={"csrf_token": _token(page.text), "username": username,
                              "password": found.group(1)},
                        follow_redirects=False,
                    )  # fmt: skip
                    assert signed.status_code == 303
                    assert signed.headers["location"] == home
                    assert client.get(home).status_code == 200
        finally:
            stop_process(process)


async def test_pages_on_postgresql(
    tmp_path: Path, tokenizer_dir: Path, postgres_database: str
) -> None:
    config = base_config(tmp_path, tokenizer_dir)
    config["ledger"] = {"url": postgres_database, "url_env": None}
    now = datetime.now(UTC)
    write_past_usage(postgres_database, "acme", _recent(now), 20)
    async with RunningGateway(parse_settings(config)) as gw, _client(gw) as client:
        await _user(gw, "pat", "admin", None)
        await _sign_in(client, "pat")
        overview = await client.get("/console/tenants/acme/")
        assert overview.status_code == 200
        assert 'id="month-requests">20<' in overview.text
        month = now.strftime("%Y-%m")
        today = now.date().isoformat()
        for path in (
            "/console/finance/",
            f"/console/finance/months/{month}",
            f"/console/finance/months/{month}/archive",
            f"/console/tenants/acme/invoices/{month}/pdf",
            f"/console/tenants/acme/usage/export?start={today}&end={today}",
            "/console/ops/",
        ):
            answer = await client.get(path)
            assert answer.status_code == 200, (path, answer.text[:300])
        export = await client.get(f"/console/tenants/acme/usage/export?start={today}&end={today}")
        assert len(export.text.strip().splitlines()) == 1 + 20
