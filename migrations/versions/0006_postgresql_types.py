"""PostgreSQL: paths as bytes, and 64-bit sizes, times and checksums.

SQLite needs nothing here: its TEXT holds a path's raw bytes and its INTEGER
is 64-bit. On PostgreSQL text must be valid UTF-8 and INTEGER is 32-bit, so
the path columns become ``bytea`` (every name, UTF-8 or not, kept byte for
byte and ordered bytewise; see ``retrieval.store.FsPath``), and a file's size,
its mtime in nanoseconds and a token row's CRC-32 (unsigned) become BIGINT.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PATHS = [("images", "path"), ("queries", "image_path"), ("results", "path")]
WIDE = [("images", "size"), ("images", "mtime_ns"), ("image_vectors", "token_crc")]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in PATHS:
        op.alter_column(table, column, type_=sa.LargeBinary, postgresql_using=f"convert_to({column}, 'UTF8')")
    for table, column in WIDE:
        op.alter_column(table, column, type_=sa.BigInteger)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in WIDE:
        op.alter_column(table, column, type_=sa.Integer)
    for table, column in PATHS:
        # Names that are not UTF-8 cannot go back to text: refused by the server, nothing is lost.
        op.alter_column(table, column, type_=sa.String, postgresql_using=f"convert_from({column}, 'UTF8')")
