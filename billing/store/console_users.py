"""The web console's users and sessions: the `console_users` and `console_sessions`
tables (revision `0005_console_users`). Passwords arrive already hashed and sessions by
the hash of their cookie; `gateway.console.users` does the hashing and the checks."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.store.engine import naive_utc
from billing.store.schema import CONSOLE_SESSIONS as SESSIONS
from billing.store.schema import CONSOLE_USERS as USERS


class _Taken(Exception):
    """The username is taken: the transaction rolls back."""


async def insert_user(
    engine: AsyncEngine,
    *,
    username: str,
    password_hash: str,
    role: str,
    tenant_id: str | None,
    created_at: datetime,
    replace: bool,
) -> bool:
    """Store a user; `replace` first removes one of that name and its sessions. False when
    the name is taken (and not replaced)."""
    row = {
        "username": username,
        "password_hash": password_hash,
        "tenant_id": tenant_id,
        "role": role,
        "created_at": naive_utc(created_at),
    }
    try:
        async with engine.begin() as connection:
            if replace:
                await connection.execute(delete(USERS).where(USERS.c.username == username))
                await connection.execute(delete(SESSIONS).where(SESSIONS.c.username == username))
            try:
                await connection.execute(insert(USERS), row)
            except IntegrityError:
                raise _Taken from None
    except _Taken:
        return False
    return True


async def users(engine: AsyncEngine) -> list[Mapping[str, Any]]:
    """Every user (username, tenant_id, role, ...), by username."""
    async with engine.connect() as connection:
        rows = await connection.execute(select(USERS).order_by(USERS.c.username))
        return [dict(row._mapping) for row in rows]


async def find_user(engine: AsyncEngine, username: str) -> Mapping[str, Any] | None:
    """The user row of that name (with its password hash), or None."""
    async with engine.connect() as connection:
        row = (await connection.execute(select(USERS).where(USERS.c.username == username))).first()
    return None if row is None else dict(row._mapping)


async def delete_user(engine: AsyncEngine, username: str) -> bool:
    """Delete a user and its sessions; False when there is no such user."""
    async with engine.begin() as connection:
        await connection.execute(delete(SESSIONS).where(SESSIONS.c.username == username))
        result = await connection.execute(delete(USERS).where(USERS.c.username == username))
    return bool(result.rowcount)


async def set_password_hash(engine: AsyncEngine, username: str, password_hash: str) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            update(USERS).where(USERS.c.username == username).values(password_hash=password_hash)
        )


async def insert_session(
    engine: AsyncEngine,
    *,
    id_hash: str,
    username: str,
    csrf: str,
    expires_at: datetime,
    now: datetime,
) -> None:
    """Store a session (dropping every session expired by `now` on the way)."""
    async with engine.begin() as connection:
        await connection.execute(delete(SESSIONS).where(SESSIONS.c.expires_at < naive_utc(now)))
        await connection.execute(
            insert(SESSIONS),
            {
                "id_hash": id_hash,
                "username": username,
                "csrf": csrf,
                "expires_at": naive_utc(expires_at),
            },
        )


async def find_session(
    engine: AsyncEngine, id_hash: str, now: datetime
) -> Mapping[str, Any] | None:
    """The live session with that hash and its user (username, tenant_id, role, csrf)."""
    query = (
        select(USERS.c.username, USERS.c.tenant_id, USERS.c.role, SESSIONS.c.csrf)
        .select_from(SESSIONS.join(USERS, USERS.c.username == SESSIONS.c.username))
        .where(SESSIONS.c.id_hash == id_hash, SESSIONS.c.expires_at > naive_utc(now))
    )
    async with engine.connect() as connection:
        row = (await connection.execute(query)).first()
    return None if row is None else dict(row._mapping)


async def delete_session(engine: AsyncEngine, id_hash: str) -> None:
    async with engine.begin() as connection:
        await connection.execute(delete(SESSIONS).where(SESSIONS.c.id_hash == id_hash))
