"""Stored OpenAI Responses: kept per tenant in the ledger's database, for a retention period.

A response made with `store: true` (the API's default) is saved with the conversation it
closes, as Chat Completions messages, so that a later request naming it in
`previous_response_id` continues that conversation. Every read and delete is by id *and*
tenant: another tenant's response is absent, exactly like one that never existed. Rows past
their `expires_at` are never returned and are pruned now and then. The table is
`stored_responses` (`billing.store.schema`, Alembic revision `0004_apis_stored_responses`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.store.engine import naive_utc
from billing.store.schema import STORED_RESPONSES

_PRUNE_EVERY_S = 300.0


class ResponsesConfig(BaseModel):
    """The `responses:` section: how long stored Responses are kept."""

    model_config = ConfigDict(extra="forbid")

    retention_days: float = Field(
        30, gt=0, description="Days a stored response stays retrievable (OpenAI keeps 30)"
    )


@dataclass(slots=True)
class StoredResponse:
    """A stored response object and the conversation (chat messages) it closes."""

    response: dict[str, Any]
    messages: list[dict[str, Any]]


class ResponseStore:
    """Stored responses over the ledger's async engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: AsyncEngine, config: ResponsesConfig | None = None) -> None:
        self.engine = engine
        self.retention = timedelta(days=(config or ResponsesConfig()).retention_days)
        self._last_prune = 0.0

    async def save(
        self,
        tenant_id: str,
        response: dict[str, Any],
        messages: list[dict[str, Any]],
        now: datetime,
    ) -> None:
        created = naive_utc(now)
        async with self.engine.begin() as connection:
            await connection.execute(
                insert(STORED_RESPONSES).values(
                    id=response["id"],
                    tenant_id=tenant_id,
                    created_at=created,
                    expires_at=created + self.retention,
                    response=msgspec.json.encode(response).decode(),
                    messages=msgspec.json.encode(messages).decode(),
                )
            )
        await self._prune_now_and_then(created)

    async def get(self, tenant_id: str, response_id: str, now: datetime) -> StoredResponse | None:
        """The tenant's live stored response with this id, or None (also for other tenants')."""
        table = STORED_RESPONSES
        query = select(table.c.response, table.c.messages).where(
            table.c.id == response_id,
            table.c.tenant_id == tenant_id,
            table.c.expires_at > naive_utc(now),
        )
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        if row is None:
            return None
        return StoredResponse(msgspec.json.decode(row[0]), msgspec.json.decode(row[1]))

    async def delete(self, tenant_id: str, response_id: str, now: datetime) -> bool:
        """Delete the tenant's stored response; False when it has none by that id."""
        table = STORED_RESPONSES
        statement = delete(table).where(
            table.c.id == response_id,
            table.c.tenant_id == tenant_id,
            table.c.expires_at > naive_utc(now),
        )
        async with self.engine.begin() as connection:
            result = await connection.execute(statement)
        return bool(result.rowcount)

    async def _prune_now_and_then(self, now: datetime) -> None:
        moment = time.monotonic()
        if moment - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = moment
        table = STORED_RESPONSES
        async with self.engine.begin() as connection:
            await connection.execute(delete(table).where(table.c.expires_at <= now))
