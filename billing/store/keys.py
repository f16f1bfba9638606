"""Tenants and API keys made through the admin API: the `tenants`, `api_keys` and
`keystore_version` tables (revision `0003_tenants_and_keys`).

Rows go in and come out as plain mappings of column values; `gateway.keystore` turns them
into tenants and keys. Every change bumps the one version counter in the same
transaction, so a process can tell cheaply whether to reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing.store.schema import API_KEYS, KEYSTORE_VERSION, TENANTS

Rows = list[Mapping[str, Any]]


async def version(engine: AsyncEngine) -> int:
    """A number that grows with every stored change (one indexed row read)."""
    async with engine.connect() as connection:
        result = await connection.execute(
            select(KEYSTORE_VERSION.c.version).where(KEYSTORE_VERSION.c.id == 1)
        )
        return int(result.scalar_one())


async def load(engine: AsyncEngine) -> tuple[Rows, Rows]:
    """Every stored tenant row and key row, oldest first."""
    async with engine.connect() as connection:
        tenants = await connection.execute(
            select(TENANTS).order_by(TENANTS.c.created_at, TENANTS.c.id)
        )
        keys = await connection.execute(
            select(API_KEYS).order_by(API_KEYS.c.created_at, API_KEYS.c.id)
        )
        return [dict(row._mapping) for row in tenants], [dict(row._mapping) for row in keys]


async def insert_tenant(engine: AsyncEngine, row: Mapping[str, Any]) -> bool:
    """Store a tenant row; False, changing nothing, when its id is taken."""
    return await _insert(engine, TENANTS, row)


async def insert_key(engine: AsyncEngine, row: Mapping[str, Any]) -> bool:
    """Store a key row (its hash, never the secret); False when its id or hash is taken."""
    return await _insert(engine, API_KEYS, row)


async def revoke_key(engine: AsyncEngine, key_id: str) -> bool:
    """Mark a stored key revoked; False when no key has this id."""
    async with engine.begin() as connection:
        statement = update(API_KEYS).where(API_KEYS.c.id == key_id).values(revoked=True)
        result = await connection.execute(statement)
        if result.rowcount == 0:
            return False
        await _bump(connection)
    return True


class _Taken(Exception):
    """The row's key is taken: the transaction rolls back."""


async def _insert(engine: AsyncEngine, table: Table, row: Mapping[str, Any]) -> bool:
    try:
        async with engine.begin() as connection:
            try:
                await connection.execute(insert(table).values(**row))
            except IntegrityError:
                raise _Taken from None
            await _bump(connection)
    except _Taken:
        return False
    return True


async def _bump(connection: AsyncConnection) -> None:
    await connection.execute(
        update(KEYSTORE_VERSION)
        .where(KEYSTORE_VERSION.c.id == 1)
        .values(version=KEYSTORE_VERSION.c.version + 1)
    )
