"""Stored OpenAI Responses: kept per tenant in the ledger's database, for a retention period.

A response made with `store: true` (the API's default) is saved with the conversation it
closes, as Chat Completions messages, so that a later request naming it in
`previous_response_id` continues that conversation. Every read and delete is by id *and*
tenant: another tenant's response is absent, exactly like one that never existed. Rows past
their `expires_at` are never returned and are pruned now and then. The rows live in
`stored_responses`, through `billing.store.responses`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.store import responses

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
        await responses.save_response(
            self.engine,
            response_id=response["id"],
            tenant_id=tenant_id,
            created_at=now,
            expires_at=now + self.retention,
            response=msgspec.json.encode(response).decode(),
            messages=msgspec.json.encode(messages).decode(),
        )
        await self._prune_now_and_then(now)

    async def get(self, tenant_id: str, response_id: str, now: datetime) -> StoredResponse | None:
        """The tenant's live stored response with this id, or None (also for other tenants')."""
        row = await responses.find_response(self.engine, tenant_id, response_id, now)
        if row is None:
            return None
        return StoredResponse(msgspec.json.decode(row[0]), msgspec.json.decode(row[1]))

    async def delete(self, tenant_id: str, response_id: str, now: datetime) -> bool:
        """Delete the tenant's stored response; False when it has none by that id."""
        return await responses.delete_response(self.engine, tenant_id, response_id, now)

    async def _prune_now_and_then(self, now: datetime) -> None:
        moment = time.monotonic()
        if moment - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = moment
        await responses.prune_responses(self.engine, now)
