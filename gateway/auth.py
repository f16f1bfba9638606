"""Tenants and API keys: random `sk-` keys, stored only as SHA-256 hashes.

Keys carry 256 bits of randomness, so a plain SHA-256 is the right hash: it cannot be
brute-forced and costs a microsecond on every request. The presented key's hash is
looked up, then compared again in constant time. A key belongs to exactly one tenant;
everything downstream takes the tenant from the key, never from the request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

from billing.quota import Limits
from gateway.errors import ApiError, invalid_api_key, missing_api_key

KEY_PREFIX = "sk-"
DISPLAY_PREFIX_LENGTH = 10


def generate_key() -> str:
    """A new API key: `sk-` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def secret_digest(secret: str) -> str:
    """The sha256 of a secret, in hex: how secrets (keys, session cookies) are stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def hash_key(key: str) -> str:
    """The stored form of a key: `sha256:<hex>`."""
    return "sha256:" + secret_digest(key)


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LENGTH]


def mint_key(tenant_id: str, **fields: object) -> tuple[ApiKey, str]:
    """A new key record for a tenant and its secret (shown once, never stored)."""
    secret = generate_key()
    key_id = str(fields.pop("id", None) or "key_" + secrets.token_hex(8))
    key = ApiKey(
        id=key_id,
        tenant_id=tenant_id,
        hash=hash_key(secret),
        prefix=display_prefix(secret),
        **fields,  # type: ignore[arg-type]
    )
    return key, secret


@dataclass(slots=True)
class Tenant:
    """A customer: who is billed, in which time zone and currency, under which limits."""

    id: str
    name: str
    timezone: str = "UTC"
    currency: str = "USD"
    plan: str | None = None
    limits: Limits = field(default_factory=Limits)
    model_limits: dict[str, Limits] = field(default_factory=dict)
    prepaid: bool = False
    initial_balance: Decimal | None = None
    tax_rate: Decimal = Decimal(0)


@dataclass(slots=True)
class ApiKey:
    """A tenant's key as stored: its hash, never the key itself."""

    id: str
    tenant_id: str
    hash: str
    prefix: str = ""
    name: str = ""
    models: frozenset[str] | None = None  # None: every model the gateway serves
    expires_at: datetime | None = None
    revoked: bool = False
    limits: Limits | None = None
    created_at: datetime | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, object]:
        """What the admin API shows of a key (no hash)."""
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "prefix": self.prefix,
            "name": self.name,
            "models": sorted(self.models) if self.models is not None else None,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked": self.revoked,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


class Directory:
    """The tenants and keys the gateway knows, looked up by key hash.

    Entries added with `stored=True` (or by `replace_stored`) come from the database
    (`gateway.keystore`); all others come from the configuration and are never replaced.
    """

    def __init__(self, tenants: Iterable[Tenant] = (), keys: Iterable[ApiKey] = ()) -> None:
        self.tenants: dict[str, Tenant] = {}
        self._keys_by_hash: dict[str, ApiKey] = {}
        self._keys_by_id: dict[str, ApiKey] = {}
        self._stored_tenants: set[str] = set()
        self._stored_keys: set[str] = set()
        for tenant in tenants:
            self.tenants[tenant.id] = tenant
        for key in keys:
            self.add_key(key)

    def add_tenant(self, tenant: Tenant, *, stored: bool = False) -> None:
        self.tenants = {**self.tenants, tenant.id: tenant}  # never changes a dict in use
        if stored:
            self._stored_tenants.add(tenant.id)

    def add_key(self, key: ApiKey, *, stored: bool = False) -> None:
        if key.tenant_id not in self.tenants:
            raise ValueError(f"key {key.id!r} names unknown tenant {key.tenant_id!r}")
        if key.id in self._keys_by_id:
            raise ValueError(f"duplicate key id {key.id!r}")
        self._keys_by_hash[key.hash] = key
        self._keys_by_id[key.id] = key
        if stored:
            self._stored_keys.add(key.id)

    def create_key(self, tenant_id: str, **fields: object) -> tuple[ApiKey, str]:
        """Mint a key for a tenant; returns the stored record and the secret (shown once)."""
        key, secret = mint_key(tenant_id, **fields)
        self.add_key(key)
        return key, secret

    def is_stored_key(self, key_id: str) -> bool:
        return key_id in self._stored_keys

    def replace_stored(self, tenants: Iterable[Tenant], keys: Iterable[ApiKey]) -> list[Tenant]:
        """Swap the database's tenants and keys in for the ones stored before; returns the
        tenants that are new here. Configured entries win: stored rows with a configured
        tenant id, key id or key hash are ignored, as are keys of unknown tenants. New
        dicts are swapped in whole, so a loop over the old ones is never disturbed."""
        configured = {i: t for i, t in self.tenants.items() if i not in self._stored_tenants}
        stored_tenants = {t.id: t for t in tenants if t.id not in configured}
        added = [t for t in stored_tenants.values() if t.id not in self.tenants]
        by_id = {i: k for i, k in self._keys_by_id.items() if i not in self._stored_keys}
        by_hash = {k.hash: k for k in by_id.values()}
        stored_keys: set[str] = set()
        for key in keys:
            if key.id in by_id or key.hash in by_hash:
                continue
            if key.tenant_id in configured or key.tenant_id in stored_tenants:
                by_id[key.id] = by_hash[key.hash] = key
                stored_keys.add(key.id)
        self.tenants = {**configured, **stored_tenants}
        self._keys_by_id, self._keys_by_hash = by_id, by_hash
        self._stored_tenants, self._stored_keys = set(stored_tenants), stored_keys
        return added

    def revoke(self, key_id: str) -> ApiKey:
        key = self._keys_by_id[key_id]
        revoked = replace(key, revoked=True)
        self._keys_by_id[key_id] = revoked
        self._keys_by_hash[key.hash] = revoked
        return revoked

    def key(self, key_id: str) -> ApiKey | None:
        return self._keys_by_id.get(key_id)

    def keys_of(self, tenant_id: str) -> list[ApiKey]:
        return [k for k in self._keys_by_id.values() if k.tenant_id == tenant_id]

    def authenticate(self, authorization: str | None, now: datetime) -> tuple[ApiKey, Tenant]:
        """The key and tenant behind an `Authorization: Bearer sk-...` header, or a 401."""
        if not authorization:
            raise missing_api_key()
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise missing_api_key()
        presented = hash_key(secret)
        key = self._keys_by_hash.get(presented)
        if key is None or not hmac.compare_digest(key.hash, presented):
            raise invalid_api_key()
        if key.revoked:
            raise ApiError(401, "This API key has been revoked.", code="invalid_api_key")
        if key.expires_at is not None and now >= key.expires_at:
            raise ApiError(401, "This API key has expired.", code="invalid_api_key")
        return key, self.tenants[key.tenant_id]
