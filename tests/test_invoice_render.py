"""Invoice output: JSON, CSV that a spreadsheet parses, and an HTML page that a real headless
Chromium prints to PDF with the invoice number, tenant, period, lines and total."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from billing.invoice import Invoice, TenantBilling, build_invoice
from billing.invoice_render import CSV_COLUMNS, render_invoice
from billing.ledger import Ledger
from billing.usage import Usage
from tests.test_ledger import make_record, sqlite_config

LIST = {"input": 2_500, "cached": 1_250, "output": 10_000}
PLAN = {"input": 2_000, "cached": 1_000, "output": 8_000}


@pytest.fixture
async def invoice(tmp_path: Path) -> AsyncIterator[Invoice]:
    ledger = await Ledger.open(sqlite_config(tmp_path))
    try:
        for index in range(40):
            ledger.record(
                make_record(
                    f"r{index}",
                    datetime(2026, 10, 1 + index % 30, 8, tzinfo=UTC),
                    model="gpt-sim" if index % 2 else "deep-sim",
                    usage=Usage(123_456, 65_432, 34_567, 1_000),
                    prices=PLAN,
                    list_prices=LIST,
                )
            )
        tenant = TenantBilling(
            "acme", "Acme & Sons <Ltd>", timezone="Asia/Kolkata", tax_rate=Decimal("0.18")
        )
        await ledger.flush()
        yield await build_invoice(ledger, tenant, "2026-10")
    finally:
        await ledger.aclose()


def test_json_round_trips(invoice: Invoice) -> None:
    data = json.loads(render_invoice(invoice, "json"))
    assert data["number"] == "INV-acme-2026-10"
    assert data["total"] == str(invoice.total)
    assert data["exact_nanos"] == sum(line["amount_nanos"] for line in data["lines"])
    assert Invoice.from_dict(data).to_dict() == data | {"exact_nanos": data["exact_nanos"]}


def test_csv_parses_and_adds_up(invoice: Invoice) -> None:
    rows = list(csv.DictReader(io.StringIO(render_invoice(invoice, "csv"))))
    assert tuple(rows[0]) == CSV_COLUMNS
    lines = [row for row in rows if row["row_type"] in ("usage", "discount", "adjustment")]
    assert len(lines) == len(invoice.lines) == 8  # 2 models x (3 token kinds + discount)
    totals = {row["row_type"]: Decimal(row["amount"]) for row in rows}
    assert sum(Decimal(row["amount"]) for row in lines) == totals["subtotal"] == invoice.subtotal
    assert totals["subtotal"] + totals["tax"] == totals["total"] == invoice.total
    quantities = [int(row["quantity"]) for row in lines if row["row_type"] == "usage"]
    assert sum(quantities) == 40 * (123_456 + 65_432 + 34_567)


def test_html_escapes_and_shows_everything(invoice: Invoice) -> None:
    page = render_invoice(invoice, "html")
    assert "Acme &amp; Sons &lt;Ltd&gt;" in page
    assert "@media print" in page
    assert f"{invoice.total:,} USD" in page
    assert "2026-10-01 to 2026-10-31 (Asia/Kolkata)" in page


def test_html_prints_to_pdf_in_headless_chromium(invoice: Invoice, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    pdftotext = shutil.which("pdftotext")
    if chromium is None or pdftotext is None:
        pytest.fail("needs Chromium and pdftotext (Debian: apt-get install chromium poppler-utils)")
    page = tmp_path / "invoice.html"
    page.write_text(render_invoice(invoice, "html"), encoding="utf-8")
    pdf = tmp_path / "invoice.pdf"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--no-pdf-header-footer",
            f"--print-to-pdf={pdf}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=90,
    )
    assert pdf.read_bytes().startswith(b"%PDF")
    text = subprocess.run(
        [pdftotext, "-layout", str(pdf), "-"], check=True, capture_output=True, text=True
    ).stdout
    assert "INV-acme-2026-10" in text
    assert "Acme & Sons <Ltd>" in text
    assert "2026-10-01 to 2026-10-31" in text
    assert "Plan discount" in text
    assert f"{invoice.total:,} USD" in text
    assert f"{invoice.tax:,} USD" in text
