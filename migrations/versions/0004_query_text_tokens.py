"""Keep each re-ranked text query's tokens too, so repeating it needs no encoder.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("text_tokens", sa.LargeBinary))


def downgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.drop_column("text_tokens")
