"""Images, models and per-model image vector state.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("spec", sa.String, nullable=False, unique=True),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", sa.String, nullable=False, unique=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("mtime_ns", sa.Integer, nullable=False),
        sa.Column("content_hash", sa.String, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("indexed_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_images_content_hash", "images", ["content_hash"])
    op.create_table(
        "image_vectors",
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("content_hash", sa.String, nullable=False),
        sa.Column("has_tokens", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("image_vectors")
    op.drop_index("ix_images_content_hash", "images")
    op.drop_table("images")
    op.drop_table("models")
