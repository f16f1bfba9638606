"""Console users and server-side sessions, stored in the ledger's database.

Passwords are hashed with argon2id (`argon2-cffi`); a session is a random cookie value
stored only as its sha256 (as API keys are), with its own CSRF token. Tables:
`console_users` and `console_sessions`, through `billing.store.console_users`.
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
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.store import console_users
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
        stored = await console_users.insert_user(
            self.engine,
            username=username,
            password_hash=hashed,
            role=role,
            tenant_id=tenant_id,
            created_at=datetime.now(UTC),
            replace=replace,
        )
        if not stored:
            raise UserError(f"username: {username!r} is taken")
        return User(username, tenant_id, role)

    async def list(self) -> list[User]:
        rows = await console_users.users(self.engine)
        return [User(r["username"], r["tenant_id"], r["role"]) for r in rows]

    async def delete(self, username: str) -> bool:
        return await console_users.delete_user(self.engine, username)

    async def authenticate(self, username: str, password: str) -> User | None:
        """The user when the password is right, else None (equal work either way)."""
        row = await console_users.find_user(self.engine, username)
        stored = row["password_hash"] if row is not None else _dummy_hash()
        try:
            await asyncio.to_thread(_hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        return User(row["username"], row["tenant_id"], row["role"])

    async def open_session(self, user: User, ttl: timedelta) -> tuple[str, str]:
        """A new session for `user`: (cookie value, CSRF token)."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        await console_users.insert_session(
            self.engine,
            id_hash=secret_digest(token),
            username=user.username,
            csrf=csrf,
            expires_at=now + ttl,
            now=now,
        )
        return token, csrf

    async def session(self, token: str | None) -> Session | None:
        """The live session behind a cookie value, or None."""
        if not token:
            return None
        row = await console_users.find_session(self.engine, secret_digest(token), datetime.now(UTC))
        if row is None:
            return None
        return Session(User(row["username"], row["tenant_id"], row["role"]), row["csrf"])

    async def close_session(self, token: str) -> None:
        await console_users.delete_session(self.engine, secret_digest(token))

    async def set_password(self, username: str, password: str) -> None:
        hashed = await asyncio.to_thread(_hasher.hash, password)
        await console_users.set_password_hash(self.engine, username, hashed)
