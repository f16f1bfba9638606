"""Tenants and API keys created through the admin API, and a change counter for them.

`tenants` and `api_keys` hold what the admin API creates (configuration-file tenants and
keys stay in the file). A key is stored as its `sha256:` hash and display prefix, never the
secret. `keystore_version` holds one row whose `version` grows with every change, so each
gateway process can tell cheaply whether it must reload.

Revision ID: 0003_tenants_and_keys
Revises: 0002_rollup_compute_cost
Create Date: 2026-11-25 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_tenants_and_keys"
down_revision = "0002_rollup_compute_cost"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("plan", sa.String(128), nullable=True),
        sa.Column("limits", sa.JSON(), nullable=False),
        sa.Column("model_limits", sa.JSON(), nullable=False),
        sa.Column("prepaid", sa.Boolean(), nullable=False),
        sa.Column("initial_balance", sa.String(64), nullable=True),
        sa.Column("tax_rate", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(80), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("models", sa.JSON(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=False), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
        sa.UniqueConstraint("hash", name="uq_api_keys_hash"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    version = op.create_table(
        "keystore_version",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(version, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("keystore_version")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
