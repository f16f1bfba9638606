"""Rollups by deployment, with compute cost: `usage_rollups` gains `deployment` (in its key)
and `compute_cost_nanos`.

Revision ID: 0002_rollup_compute_cost
Revises: 0001_ledger_initial
Create Date: 2026-11-25 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_rollup_compute_cost"
down_revision = "0001_ledger_initial"
branch_labels = None
depends_on = None

_KEY = (
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
_SUMS = (
    "requests",
    "error_requests",
    "uncached_input",
    "cached_input",
    "output",
    "reasoning",
    "cost_nanos",
    "list_cost_nanos",
)
_TEXT = {"tenant_id": 128, "model": 200, "deployment": 200, "price_version": 128, "currency": 3}


def _rollups_table(name: str, with_deployment: bool) -> None:
    columns = []
    for column in _KEY:
        if column == "deployment" and not with_deployment:
            continue
        if column in _TEXT:
            columns.append(
                sa.Column(column, sa.String(_TEXT[column]), nullable=False, primary_key=True)
            )
        else:
            columns.append(
                sa.Column(column, sa.BigInteger(), nullable=False, primary_key=True)  # type: ignore[arg-type]
            )
    sums = (*_SUMS, "compute_cost_nanos") if with_deployment else _SUMS
    columns += [
        sa.Column(column, sa.BigInteger(), nullable=False)  # type: ignore[arg-type]
        for column in sums
    ]
    op.create_table(name, *columns)


def _swap(with_deployment: bool) -> None:
    """Rebuild `usage_rollups` with or without the new columns, keeping its sums."""
    _rollups_table("usage_rollups_next", with_deployment)
    old_key = [c for c in _KEY if c != "deployment"]
    if with_deployment:
        target = [*old_key, "deployment", *_SUMS, "compute_cost_nanos"]
        source = [*old_key, "''", *_SUMS, "0"]
        group = ""
    else:
        target = [*old_key, *_SUMS]
        source = [*old_key, *(f"sum({c})" for c in _SUMS)]
        group = " GROUP BY " + ", ".join(old_key)
    op.execute(
        f"INSERT INTO usage_rollups_next ({', '.join(target)}) "
        f"SELECT {', '.join(source)} FROM usage_rollups{group}"
    )
    op.drop_index("ix_usage_rollups_bucket", table_name="usage_rollups")
    op.drop_table("usage_rollups")
    op.rename_table("usage_rollups_next", "usage_rollups")
    op.create_index("ix_usage_rollups_bucket", "usage_rollups", ["bucket"])


def upgrade() -> None:
    _swap(with_deployment=True)


def downgrade() -> None:
    _swap(with_deployment=False)
