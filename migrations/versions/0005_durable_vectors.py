"""Durable vectors and a library identity.

Each per-model vector row keeps its float32 vector, so a lost or damaged FAISS
file is rebuilt from the store instead of re-encoding; a row's patch tokens
carry a CRC-32 so a damaged token file is noticed row by row; and the library
gets an id, written beside its index and token files, so files of another
library (or of a deleted ``library.db``) are never used.

Rows of an older library have no vector yet: the model's slot fills them from
its index the first time it opens it (``retrieval.slot``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("image_vectors") as batch:
        batch.add_column(sa.Column("vector", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("token_crc", sa.Integer, nullable=True))
    with op.batch_alter_table("text_vectors") as batch:
        batch.add_column(sa.Column("vector", sa.LargeBinary, nullable=True))
    settings = sa.table("settings", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(settings.insert().values(key="library_id", value=uuid.uuid4().hex))


def downgrade() -> None:
    op.execute("DELETE FROM settings WHERE key = 'library_id'")
    with op.batch_alter_table("text_vectors") as batch:
        batch.drop_column("vector")
    with op.batch_alter_table("image_vectors") as batch:
        batch.drop_column("token_crc")
        batch.drop_column("vector")
