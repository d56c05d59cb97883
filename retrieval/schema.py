"""The library's tables: SQLAlchemy 2 models, created and upgraded only by
the Alembic revisions in ``migrations/`` (see :mod:`retrieval.store`).

Items (images, texts) are independent of models; per-model vector state
(:class:`ImageVector`, :class:`TextVector`), queries and their ranked results
are rows too. Paths are kept as bytes where the file system's names are not
UTF-8 (:class:`FsPath`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterator, Sequence

import numpy as np
from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Table, Text, UniqueConstraint, type_coerce,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .dialect import as_fetched_bytes, as_stored_text, paths_as_bytes

#: SQLite limits bound parameters; id lists are chunked to this size.
CHUNK = 900


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class FsPath(TypeDecorator[str]):
    """A file path stored losslessly: names that are not valid UTF-8 (carried in
    Python as surrogateescape'd ``str``) come back as the same ``str``. SQLite
    keeps them as raw bytes in a TEXT value (valid UTF-8 is plain text);
    PostgreSQL keeps every path as ``bytea``. Either way paths compare and
    order byte by byte (see :mod:`retrieval.dialect`)."""

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if paths_as_bytes(dialect):
            return dialect.type_descriptor(LargeBinary())
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, str):
            if paths_as_bytes(dialect):
                return value.encode("utf-8", "surrogateescape")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return value.encode("utf-8", "surrogateescape")
        return value

    def bind_expression(self, bindvalue: Any) -> Any:
        return as_stored_text(bindvalue)  # SQLite: raw bytes stay TEXT, so comparisons and substr work

    def column_expression(self, column: Any) -> Any:
        return type_coerce(as_fetched_bytes(column), self)  # SQLite: fetched as bytes, sqlite3 would refuse to decode them

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value).decode("utf-8", "surrogateescape")
        return value


class Base(DeclarativeBase):
    pass


class Model(Base):
    """A dual-encoder model that has vectors in this library."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[str] = mapped_column(String, unique=True)
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Image(Base):
    """An image file. ``status`` is ``ok``, ``pending`` (not decoded yet) or ``failed``."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)  # BIGINT on PostgreSQL (revision 0006); SQLite's INTEGER is 64-bit
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str] = mapped_column(String, index=True)
    status: Mapped[str] = mapped_column(String, default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    taken_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    indexed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ImageVector(Base):
    """Image ``image_id`` has a vector in model ``model_id``'s index, computed from ``content_hash``."""

    __tablename__ = "image_vectors"
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String)
    has_tokens: Mapped[bool] = mapped_column(Boolean, default=False)
    vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32; rebuilds a lost index
    token_crc: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # CRC-32 of the patch-token row


class TextItem(Base):
    """A text of a corpus; ``ext_id`` is the id given in the file, else its line number."""

    __tablename__ = "texts"
    __table_args__ = (UniqueConstraint("corpus", "ext_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    corpus: Mapped[str] = mapped_column(String, index=True)
    ext_id: Mapped[str] = mapped_column(String)
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    content_hash: Mapped[str] = mapped_column(String)
    added_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class TextVector(Base):
    """Text ``text_id`` has a vector in model ``model_id``'s text index."""

    __tablename__ = "text_vectors"
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    text_id: Mapped[int] = mapped_column(ForeignKey("texts.id", ondelete="CASCADE"), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String)
    vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32; rebuilds a lost index


class Query(Base):
    """One search as it was asked."""

    __tablename__ = "queries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    model: Mapped[str] = mapped_column(String)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_path: Mapped[str | None] = mapped_column(FsPath, nullable=True)
    target: Mapped[str] = mapped_column(String)
    terms: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    filters: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    k: Mapped[int] = mapped_column(Integer)
    candidates: Mapped[int] = mapped_column(Integer)
    reranked: Mapped[bool] = mapped_column(Boolean, default=False)
    seconds: Mapped[float] = mapped_column(Float)
    text_vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32 embedding of ``text``
    text_tokens: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32 reranker tokens of ``text`` (Reranker.query_tokens)


class Result(Base):
    """A ranked hit of a stored query (path/text kept so it prints even after removal)."""

    __tablename__ = "results"
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String)
    item_id: Mapped[int] = mapped_column(Integer)
    path: Mapped[str | None] = mapped_column(FsPath, nullable=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    score: Mapped[float] = mapped_column(Float)
    rerank_score: Mapped[float | None] = mapped_column(Float, nullable=True)


class Setting(Base):
    """Library-wide key/value settings (``default_model``)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)



def table_of(model: type[Base]) -> Table:
    """A mapped class's Table, for Core statements that skip the ORM's per-object work (executemany)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _blobs(vectors: np.ndarray | None, n: int) -> list[bytes | None]:
    if vectors is None:
        return [None] * n
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) != n:
        raise ValueError(f"{len(vectors)} vectors for {n} rows")
    return [v.tobytes() for v in vectors]


def _vector_table(kind: str) -> tuple[Any, Any]:
    if kind == "images":
        return ImageVector, ImageVector.image_id
    if kind == "texts":
        return TextVector, TextVector.text_id
    raise ValueError(f"unknown vector kind {kind!r}")


def chunks(seq: Sequence[int], n: int = CHUNK) -> Iterator[Sequence[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
