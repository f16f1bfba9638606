"""Stored OpenAI Responses (`store: true`), kept per tenant until they expire.

`stored_responses` holds each stored response object as the caller saw it and the
conversation it closes (as Chat Completions messages), so that `previous_response_id`
can continue it. Rows are read only with the tenant that made them and after
`expires_at` never (they are pruned then).

Revision ID: 0004_apis_stored_responses
Revises: 0003_tenants_and_keys
Create Date: 2026-12-04 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_apis_stored_responses"
down_revision = "0003_tenants_and_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_responses",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("messages", sa.Text(), nullable=False),
    )
    op.create_index("ix_stored_responses_expires_at", "stored_responses", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_stored_responses_expires_at", table_name="stored_responses")
    op.drop_table("stored_responses")
