"""Tenants and API keys created through the admin API, kept in the ledger's database.

`KeyStore` keeps tenants and keys in the `tenants` and `api_keys` tables through
`billing.store.keys`, over the ledger's async engine, SQLite or PostgreSQL; every change
also bumps one version counter in the same transaction. A key is stored as its `sha256:`
hash and display prefix, never the secret.

`DirectorySync` keeps a `Directory` in step with the store: it loads the stored tenants and
keys at start, then polls the version every `interval` seconds and reloads when it moved,
so a key created or revoked through any gateway process sharing the database works (or
stops working) on all of them within a poll. Changes made through it are committed to the
database before they are applied to its own directory, at once. Configuration-file tenants
and keys are never stored and always win over stored rows with the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from billing.quota import Limits
from billing.store import keys
from billing.store.engine import aware_utc, naive_utc
from gateway.auth import ApiKey, Directory, Tenant, mint_key
from gateway.errors import ApiError

log = logging.getLogger(__name__)

#: How often each gateway process looks for tenants and keys changed elsewhere, in seconds.
REFRESH_SECONDS = 2.0


class Conflict(ApiError):
    """A change refused with a 409: the id is taken, or the file defines that key."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(409, message, code=code)


class KeyStore:
    """The stored tenants and keys, over an async SQLAlchemy engine (the ledger's)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def version(self) -> int:
        """A number that grows with every stored change (one indexed row read)."""
        return await keys.version(self.engine)

    async def load(self) -> tuple[list[Tenant], list[ApiKey]]:
        """Every stored tenant and key, oldest first; unreadable rows are skipped."""
        tenant_rows, key_rows = await keys.load(self.engine)
        return _converted(tenant_rows, _tenant_of), _converted(key_rows, _key_of)

    async def save_tenant(self, tenant: Tenant) -> None:
        """Store a new tenant; `Conflict` when its id is taken."""
        if not await keys.insert_tenant(self.engine, _tenant_row(tenant)):
            raise Conflict(f"Tenant {tenant.id!r} exists.", "tenant_exists")

    async def save_key(self, key: ApiKey) -> None:
        """Store a new key (its hash, never the secret); `Conflict` when id or hash is taken."""
        if not await keys.insert_key(self.engine, _key_row(key)):
            raise Conflict(f"Key {key.id!r} exists.", "key_exists")

    async def revoke(self, key_id: str) -> bool:
        """Mark a stored key revoked; False when no key has this id."""
        return await keys.revoke_key(self.engine, key_id)


class DirectorySync:
    """Keeps a `Directory` in step with a `KeyStore`; make admin changes through it.

    `on_new_tenant` is awaited for each tenant that appears through a reload (for example
    to open a prepaid balance). Call `start()` once the engine is open and `aclose()` before
    it closes.
    """

    def __init__(
        self,
        directory: Directory,
        store: KeyStore,
        *,
        interval: float = REFRESH_SECONDS,
        on_new_tenant: Callable[[Tenant], Awaitable[None]] | None = None,
    ) -> None:
        self.directory = directory
        self.store = store
        self.interval = interval
        self.on_new_tenant = on_new_tenant
        self._lock = asyncio.Lock()
        self._seen_version: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the stored tenants and keys, then poll for changes in the background."""
        await self.refresh(force=True)
        self._task = asyncio.create_task(self._poll(), name="directory-sync")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload when the stored version moved (always with `force`); True when reloaded."""
        async with self._lock:
            return await self._reload(force)

    async def create_tenant(self, tenant: Tenant) -> None:
        """Store a new tenant, then add it here; `Conflict` when the id is known or stored."""
        async with self._lock:
            if tenant.id in self.directory.tenants:
                raise Conflict(f"Tenant {tenant.id!r} exists.", "tenant_exists")
            await self.store.save_tenant(tenant)
            self.directory.add_tenant(tenant, stored=True)

    async def create_key(self, tenant_id: str, **fields: Any) -> tuple[ApiKey, str] | None:
        """Mint and store a key, then add it here; returns it and its secret (shown once).

        None when the tenant is unknown (after a reload, for one created elsewhere just now).
        """
        async with self._lock:
            if tenant_id not in self.directory.tenants:
                await self._reload(force=True)
                if tenant_id not in self.directory.tenants:
                    return None
            if isinstance(fields.get("expires_at"), datetime):
                fields["expires_at"] = aware_utc(fields["expires_at"])  # naive input is UTC
            key, secret = mint_key(tenant_id, **fields)
            await self.store.save_key(key)
            self.directory.add_key(key, stored=True)
            return key, secret

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a stored key: in the database, then here at once. None for an unknown id;
        `Conflict` for a key the configuration file defines (revoke it there)."""
        async with self._lock:
            if self.directory.key(key_id) is None:
                await self._reload(force=True)
            if self.directory.key(key_id) is None:
                return None
            if not self.directory.is_stored_key(key_id):
                raise Conflict(
                    f"Key {key_id!r} is defined in the configuration file; revoke it there.",
                    "key_in_config",
                )
            if not await self.store.revoke(key_id):
                return None
            return self.directory.revoke(key_id)

    async def _reload(self, force: bool) -> bool:
        version = await self.store.version()
        if not force and version == self._seen_version:
            return False
        tenants, keys = await self.store.load()
        added = self.directory.replace_stored(tenants, keys)
        self._seen_version = version
        if self.on_new_tenant is not None:
            for tenant in added:
                await self.on_new_tenant(tenant)
        return True

    async def _poll(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as exc:  # the database may be away for a while: keep serving
                if not failing:
                    log.warning("could not refresh tenants and keys: %s", exc)
                failing = True
            else:
                if failing:
                    log.info("refreshing tenants and keys again")
                failing = False


def _converted(
    rows: Iterable[Mapping[str, Any]], convert: Callable[[Mapping[str, Any]], Any]
) -> list[Any]:
    found = []
    for row in rows:
        try:
            found.append(convert(row))
        except (ValueError, TypeError, ArithmeticError) as exc:
            log.warning("skipping unreadable stored row %r: %s", row.get("id"), exc)
    return found


def _tenant_row(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "name": tenant.name,
        "timezone": tenant.timezone,
        "currency": tenant.currency,
        "plan": tenant.plan,
        "limits": tenant.limits.model_dump(),
        "model_limits": {m: limits.model_dump() for m, limits in tenant.model_limits.items()},
        "prepaid": tenant.prepaid,
        "initial_balance": (
            str(tenant.initial_balance) if tenant.initial_balance is not None else None
        ),
        "tax_rate": str(tenant.tax_rate),
        "created_at": naive_utc(datetime.now(UTC)),
    }


def _tenant_of(m: Mapping[str, Any]) -> Tenant:
    return Tenant(
        id=m["id"],
        name=m["name"],
        timezone=m["timezone"],
        currency=m["currency"],
        plan=m["plan"],
        limits=Limits(**m["limits"]),
        model_limits={model: Limits(**value) for model, value in m["model_limits"].items()},
        prepaid=bool(m["prepaid"]),
        initial_balance=(
            Decimal(m["initial_balance"]) if m["initial_balance"] is not None else None
        ),
        tax_rate=Decimal(m["tax_rate"]),
    )


def _key_row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "tenant_id": key.tenant_id,
        "hash": key.hash,
        "prefix": key.prefix,
        "name": key.name,
        "models": sorted(key.models) if key.models is not None else None,
        "expires_at": naive_utc(key.expires_at) if key.expires_at is not None else None,
        "revoked": key.revoked,
        "limits": key.limits.model_dump() if key.limits is not None else None,
        "created_at": naive_utc(key.created_at or datetime.now(UTC)),
    }


def _key_of(m: Mapping[str, Any]) -> ApiKey:
    return ApiKey(
        id=m["id"],
        tenant_id=m["tenant_id"],
        hash=m["hash"],
        prefix=m["prefix"],
        name=m["name"],
        models=frozenset(m["models"]) if m["models"] is not None else None,
        expires_at=aware_utc(m["expires_at"]),
        revoked=bool(m["revoked"]),
        limits=Limits(**m["limits"]) if m["limits"] is not None else None,
        created_at=aware_utc(m["created_at"]),
    )
