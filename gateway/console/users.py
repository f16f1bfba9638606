"""Console users and server-side sessions, stored in the ledger's database.

Passwords are hashed with argon2id (`argon2-cffi`); a session is a random cookie value
stored only as its sha256 (as API keys are), with its own CSRF token. Tables:
`console_users` and `console_sessions` (`billing.store.schema`, Alembic revision
`0005_console_users`).
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.store.engine import naive_utc
from billing.store.schema import CONSOLE_SESSIONS as SESSIONS
from billing.store.schema import CONSOLE_USERS as USERS
from gateway.auth import secret_digest

TENANT_ROLES = ("owner", "member", "finance")
OPERATOR_ROLES = ("admin", "finance")
USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 8

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username is unknown: a miss costs what a wrong password does."""
    return _hasher.hash(secrets.token_hex(16))


@dataclass(frozen=True, slots=True)
class User:
    """A console user: a tenant's (owner, member, finance) or the operator's (admin, finance)."""

    username: str
    tenant_id: str | None
    role: str

    @property
    def is_operator(self) -> bool:
        return self.tenant_id is None

    def public(self) -> dict[str, object]:
        return {"username": self.username, "tenant_id": self.tenant_id, "role": self.role}


@dataclass(frozen=True, slots=True)
class Session:
    user: User
    csrf: str


class UserError(ValueError):
    """A user that cannot be created as asked (bad name, role, password; name taken)."""


def check_new_user(username: str, role: str, tenant_id: str | None, password: str) -> None:
    if not USERNAME.match(username):
        raise UserError("username: 1-64 letters, digits or _.@-")
    roles = OPERATOR_ROLES if tenant_id is None else TENANT_ROLES
    if role not in roles:
        who = "an operator" if tenant_id is None else "a tenant"
        raise UserError(f"role: {who} user's role is one of {', '.join(roles)}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password: at least {MIN_PASSWORD} characters")


def generate_password() -> str:
    return secrets.token_urlsafe(12)


class UserStore:
    """Users and sessions over an async SQLAlchemy engine (the ledger's)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self, username: str, password: str, role: str, tenant_id: str | None, *, replace: bool
    ) -> User:
        """Store a user (argon2 hash of `password`); `replace` overwrites one with that name."""
        check_new_user(username, role, tenant_id, password)
        hashed = await asyncio.to_thread(_hasher.hash, password)
        row = {
            "username": username,
            "password_hash": hashed,
            "tenant_id": tenant_id,
            "role": role,
            "created_at": naive_utc(datetime.now(UTC)),
        }
        async with self.engine.begin() as connection:
            if replace:
                await connection.execute(delete(USERS).where(USERS.c.username == username))
                await connection.execute(delete(SESSIONS).where(SESSIONS.c.username == username))
            try:
                await connection.execute(insert(USERS), row)
            except IntegrityError:
                raise UserError(f"username: {username!r} is taken") from None
        return User(username, tenant_id, role)

    async def list(self) -> list[User]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(select(USERS).order_by(USERS.c.username))
            return [User(r.username, r.tenant_id, r.role) for r in rows]

    async def delete(self, username: str) -> bool:
        async with self.engine.begin() as connection:
            await connection.execute(delete(SESSIONS).where(SESSIONS.c.username == username))
            result = await connection.execute(delete(USERS).where(USERS.c.username == username))
        return bool(result.rowcount)

    async def authenticate(self, username: str, password: str) -> User | None:
        """The user when the password is right, else None (equal work either way)."""
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(select(USERS).where(USERS.c.username == username))
            ).first()
        stored = row.password_hash if row is not None else _dummy_hash()
        try:
            await asyncio.to_thread(_hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        return User(row.username, row.tenant_id, row.role)

    async def open_session(self, user: User, ttl: timedelta) -> tuple[str, str]:
        """A new session for `user`: (cookie value, CSRF token)."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        async with self.engine.begin() as connection:
            await connection.execute(delete(SESSIONS).where(SESSIONS.c.expires_at < naive_utc(now)))
            await connection.execute(
                insert(SESSIONS),
                {
                    "id_hash": secret_digest(token),
                    "username": user.username,
                    "csrf": csrf,
                    "expires_at": naive_utc(now + ttl),
                },
            )
        return token, csrf

    async def session(self, token: str | None) -> Session | None:
        """The live session behind a cookie value, or None."""
        if not token:
            return None
        query = (
            select(USERS.c.username, USERS.c.tenant_id, USERS.c.role, SESSIONS.c.csrf)
            .select_from(SESSIONS.join(USERS, USERS.c.username == SESSIONS.c.username))
            .where(
                SESSIONS.c.id_hash == secret_digest(token),
                SESSIONS.c.expires_at > naive_utc(datetime.now(UTC)),
            )
        )
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        if row is None:
            return None
        return Session(User(row.username, row.tenant_id, row.role), row.csrf)

    async def close_session(self, token: str) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                delete(SESSIONS).where(SESSIONS.c.id_hash == secret_digest(token))
            )

    async def set_password(self, username: str, password: str) -> None:
        hashed = await asyncio.to_thread(_hasher.hash, password)
        async with self.engine.begin() as connection:
            await connection.execute(
                update(USERS).where(USERS.c.username == username).values(password_hash=hashed)
            )
