"""Every table of the gateway's database, described for queries.

The schema itself is made by the Alembic migrations in `billing/store/migrations/` (one
revision per change; these definitions describe the newest). The ledger's tables are
SQLModel classes; the others are SQLAlchemy Core tables on the same metadata:

- `ledger_entries`, `usage_rollups`, `ledger_state`: the usage ledger (`billing.ledger`);
- `invoices`, `invoiced_lines`: finalised invoices (`billing.invoice`);
- `tenants`, `api_keys`, `keystore_version`: tenants and keys made through the admin API
  (`gateway.keystore`);
- `stored_responses`: stored OpenAI Responses (`gateway.response_store`);
- `console_users`, `console_sessions`: the web console's users (`gateway.console.users`).

Times are stored as naive UTC. Rollup buckets are 15-minute UTC intervals, stored as the
bucket's start in epoch seconds: every time zone in use today is offset from UTC by a whole
number of quarter hours (+05:30, +05:45, +08:45, +12:45 included), so a calendar month in
any tenant's zone is an exact run of buckets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

#: Width of one rollup bucket, in seconds.
BUCKET_SECONDS = 900

#: The columns that key a rollup row, and the sums it carries.
ROLLUP_KEY = (
    "tenant_id",
    "bucket",
    "model",
    "deployment",
    "price_version",
    "currency",
    "list_price_input_nanos",
    "list_price_cached_nanos",
    "list_price_output_nanos",
)
ROLLUP_SUMS = (
    "requests",
    "error_requests",
    "uncached_input",
    "cached_input",
    "output",
    "reasoning",
    "cost_nanos",
    "list_cost_nanos",
    "compute_cost_nanos",
)


def _bigint() -> Any:
    """A BIGINT column defaulting to zero (token counts and nano-unit amounts)."""
    return Field(default=0, sa_type=BigInteger)


class LedgerEntry(SQLModel, table=True):
    """One request, successful or not; keyed by the request id (idempotent writes)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_entries_tenant_started", "tenant_id", "started_at"),)

    request_id: str = Field(primary_key=True, max_length=128)
    started_at: datetime = Field(sa_type=DateTime(timezone=False))  # naive UTC
    tenant_id: str = Field(max_length=128)
    key_id: str = Field(max_length=128)
    model: str = Field(max_length=200)
    endpoint: str = Field(max_length=64)
    provider: str = Field(default="", max_length=128)
    deployment: str = Field(default="", max_length=200)
    uncached_input: int = _bigint()
    cached_input: int = _bigint()
    output: int = _bigint()
    reasoning: int = _bigint()
    currency: str = Field(default="USD", max_length=3)
    price_version: str = Field(default="", max_length=128)
    unit_price_input_nanos: int = _bigint()
    unit_price_cached_nanos: int = _bigint()
    unit_price_output_nanos: int = _bigint()
    list_price_input_nanos: int = _bigint()
    list_price_cached_nanos: int = _bigint()
    list_price_output_nanos: int = _bigint()
    cost_nanos: int = _bigint()
    list_cost_nanos: int = _bigint()
    compute_cost_nanos: int = _bigint()
    status_code: int = 200
    error_type: str | None = Field(default=None, max_length=128)
    stream: bool = False
    stream_cut_by: str | None = Field(default=None, max_length=16)
    attempts: int = 1
    ttft_ms: float | None = None
    duration_ms: float = 0.0


class UsageRollup(SQLModel, table=True):
    """Sums of ledger entries per tenant, 15-minute UTC bucket, model, deployment and price.

    Updated in the same transaction as the entries it sums, and only for entries actually
    inserted, so it always equals the raw rows (until they are pruned; it outlives them).
    """

    __tablename__ = "usage_rollups"
    __table_args__ = (Index("ix_usage_rollups_bucket", "bucket"),)

    tenant_id: str = Field(primary_key=True, max_length=128)
    bucket: int = Field(primary_key=True, sa_type=BigInteger)
    model: str = Field(primary_key=True, max_length=200)
    deployment: str = Field(primary_key=True, max_length=200)
    price_version: str = Field(primary_key=True, max_length=128)
    currency: str = Field(primary_key=True, max_length=3)
    list_price_input_nanos: int = Field(primary_key=True, sa_type=BigInteger)
    list_price_cached_nanos: int = Field(primary_key=True, sa_type=BigInteger)
    list_price_output_nanos: int = Field(primary_key=True, sa_type=BigInteger)
    requests: int = _bigint()
    error_requests: int = _bigint()
    uncached_input: int = _bigint()
    cached_input: int = _bigint()
    output: int = _bigint()
    reasoning: int = _bigint()
    cost_nanos: int = _bigint()
    list_cost_nanos: int = _bigint()
    compute_cost_nanos: int = _bigint()


