"""The web console driven by a real Chromium (Playwright) through a `maas-gateway serve`
process: a tenant's overview, keys, invoices; another tenant's pages; finance closing a
month; CSRF. Set MAAS_CONSOLE_SCREENSHOTS to a directory to keep screenshots of the pages."""

from __future__ import annotations

import csv
import io
import os
import re
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright import sync_api as playwright_api

from billing.money import format_amount
from gateway.config import deep_merge
from tests.console_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    invoice_total_from_rows,
    last_month,
    pdf_text,
    raw_rows,
    write_past_usage,
)
from tests.harness import ACME_KEY, ADMIN_KEY, base_config, gateway_process

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PASSWORD = "correct horse battery"


def _nanos_text(nanos: int) -> str:
    whole, frac = format_amount(nanos).split(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _user(url: str, username: str, role: str, tenant: str | None) -> None:
    body: dict[str, Any] = {"username": username, "role": role, "password": PASSWORD}
    if tenant:
        body["tenant_id"] = tenant
    answer = httpx.post(url + "/admin/console-users", json=body, headers=ADMIN, timeout=30)
    assert answer.status_code == 201, answer.text


def _sign_in(page: Any, url: str, username: str) -> None:
    page.goto(url + "/console/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def _shoot(page: Any, name: str) -> None:
    target = os.environ.get("MAAS_CONSOLE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)


def _wait_for_rows(db: Path, tenant: str, start: datetime, count: int) -> list[Any]:
    deadline = time.monotonic() + 10
    while True:
        rows = raw_rows(db, tenant, start, datetime(2100, 1, 1, tzinfo=UTC))
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_tenant_and_finance_in_a_real_browser(
    browser: Any, tmp_path: Path, tokenizer_dir: Path
) -> None:
    db = tmp_path / "ledger.db"
    config = deep_merge(
        base_config(tmp_path, tokenizer_dir),
        {
            "console": {
                "seller": {"name": "Example Cloud Ltd", "address": ["1 Main St"], "tax_id": "GB1"},
                "buyers": {"acme": {"name": "Acme Corporation", "address": ["2 Side Rd"]}},
                "grafana_url": "http://grafana.example:3000",
            }
        },
    )
    past_month, moment = last_month()
    write_past_usage(config["ledger"]["url"], "acme", moment, 12)
    write_past_usage(config["ledger"]["url"], "globex", moment, 5)

    with gateway_process(config, tmp_path, name="console") as (url, _):
        _user(url, "alice", "owner", "acme")
        _user(url, "gina", "owner", "globex")
        _user(url, "fiona", "finance", None)
        _user(url, "oscar", "admin", None)

        # This month's traffic through the OpenAI SDK.
        client = openai.OpenAI(base_url=url + "/v1", api_key=ACME_KEY, max_retries=0)
        for i in range(6):
            client.chat.completions.create(
                model="gpt-4" if i % 2 else "gpt-4o-mini",
                messages=[{"role": "user", "content": f"Hello number {i}, " + "word " * 1500}],
                max_tokens=30,
            )
        month_start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        rows = _wait_for_rows(db, "acme", month_start, 6)
        assert len(rows) == 6

        context = browser.new_context(
            accept_downloads=True, viewport={"width": 1200, "height": 900}
        )
        page = context.new_page()

        # Signed out, a console page sends the browser to the sign-in page.
        page.goto(url + "/console/tenants/acme/")
        assert page.url.endswith("/console/login")
        _shoot(page, "console-login")

        # A tenant's owner: this month's tokens and cost are the ledger's.
        _sign_in(page, url, "alice")
        assert page.url.endswith("/console/tenants/acme/")
        tokens = sum(r["uncached_input"] + r["cached_input"] + r["output"] for r in rows)
        cost = sum(r["cost_nanos"] for r in rows)
        assert page.inner_text("#month-tokens") == f"{tokens:,}"
        assert page.inner_text("#month-cost") == _nanos_text(cost)
        assert page.inner_text("#month-requests") == "6"
        assert page.locator("svg.chart").count() == 4
        _shoot(page, "console-overview")

        # Create a key limited to one model; it is shown once and works with the SDK.
        page.click("text=API keys")
        page.fill("input[name=name]", "browser key")
        page.check("input[name='model:gpt-4o-mini']")
        page.click("text=Create key")
        secret = page.inner_text("#new-key-secret").strip()
        assert secret.startswith("sk-")
        _shoot(page, "console-keys")
        fresh = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        reply = fresh.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert reply.usage is not None
        with pytest.raises(openai.NotFoundError):  # the allowlist holds
            fresh.chat.completions.create(
                model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        page.goto(url + "/console/tenants/acme/keys")
        assert secret not in page.content()  # shown once only
        row = page.locator("tr", has_text="browser key")
        row.locator("button", has_text="Revoke").click()
        page.wait_for_load_state()
        assert page.locator("tr", has_text="browser key").locator(".status").inner_text() == (
            "revoked"
        )
        with pytest.raises(openai.AuthenticationError):
            fresh.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )

        # The invoice PDF's total is the ledger's (now with the new key's request too).
        rows = _wait_for_rows(db, "acme", month_start, 8)
        this_month = f"{month_start.year:04d}-{month_start.month:02d}"
        page.goto(url + "/console/tenants/acme/invoices")
        _shoot(page, "console-invoices")
        with page.expect_download() as download:
            page.click(f"a[href='/console/tenants/acme/invoices/{this_month}/pdf']")
        pdf = tmp_path / "invoice.pdf"
        download.value.save_as(pdf)
        text = pdf_text(pdf)
        expected = invoice_total_from_rows(rows)
        assert expected > 0
        total = re.search(r"Total\s+([\d.,]+) USD", text)
        assert total is not None, text
        assert Decimal(total.group(1).replace(",", "")) == expected
        for needed in (
            f"INV-acme-{this_month}",
            "Example Cloud Ltd",
            "Acme Corporation",
            "Issue date",
            "Due date",
            "Tax at 0%",
        ):
            assert needed in text, needed
        page.goto(url + f"/console/tenants/acme/invoices/{this_month}")
        _shoot(page, "console-invoice")

        # Another tenant's pages are unreachable by URL, as are the operator's.
        for path in (
            "/console/tenants/globex/",
            "/console/tenants/globex/keys",
            f"/console/tenants/globex/invoices/{this_month}/pdf",
            "/console/tenants/globex/usage/export?start=2020-01-01&end=2030-01-01",
            "/console/finance/",
            "/console/ops/",
        ):
            response = page.goto(url + path)
            assert response is not None and response.status == 404, path
            assert "globex" not in page.inner_text("main").lower()
        response = page.request.post(url + "/console/tenants/globex/keys", form={"name": "sneaky"})
        assert response.status in (403, 404)

        # A form without its CSRF token (or with a wrong one) is refused and changes nothing.
        keys_before = httpx.get(url + "/admin/tenants/acme/keys", headers=ADMIN).json()["data"]
        for form in ({"name": "no token"}, {"name": "bad token", "csrf_token": "forged"}):
            response = page.request.post(url + "/console/tenants/acme/keys", form=form)
            assert response.status == 403
            assert "CSRF" in response.text()
        keys_after = httpx.get(url + "/admin/tenants/acme/keys", headers=ADMIN).json()["data"]
        assert keys_after == keys_before

        # Sign out: the session is gone on the server.
        page.click("text=Sign out")
        page.wait_for_load_state()
        page.goto(url + "/console/tenants/acme/")
        assert page.url.endswith("/console/login")

        # Finance: every tenant's revenue; close last month; download its invoices.
        _sign_in(page, url, "fiona")
        assert page.url.endswith("/console/finance/")
        acme_revenue = page.locator("tr[data-tenant=acme] .revenue").inner_text()
        assert acme_revenue == _nanos_text(sum(r["cost_nanos"] for r in rows)) + " USD"
        _shoot(page, "console-finance")
        page.fill("#close-month input[name=month]", past_month)
        page.click("#close-month button")
        page.wait_for_load_state()
        assert page.url.endswith(f"/console/finance/months/{past_month}")
        assert page.inner_text("#reconciliation").startswith("OK")
        statuses = page.locator("#month-invoices .status").all_inner_texts()
        assert statuses == ["final", "final"]
        _shoot(page, "console-month")
        with page.expect_download() as download:
            page.click("#archive")
        archive = tmp_path / "month.zip"
        download.value.save_as(archive)
        with zipfile.ZipFile(archive) as bundle:
            names = sorted(bundle.namelist())
            assert names == sorted(
                [
                    f"INV-acme-{past_month}.pdf",
                    f"INV-globex-{past_month}.pdf",
                    f"invoices-{past_month}.csv",
                ]
            )
            table = list(csv.DictReader(io.StringIO(bundle.read(names[-1]).decode())))
            pdf_path = tmp_path / "acme-past.pdf"
            pdf_path.write_bytes(bundle.read(f"INV-acme-{past_month}.pdf"))
        past_start, _ = _month_bounds(past_month)
        past_rows = raw_rows(db, "acme", past_start, month_start)
        expected_past = invoice_total_from_rows(past_rows)
        totals = {r["tenant_id"]: Decimal(r["amount"]) for r in table if r["row_type"] == "total"}
        assert totals["acme"] == expected_past
        assert f"{expected_past} USD" in pdf_text(pdf_path)
        assert {r["status"] for r in table} == {"final"}

        # The operator's page: deployments and Grafana links.
        page.click("text=Sign out")
        _sign_in(page, url, "oscar")
        assert page.url.endswith("/console/ops/")
        assert page.locator("#deployments tbody tr").count() == 3
        assert page.locator("a[href='http://grafana.example:3000/d/maas-overview']").count() == 1
        _shoot(page, "console-ops")
        context.close()


def _month_bounds(month: str) -> tuple[datetime, datetime]:
    year, number = (int(x) for x in month.split("-"))
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start, end
