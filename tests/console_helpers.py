"""Helpers for the console tests: ledger rows written ahead of a gateway, sums read back
from the raw ledger (not the rollups the console reads), and PDF text."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing.ledger import Ledger, LedgerConfig
from billing.money import round_to_minor
from billing.record import UsageRecord
from billing.usage import Usage

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: gpt-4o-mini's list prices in the test configuration, nano-units per token.
MINI_INPUT, MINI_OUTPUT = 150, 600


def last_month(now: datetime | None = None) -> tuple[str, datetime]:
    """The previous UTC month ('2026-11') and a moment in its middle."""
    first = (now or datetime.now(UTC)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    moment = (first - timedelta(days=1)).replace(day=15, hour=12)
    return f"{moment.year:04d}-{moment.month:02d}", moment


def write_past_usage(ledger_url: str, tenant_id: str, moment: datetime, count: int) -> None:
    """`count` gpt-4o-mini requests for a tenant at `moment`, written through the ledger."""

    async def run() -> None:
        ledger = await Ledger.open(LedgerConfig(url=ledger_url, url_env=None))
        try:
            for i in range(count):
                usage = Usage(uncached_input=1000 + i, output=500 + 3 * i)
                cost = usage.uncached_input * MINI_INPUT + usage.output * MINI_OUTPUT
                ledger.record(
                    UsageRecord(
                        request_id=f"past-{tenant_id}-{i}",
                        started_at=moment + timedelta(minutes=i),
                        tenant_id=tenant_id,
                        key_id=f"{tenant_id}-main",
                        model="gpt-4o-mini",
                        endpoint="chat.completions",
                        usage=usage,
                        price_version="gpt-4o-mini@2026-01-01",
                        unit_price_input_nanos=MINI_INPUT,
                        unit_price_cached_nanos=MINI_INPUT // 2,
                        unit_price_output_nanos=MINI_OUTPUT,
                        cost_nanos=cost,
                        list_cost_nanos=cost,
                    )
                )
        finally:
            await ledger.aclose()

    # In a thread of its own: Playwright's sync API keeps an event loop in the caller's.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def raw_rows(db: Path, tenant_id: str, start: datetime, end: datetime) -> list[sqlite3.Row]:
    """A tenant's raw ledger rows that started in [start, end)."""
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return connection.execute(
            "SELECT * FROM ledger_entries WHERE tenant_id = ? AND started_at >= ?"
            " AND started_at < ?",
            (tenant_id, _text(start), _text(end)),
        ).fetchall()


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def invoice_total_from_rows(rows: list[Any], currency: str = "USD") -> Decimal:
    """An invoice's total computed from raw ledger rows the way invoices are defined: per
    model and price version, each token kind's list-price amount rounded once, the plan
    discount rounded once, summed (no tax)."""
    kinds: dict[tuple[Any, ...], int] = defaultdict(int)
    discount: dict[tuple[Any, ...], int] = defaultdict(int)
    for row in rows:
        version = (row["model"], row["price_version"])
        kinds[(*version, "in", row["list_price_input_nanos"])] += (
            row["uncached_input"] * row["list_price_input_nanos"]
        )
        kinds[(*version, "cached", row["list_price_cached_nanos"])] += (
            row["cached_input"] * row["list_price_cached_nanos"]
        )
        kinds[(*version, "out", row["list_price_output_nanos"])] += (
            row["output"] * row["list_price_output_nanos"]
        )
        discount[version] += row["cost_nanos"] - row["list_cost_nanos"]
    lines = [round_to_minor(n, currency) for n in kinds.values() if n]
    lines += [round_to_minor(n, currency) for n in discount.values() if n]
    return sum(lines, Decimal(0))


def pdf_text(path: Path) -> str:
    """The text of a PDF, read with poppler's `pdftotext`."""
    result = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, check=True, text=True
    )
    return result.stdout
