"""Text corpora, search history, settings, and image dates for filters.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("taken_at", sa.DateTime))
        batch.create_index("ix_images_taken_at", ["taken_at"])
    op.create_table(
        "texts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("corpus", sa.String, nullable=False),
        sa.Column("ext_id", sa.String, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("meta", sa.JSON),
        sa.Column("content_hash", sa.String, nullable=False),
        sa.Column("added_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("corpus", "ext_id"),
    )
    op.create_index("ix_texts_corpus", "texts", ["corpus"])
    op.create_table(
        "text_vectors",
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("text_id", sa.Integer, sa.ForeignKey("texts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("content_hash", sa.String, nullable=False),
    )
    op.create_table(
        "queries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("model", sa.String, nullable=False),
        sa.Column("text", sa.Text),
        sa.Column("image_path", sa.String),
        sa.Column("target", sa.String, nullable=False),
        sa.Column("terms", sa.JSON),
        sa.Column("filters", sa.JSON),
        sa.Column("k", sa.Integer, nullable=False),
        sa.Column("candidates", sa.Integer, nullable=False),
        sa.Column("reranked", sa.Boolean, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
    )
    op.create_index("ix_queries_created_at", "queries", ["created_at"])
    op.create_table(
        "results",
        sa.Column("query_id", sa.Integer, sa.ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("item_id", sa.Integer, nullable=False),
        sa.Column("path", sa.String),
        sa.Column("text", sa.Text),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("rerank_score", sa.Float),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("results")
    op.drop_index("ix_queries_created_at", "queries")
    op.drop_table("queries")
    op.drop_table("text_vectors")
    op.drop_index("ix_texts_corpus", "texts")
    op.drop_table("texts")
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_taken_at")
        batch.drop_column("taken_at")
