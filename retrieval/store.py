"""The metadata store: SQLAlchemy 2 models over SQLite, schema by Alembic.

Items (images, texts) are independent of models; per-model vector state,
queries and their ranked results are rows too. The schema is created and
upgraded only by the Alembic revisions in ``migrations/``; :func:`open_store`
upgrades an older library on open. SQLite runs in WAL mode with a busy
timeout so one writer and many readers can share a library.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import LibraryError

LOG = logging.getLogger(__name__)

#: SQLite waits this long for a lock held by another writer.
BUSY_TIMEOUT_MS = 30_000
#: SQLite limits bound parameters; id lists are chunked to this size.
CHUNK = 900


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


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
    path: Mapped[str] = mapped_column(String, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
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


class Query(Base):
    """One search as it was asked."""

    __tablename__ = "queries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    model: Mapped[str] = mapped_column(String)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_path: Mapped[str | None] = mapped_column(String, nullable=True)
    target: Mapped[str] = mapped_column(String)
    terms: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    filters: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    k: Mapped[int] = mapped_column(Integer)
    candidates: Mapped[int] = mapped_column(Integer)
    reranked: Mapped[bool] = mapped_column(Boolean, default=False)
    seconds: Mapped[float] = mapped_column(Float)
    text_vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32 embedding of ``text``
    text_tokens: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32 reranker tokens of ``text`` (Reranker.query_tokens)

    def to_json(self) -> dict[str, Any]:
        """One entry of ``history --json`` (and of ``/api/history``)."""
        return {
            "id": self.id, "when": self.created_at.isoformat(timespec="seconds"), "text": self.text,
            "image": self.image_path, "target": self.target, "model": self.model, "k": self.k, "terms": self.terms,
            "filters": self.filters, "reranked": self.reranked, "seconds": round(self.seconds, 4),
        }


class Result(Base):
    """A ranked hit of a stored query (path/text kept so it prints even after removal)."""

    __tablename__ = "results"
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String)
    item_id: Mapped[int] = mapped_column(Integer)
    path: Mapped[str | None] = mapped_column(String, nullable=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    score: Mapped[float] = mapped_column(Float)
    rerank_score: Mapped[float | None] = mapped_column(Float, nullable=True)


class Setting(Base):
    """Library-wide key/value settings (``default_model``)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(db_path: str | Path) -> SAEngine:
    """A SQLAlchemy engine for the library database with crossfind's pragmas."""
    engine = create_engine(f"sqlite:///{db_path}", connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(engine: SAEngine | None = None) -> Any:
    """The Alembic config for ``migrations/``, bound to ``engine`` when given."""
    from importlib.resources import files

    from alembic.config import Config

    cfg = Config()
    # The repository's migrations/ folder installs as retrieval.migrations.
    cfg.set_main_option("script_location", str(files("retrieval.migrations")))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", str(engine.url))
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: SAEngine, revision: str = "head") -> None:
    """Create or upgrade the schema to ``revision`` with Alembic."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def chunks(seq: Sequence[int], n: int = CHUNK) -> Iterator[Sequence[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class Store:
    """Typed access to the library database."""

    def __init__(self, engine: SAEngine) -> None:
        self.engine = engine
        self.session = Session(engine, expire_on_commit=False)

    def close(self) -> None:
        self.session.close()
        self.engine.dispose()

    def commit(self) -> None:
        self.session.commit()

    # --------------------------------------------------------------- models
    def model(self, spec: str, dim: int | None = None) -> Model:
        """The row for ``spec``, created (with ``dim``) if missing."""
        row = self.session.scalar(select(Model).where(Model.spec == spec))
        if row is None:
            if dim is None:
                raise LibraryError(f"model {spec!r} has no vectors in this library")
            row = Model(spec=spec, dim=dim)
            self.session.add(row)
            self.session.flush()
        elif dim is not None and row.dim != dim:
            raise LibraryError(f"model {spec!r} was indexed with dimension {row.dim}, now it gives {dim}")
        return row

    def forget_model(self, spec: str) -> bool:
        """Drop what a model computed: its row with every vector row (cascade),
        its cached query vectors and its index generations; items stay. Whether
        it had a row."""
        row = self.find_model(spec)
        if row is not None:
            self.session.delete(row)
        self.session.execute(update(Query).where(Query.model == spec).values(text_vector=None, text_tokens=None))
        self.session.execute(delete(Setting).where(Setting.key.in_([f"generation:{spec}:{kind}" for kind in ("images", "texts")])))
        self.session.flush()
        return row is not None

    def find_model(self, spec: str) -> Model | None:
        return self.session.scalar(select(Model).where(Model.spec == spec))

    def models(self) -> list[Model]:
        return list(self.session.scalars(select(Model).order_by(Model.id)))

    def get_setting(self, key: str) -> str | None:
        row = self.session.get(Setting, key)
        return row.value if row else None

    def set_setting(self, key: str, value: str) -> None:
        row = self.session.get(Setting, key)
        if row is None:
            self.session.add(Setting(key=key, value=value))
        else:
            row.value = value

    # --------------------------------------------------------------- images
    def images_under(self, roots: Iterable[str]) -> list[Image]:
        """Image rows whose path lies under any of ``roots`` (absolute paths)."""
        out: dict[int, Image] = {}
        for root in roots:
            prefix = root.rstrip("/") + "/"
            # substr, not LIKE: SQLite's LIKE ignores case, paths must not
            in_root = func.substr(Image.path, 1, len(prefix)) == prefix
            q = select(Image).where((Image.path == root) | in_root)
            for row in self.session.scalars(q):
                out[row.id] = row
        return list(out.values())

    def images_by_hash(self, hashes: Iterable[str]) -> dict[str, list[Image]]:
        out: dict[str, list[Image]] = {}
        hs = list(set(hashes))
        for i in range(0, len(hs), CHUNK):
            for row in self.session.scalars(select(Image).where(Image.content_hash.in_(hs[i : i + CHUNK]))):
                out.setdefault(row.content_hash, []).append(row)
        return out

    def images_by_id(self, ids: Sequence[int]) -> dict[int, Image]:
        out: dict[int, Image] = {}
        for part in chunks(list(ids)):
            for row in self.session.scalars(select(Image).where(Image.id.in_(part))):
                out[row.id] = row
        return out

    def image_by_path(self, path: str) -> Image | None:
        return self.session.scalar(select(Image).where(Image.path == path))

    def delete_images(self, ids: Sequence[int]) -> None:
        for part in chunks(list(ids)):
            self.session.execute(delete(Image).where(Image.id.in_(part)))

    def image_vector_map(self, model_id: int) -> dict[int, str]:
        """image id -> content hash its vector was computed from, for one model."""
        q = select(ImageVector.image_id, ImageVector.content_hash).where(ImageVector.model_id == model_id)
        return {i: h for i, h in self.session.execute(q)}

    def token_ids(self, model_id: int, ids: Sequence[int]) -> set[int]:
        out: set[int] = set()
        for part in chunks(list(ids)):
            q = select(ImageVector.image_id).where(
                ImageVector.model_id == model_id, ImageVector.has_tokens.is_(True), ImageVector.image_id.in_(part)
            )
            out.update(self.session.scalars(q))
        return out

    def clear_tokens(self, model_id: int) -> None:
        """Mark every stored patch-token row of a model invalid (the token store started over)."""
        self.session.execute(
            update(ImageVector).where(ImageVector.model_id == model_id).values(has_tokens=False)
        )

    def set_image_vectors(self, model_id: int, rows: Sequence[tuple[int, str, bool]]) -> None:
        """Record (image id, content hash, has tokens) vector rows for a model."""
        ids = [r[0] for r in rows]
        self.delete_image_vectors(model_id, ids)
        self.session.add_all(ImageVector(model_id=model_id, image_id=i, content_hash=h, has_tokens=t) for i, h, t in rows)

    def delete_image_vectors(self, model_id: int, ids: Sequence[int]) -> None:
        for part in chunks(list(ids)):
            self.session.execute(
                delete(ImageVector).where(ImageVector.model_id == model_id, ImageVector.image_id.in_(part))
            )

    def image_ids(self, status: str | None = "ok") -> list[int]:
        q = select(Image.id)
        if status is not None:
            q = q.where(Image.status == status)
        return list(self.session.scalars(q))

    # ---------------------------------------------------------------- texts
    def texts_by_id(self, ids: Sequence[int]) -> dict[int, TextItem]:
        out: dict[int, TextItem] = {}
        for part in chunks(list(ids)):
            for row in self.session.scalars(select(TextItem).where(TextItem.id.in_(part))):
                out[row.id] = row
        return out

    def corpus_rows(self, corpus: str) -> list[TextItem]:
        return list(self.session.scalars(select(TextItem).where(TextItem.corpus == corpus)))

    def text_ids(self, corpus: str | None = None) -> list[int]:
        q = select(TextItem.id)
        if corpus is not None:
            q = q.where(TextItem.corpus == corpus)
        return list(self.session.scalars(q))

    def delete_texts(self, ids: Sequence[int]) -> None:
        for part in chunks(list(ids)):
            self.session.execute(delete(TextItem).where(TextItem.id.in_(part)))

    def text_vector_map(self, model_id: int) -> dict[int, str]:
        q = select(TextVector.text_id, TextVector.content_hash).where(TextVector.model_id == model_id)
        return {i: h for i, h in self.session.execute(q)}

    def set_text_vectors(self, model_id: int, rows: Sequence[tuple[int, str]]) -> None:
        ids = [r[0] for r in rows]
        self.delete_text_vectors(model_id, ids)
        self.session.add_all(TextVector(model_id=model_id, text_id=i, content_hash=h) for i, h in rows)

    def delete_text_vectors(self, model_id: int, ids: Sequence[int]) -> None:
        for part in chunks(list(ids)):
            self.session.execute(delete(TextVector).where(TextVector.model_id == model_id, TextVector.text_id.in_(part)))

    def corpora(self) -> list[str]:
        return list(self.session.scalars(select(TextItem.corpus).distinct().order_by(TextItem.corpus)))

    # -------------------------------------------------------------- history
    def add_query(self, query: Query, results: Sequence[Result]) -> int:
        self.session.add(query)
        self.session.flush()
        for r in results:
            r.query_id = query.id
        self.session.add_all(results)
        self.session.commit()
        return query.id

    def text_vector(self, model: str, text: str) -> bytes | None:
        """The stored embedding of a text asked before with this model, if any."""
        return self._last_kept(Query.text_vector, model, text)

    def text_tokens(self, model: str, text: str) -> bytes | None:
        """The stored reranker tokens of a text asked before with this model, if any."""
        return self._last_kept(Query.text_tokens, model, text)

    def _last_kept(self, column: Any, model: str, text: str) -> bytes | None:
        q = (
            select(column)
            .where(Query.model == model, Query.text == text, column.is_not(None))
            .order_by(Query.id.desc())
            .limit(1)
        )
        return self.session.scalar(q)

    def queries(self, limit: int = 20) -> list[Query]:
        return list(self.session.scalars(select(Query).order_by(Query.id.desc()).limit(limit)))

    def query(self, query_id: int) -> tuple[Query, list[Result]] | None:
        q = self.session.get(Query, query_id)
        if q is None:
            return None
        rows = list(self.session.scalars(select(Result).where(Result.query_id == query_id).order_by(Result.rank)))
        return q, rows

    def touch_image(self, row_id: int, **values: Any) -> None:
        self.session.execute(update(Image).where(Image.id == row_id).values(**values))


def open_store(db_path: str | Path) -> Store:
    """Open (creating or upgrading) the library database at ``db_path``."""
    db_path = Path(db_path)
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LibraryError(f"cannot create library folder {db_path.parent}: {exc.strerror}") from exc
    engine = make_engine(db_path)
    try:
        upgrade(engine)
    except Exception as exc:
        engine.dispose()
        raise LibraryError(f"cannot open library database {db_path}: {exc}") from exc
    return Store(engine)
