"""Stored OpenAI Responses: the `stored_responses` table (revision
`0004_apis_stored_responses`). Every read and delete is by id *and* tenant, and sees only
rows that have not expired; `gateway.response_store` says what is stored."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.store.engine import naive_utc
from billing.store.schema import STORED_RESPONSES as TABLE


async def save_response(
    engine: AsyncEngine,
    *,
    response_id: str,
    tenant_id: str,
    created_at: datetime,
    expires_at: datetime,
    response: str,
    messages: str,
) -> None:
    """Store a response object and its conversation (both as JSON text)."""
    async with engine.begin() as connection:
        await connection.execute(
            insert(TABLE).values(
                id=response_id,
                tenant_id=tenant_id,
                created_at=naive_utc(created_at),
                expires_at=naive_utc(expires_at),
                response=response,
                messages=messages,
            )
        )


async def find_response(
    engine: AsyncEngine, tenant_id: str, response_id: str, now: datetime
) -> tuple[str, str] | None:
    """The tenant's live stored response (response JSON, messages JSON), or None."""
    query = select(TABLE.c.response, TABLE.c.messages).where(
        TABLE.c.id == response_id,
        TABLE.c.tenant_id == tenant_id,
        TABLE.c.expires_at > naive_utc(now),
    )
    async with engine.connect() as connection:
        row = (await connection.execute(query)).first()
    return None if row is None else (row[0], row[1])


async def delete_response(
    engine: AsyncEngine, tenant_id: str, response_id: str, now: datetime
) -> bool:
    """Delete the tenant's live stored response; False when it has none by that id."""
    statement = delete(TABLE).where(
        TABLE.c.id == response_id,
        TABLE.c.tenant_id == tenant_id,
        TABLE.c.expires_at > naive_utc(now),
    )
    async with engine.begin() as connection:
        result = await connection.execute(statement)
    return bool(result.rowcount)


async def prune_responses(engine: AsyncEngine, now: datetime) -> None:
    """Delete every stored response expired by `now`."""
    async with engine.begin() as connection:
        await connection.execute(delete(TABLE).where(TABLE.c.expires_at <= naive_utc(now)))
