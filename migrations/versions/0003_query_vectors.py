"""Keep each search's main text embedding, so a repeated text query needs no encoder.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("text_vector", sa.LargeBinary))
        batch.create_index("ix_queries_model_text", ["model", "text"])


def downgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.drop_index("ix_queries_model_text")
        batch.drop_column("text_vector")
