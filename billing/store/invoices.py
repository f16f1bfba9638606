"""Finalised invoices (stored whole, as JSON) and what they charged, per usage month and
line key: the `invoices` and `invoiced_lines` tables. `billing.invoice` says what an
invoice is; this module only keeps them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.store.engine import dialect_insert, naive_utc
from billing.store.schema import INVOICED_LINES, INVOICES


async def invoice_document(engine: AsyncEngine, tenant_id: str, month: str) -> str | None:
    """The stored (finalised) invoice of a tenant-month as JSON, or None."""
    query = select(INVOICES.c.document).where(
        INVOICES.c.tenant_id == tenant_id, INVOICES.c.month == month
    )
    async with engine.connect() as connection:
        document: str | None = await connection.scalar(query)
    return document


async def invoice_numbers(engine: AsyncEngine, tenant_id: str) -> dict[str, str]:
    """The tenant's finalised invoices: month -> invoice number."""
    query = select(INVOICES.c.month, INVOICES.c.number).where(INVOICES.c.tenant_id == tenant_id)
    async with engine.connect() as connection:
        return {row.month: row.number for row in await connection.execute(query)}


async def invoiced(
    engine: AsyncEngine, tenant_id: str, usage_month: str
) -> dict[str, tuple[int, int]]:
    """Everything finalised invoices charged for a month's usage: line key -> (quantity,
    amount in nanos)."""
    query = (
        select(
            INVOICED_LINES.c.line_key,
            func.sum(INVOICED_LINES.c.quantity),
            func.sum(INVOICED_LINES.c.amount_nanos),
        )
        .where(
            INVOICED_LINES.c.tenant_id == tenant_id,
            INVOICED_LINES.c.usage_month == usage_month,
        )
        .group_by(INVOICED_LINES.c.line_key)
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return {key: (int(quantity), int(nanos)) for key, quantity, nanos in rows}


async def store_final_invoice(
    engine: AsyncEngine,
    tenant_id: str,
    month: str,
    *,
    number: str,
    finalized_at: datetime,
    document: str,
    charged: Mapping[tuple[str, str], tuple[int, int]],
) -> bool:
    """Store a finalised invoice and what it charged ((usage month, line key) -> (quantity,
    nanos)) in one transaction; False, storing nothing, when the month is already stored."""
    async with engine.begin() as connection:
        insert = dialect_insert(connection, INVOICES).on_conflict_do_nothing(
            index_elements=["tenant_id", "month"]
        )
        result = await connection.execute(
            insert,
            {
                "tenant_id": tenant_id,
                "month": month,
                "number": number,
                "finalized_at": naive_utc(finalized_at),
                "document": document,
            },
        )
        if result.rowcount != 1:
            return False
        if charged:
            await connection.execute(
                INVOICED_LINES.insert(),
                [
                    {
                        "tenant_id": tenant_id,
                        "invoice_month": month,
                        "usage_month": usage_month,
                        "line_key": key,
                        "quantity": quantity,
                        "amount_nanos": nanos,
                    }
                    for (usage_month, key), (quantity, nanos) in charged.items()
                ],
            )
    return True
