"""Ledger entries, 15-minute usage rollups, finalised invoices and invoiced lines.

Revision ID: 0001_ledger_initial
Revises:
Create Date: 2026-01-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_ledger_initial"
down_revision = None
branch_labels = None
depends_on = None


def _bigint(name: str, primary_key: bool = False) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=False, primary_key=primary_key)


def _text(name: str, length: int, primary_key: bool = False, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length), nullable=nullable, primary_key=primary_key)


def upgrade() -> None:
    op.create_table(
        "ledger_entries",
        _text("request_id", 128, primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=False), nullable=False),
        _text("tenant_id", 128),
        _text("key_id", 128),
        _text("model", 200),
        _text("endpoint", 64),
        _text("provider", 128),
        _text("deployment", 200),
        _bigint("uncached_input"),
        _bigint("cached_input"),
        _bigint("output"),
        _bigint("reasoning"),
        _text("currency", 3),
        _text("price_version", 128),
        _bigint("unit_price_input_nanos"),
        _bigint("unit_price_cached_nanos"),
        _bigint("unit_price_output_nanos"),
        _bigint("list_price_input_nanos"),
        _bigint("list_price_cached_nanos"),
        _bigint("list_price_output_nanos"),
        _bigint("cost_nanos"),
        _bigint("list_cost_nanos"),
        _bigint("compute_cost_nanos"),
        sa.Column("status_code", sa.Integer(), nullable=False),
        _text("error_type", 128, nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        _text("stream_cut_by", 16, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
    )
    op.create_index(
        "ix_ledger_entries_tenant_started", "ledger_entries", ["tenant_id", "started_at"]
    )

    op.create_table(
        "usage_rollups",
        _text("tenant_id", 128, primary_key=True),
        _bigint("bucket", primary_key=True),
        _text("model", 200, primary_key=True),
        _text("price_version", 128, primary_key=True),
        _text("currency", 3, primary_key=True),
        _bigint("list_price_input_nanos", primary_key=True),
        _bigint("list_price_cached_nanos", primary_key=True),
        _bigint("list_price_output_nanos", primary_key=True),
        _bigint("requests"),
        _bigint("error_requests"),
        _bigint("uncached_input"),
        _bigint("cached_input"),
        _bigint("output"),
        _bigint("reasoning"),
        _bigint("cost_nanos"),
        _bigint("list_cost_nanos"),
    )
    op.create_index("ix_usage_rollups_bucket", "usage_rollups", ["bucket"])

    op.create_table(
        "invoices",
        _text("tenant_id", 128, primary_key=True),
        _text("month", 7, primary_key=True),
        _text("number", 200),
        sa.Column("finalized_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.UniqueConstraint("number"),
    )
    op.create_table(
        "invoiced_lines",
        _text("tenant_id", 128, primary_key=True),
        _text("invoice_month", 7, primary_key=True),
        _text("usage_month", 7, primary_key=True),
        _text("line_key", 600, primary_key=True),
        _bigint("quantity"),
        _bigint("amount_nanos"),
    )
    op.create_table(
        "ledger_state",
        _text("key", 64, primary_key=True),
        _text("value", 200),
    )


def downgrade() -> None:
    op.drop_table("ledger_state")
    op.drop_table("invoiced_lines")
    op.drop_table("invoices")
    op.drop_index("ix_usage_rollups_bucket", table_name="usage_rollups")
    op.drop_table("usage_rollups")
    op.drop_index("ix_ledger_entries_tenant_started", table_name="ledger_entries")
    op.drop_table("ledger_entries")