class StoredInvoice(SQLModel, table=True):
    """A finalised invoice, stored whole (it never changes)."""

    __tablename__ = "invoices"

    tenant_id: str = Field(primary_key=True, max_length=128)
    month: str = Field(primary_key=True, max_length=7)  # "2026-11"
    number: str = Field(max_length=200, unique=True)
    finalized_at: datetime = Field(sa_type=DateTime(timezone=False))  # naive UTC
    document: str = Field(sa_column=Column(Text, nullable=False))  # the invoice as JSON


class InvoicedLine(SQLModel, table=True):
    """What a finalised invoice charged, per usage month and line key.

    Lets a later invoice charge late usage for a finalised month as adjustment lines:
    (rollups for that month now) minus (everything already invoiced for it).
    """

    __tablename__ = "invoiced_lines"

    tenant_id: str = Field(primary_key=True, max_length=128)
    invoice_month: str = Field(primary_key=True, max_length=7)
    usage_month: str = Field(primary_key=True, max_length=7)
    line_key: str = Field(primary_key=True, max_length=600)
    quantity: int = _bigint()
    amount_nanos: int = _bigint()


class LedgerState(SQLModel, table=True):
    """Small key/value facts about the ledger, e.g. the retention watermark."""

    __tablename__ = "ledger_state"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=200)


ENTRIES: Table = LedgerEntry.__table__  # type: ignore[attr-defined]
ROLLUPS: Table = UsageRollup.__table__  # type: ignore[attr-defined]
STATE: Table = LedgerState.__table__  # type: ignore[attr-defined]
INVOICES: Table = StoredInvoice.__table__  # type: ignore[attr-defined]
INVOICED_LINES: Table = InvoicedLine.__table__  # type: ignore[attr-defined]
#: The `ledger_entries` columns in table order.
ENTRY_COLUMNS: tuple[str, ...] = tuple(column.name for column in ENTRIES.columns)

#: The metadata every table is on (what Alembic compares the migrations with).
METADATA = SQLModel.metadata

# -- tenants and keys made through the admin API (revision 0003) ------------------------

TENANTS = Table(
    "tenants",
    METADATA,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("plan", String(128), nullable=True),
    Column("limits", JSON(), nullable=False),
    Column("model_limits", JSON(), nullable=False),
    Column("prepaid", Boolean(), nullable=False),
    Column("initial_balance", String(64), nullable=True),
    Column("tax_rate", String(32), nullable=False),
    Column("created_at", DateTime(timezone=False), nullable=False),
)
API_KEYS = Table(
    "api_keys",
    METADATA,
    Column("id", String(128), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("hash", String(80), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("models", JSON(), nullable=True),
    Column("expires_at", DateTime(timezone=False), nullable=True),
    Column("revoked", Boolean(), nullable=False),
    Column("limits", JSON(), nullable=True),
    Column("created_at", DateTime(timezone=False), nullable=False),
    UniqueConstraint("hash", name="uq_api_keys_hash"),
    Index("ix_api_keys_tenant_id", "tenant_id"),
)
KEYSTORE_VERSION = Table(
    "keystore_version",
    METADATA,
    Column("id", Integer(), primary_key=True, autoincrement=False),
    Column("version", BigInteger(), nullable=False),
)

# -- stored OpenAI Responses (revision 0004) -------------------------------------------

STORED_RESPONSES = Table(
    "stored_responses",
    METADATA,
    Column("id", String(80), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=False), nullable=False),
    Column("expires_at", DateTime(timezone=False), nullable=False),
    Column("response", Text(), nullable=False),
    Column("messages", Text(), nullable=False),
    Index("ix_stored_responses_expires_at", "expires_at"),
)

# -- the web console's users and sessions (revision 0005) ------------------------------

CONSOLE_USERS = Table(
    "console_users",
    METADATA,
    Column("username", String(64), primary_key=True),
    Column("password_hash", String(200), nullable=False),
    Column("tenant_id", String(64), nullable=True),
    Column("role", String(16), nullable=False),
    Column("created_at", DateTime(timezone=False), nullable=False),
)
CONSOLE_SESSIONS = Table(
    "console_sessions",
    METADATA,
    Column("id_hash", String(64), primary_key=True),
    Column("username", String(64), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("expires_at", DateTime(timezone=False), nullable=False),
    Index("ix_console_sessions_username", "username"),
)
