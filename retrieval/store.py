"""The metadata store: SQLAlchemy 2 over SQLite (or PostgreSQL), schema by Alembic.

The tables are in :mod:`retrieval.schema` (re-exported here); the store's
vector rows and history methods in :mod:`retrieval.vector_rows` and
:mod:`retrieval.history_rows`. The schema is created and
upgraded only by the Alembic revisions in ``migrations/``; :func:`open_store`
upgrades an older library on open. SQLite runs in WAL mode with a busy
timeout so one writer and many readers can share a library.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from sqlalchemy import bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.orm import Session

from .dialect import AdvisoryLock, glob_match, is_database_url, mask_url
from .errors import LibraryError
from .history_rows import HistoryRows
from .revision import head_revision
from .schema import CHUNK, Base, FsPath, Image, ImageVector, Model, Query, Result, Setting, TextItem, TextVector, chunks, table_of, utcnow
from .vector_rows import VectorRows

__all__ = [
    "Base", "CHUNK", "DB_NAME", "FsPath", "Image", "ImageVector", "Model", "Query", "Result", "Setting", "Store",
    "TextItem", "TextVector", "alembic_config", "chunks", "head_revision", "make_engine", "open_library", "open_library_store",
    "open_store", "upgrade", "utcnow",
]

LOG = logging.getLogger(__name__)

#: SQLite waits this long for a lock held by another writer.
BUSY_TIMEOUT_MS = 30_000
#: Databases the store runs on (SQLAlchemy backend names).
SUPPORTED_BACKENDS = ("sqlite", "postgresql")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_pragmas_ro(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.close()


def make_engine(db_path: str | Path, read_only: bool = False) -> SAEngine:
    """A SQLAlchemy engine for the library database: a SQLite file (with
    crossfind's pragmas) or a database URL (``postgresql+psycopg://...``).

    ``read_only`` opens a SQLite file with ``mode=ro`` (a library on a
    read-only file system or without write permission): nothing is created
    or upgraded.
    """
    if isinstance(db_path, str) and is_database_url(db_path):
        return _url_engine(db_path)
    if not read_only:
        engine = create_engine(f"sqlite:///{db_path}", connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    from urllib.parse import quote

    # immutable: on a read-only file system SQLite cannot create the WAL index
    # (-shm) it would otherwise need, and nobody can write there anyway.
    flags = "mode=ro&immutable=1" if not os.access(Path(db_path).parent, os.W_OK) else "mode=ro"
    url = f"sqlite:///file:{quote(str(db_path))}?{flags}&uri=true"
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _sqlite_pragmas_ro)
    return engine


def _url_engine(url: str) -> SAEngine:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise LibraryError(f"not a database URL: {mask_url(url)}; give postgresql+psycopg://USER:PASSWORD@HOST/DATABASE") from None
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise LibraryError(f"crossfind keeps its store in SQLite or PostgreSQL, not {parsed.get_backend_name()!r} ({mask_url(url)})")
    if parsed.get_backend_name() == "sqlite":
        raise LibraryError("a SQLite store lives in the library folder: leave out --db (or give --db sqlite), and choose the folder with --library")
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, the driver of the [postgres] extra
    try:
        # pre-ping: a server restart between two uses of a pooled connection is survived.
        return create_engine(parsed, pool_pre_ping=True)
    except (ImportError, NoSuchModuleError) as exc:
        raise LibraryError(f"cannot use {mask_url(url)}: {exc}; install crossfind[postgres]") from None


def alembic_config(engine: SAEngine | None = None) -> Any:
    """The Alembic config for ``migrations/``, bound to ``engine`` when given."""
    from importlib.resources import files

    from alembic.config import Config

    cfg = Config()
    # The repository's migrations/ folder installs as retrieval.migrations.
    cfg.set_main_option("script_location", str(files("retrieval.migrations")))
    if engine is not None:
        # The URL is only a fallback (the engine is handed in); "%" would be read as interpolation.
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=True).replace("%", "%%"))
        cfg.attributes["engine"] = engine
    return cfg


def _current_revision(engine: SAEngine) -> str | None:
    """The revision recorded in the database (one query), or None when there is none."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except (OperationalError, ProgrammingError) as exc:  # no table yet: a new library
        if engine.dialect.name != "sqlite" and "alembic_version" not in str(exc):
            raise  # the server is unreachable or refuses us: say so
        return None
    return rows[0] if len(rows) == 1 else None


def upgrade(engine: SAEngine, revision: str = "head") -> None:
    """Create or upgrade the schema to ``revision`` with Alembic."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


class Store(VectorRows, HistoryRows):
    """Typed access to the library database."""

    def __init__(self, engine: SAEngine, read_only: bool = False, url: str | None = None, path: str | os.PathLike[str] | None = None) -> None:
        self.engine = engine
        self.read_only = read_only  # opened with mode=ro: nothing may be written
        self.session = Session(engine, expire_on_commit=False)
        #: The database URL it was opened with (None: a SQLite file); may hold a password, never print it.
        self.url = url
        self._path = None if path is None else str(path)
        #: This library folder's id when the store is a database shared by folders (see
        #: :func:`open_library_store`); "" for a SQLite library, whose database lives in its folder.
        self.folder_id = ""

    @property
    def location(self) -> str:
        """Where the store lives, safe to print: the SQLite file, or the URL with its password masked."""
        if self.url is not None:
            return mask_url(self.url)
        return self._path or self.engine.url.database or ""

    def shared_lock(self) -> AdvisoryLock | None:
        """The writer lock that writers on other machines take too (PostgreSQL's
        advisory lock, keyed by the library id); None on SQLite, whose writers
        all share the library folder and its ``flock``."""
        if self.engine.dialect.name == "postgresql":
            return AdvisoryLock(self.engine, self.library_id)
        return None

    def close(self) -> None:
        self.session.close()
        self.engine.dispose()

    def commit(self) -> None:
        self.session.commit()

    def add_images(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert new image rows (column -> value; ``path``, ``size``,
        ``mtime_ns``, ``content_hash`` at least) with one executemany INSERT ...
        RETURNING; returns their ids in order. No ORM objects are made: a
        query loads the rows when they are wanted (the ORM's objects and flush
        cost several times the insert and that load together)."""
        if not rows:
            return []
        t = table_of(Image)
        unset = {"status": "pending", "error": None, "width": None, "height": None, "taken_at": None}
        stmt = insert(t).returning(t.c.id, sort_by_parameter_order=True)
        result = self.session.execute(stmt, [{**unset, **r} for r in rows])
        return [rid for (rid,) in result]

    def set_image_facts(self, facts: Sequence[tuple[int, str, str | None, int | None, int | None, dt.datetime | None]]) -> None:
        """Write what decoding found for many rows, ``(id, status, error, width,
        height, taken_at)`` each, in one executemany UPDATE (the ORM's per-row
        flush costs about ten times as much; see :func:`retrieval.indexing.mark_decoded`)."""
        if not facts:
            return
        t = table_of(Image)
        stmt = update(t).where(t.c.id == bindparam("b_id")).values(
            status=bindparam("b_status"), error=bindparam("b_error"), width=bindparam("b_width"),
            height=bindparam("b_height"), taken_at=bindparam("b_taken"))
        self.session.execute(stmt, [{"b_id": i, "b_status": st, "b_error": err, "b_width": w, "b_height": h, "b_taken": tk}
                                    for i, st, err, w, h, tk in facts])

    def rollback(self) -> None:
        """Drop uncommitted changes and end the read transaction (the next read sees other processes' commits)."""
        self.session.rollback()

    def expire(self) -> None:
        """Forget loaded rows: they are read again on their next use."""
        self.session.expire_all()

    @property
    def library_id(self) -> str:
        """The library's identity, written beside its index and token files."""
        return self.get_setting("library_id") or ""

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
            base = root.rstrip("/")
            # A byte range, not LIKE or substr: LIKE ignores case, and both count
            # characters, which paths that are not UTF-8 do not have. '0' follows '/'.
            in_root = (Image.path > base + "/") & (Image.path < base + "0")
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

    def vector_sources(self, kind: str, ids: Sequence[int]) -> dict[int, str]:
        """item id -> content hash, for the ``ids`` whose item may hold a vector
        of ``kind``: an image that loaded (a failed one keeps none), any text."""
        if kind == "images":
            return {i: r.content_hash for i, r in self.images_by_id(ids).items() if r.status == "ok"}
        return {i: r.content_hash for i, r in self.texts_by_id(ids).items()}

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

    def filtered_image_ids(
        self, model_id: int, glob: str | None = None, since: dt.datetime | None = None, until: dt.datetime | None = None
    ) -> np.ndarray:
        """Ids of images with a vector of this model whose path matches the
        SQLite ``glob`` and whose date lies in [``since``, ``until``] (each optional)."""
        q = select(Image.id).join(ImageVector, ImageVector.image_id == Image.id).where(ImageVector.model_id == model_id)
        if glob is not None:
            q = q.where(glob_match(Image.path, glob))
        if since is not None:
            q = q.where(Image.taken_at >= since)
        if until is not None:
            q = q.where(Image.taken_at <= until)
        return np.fromiter(self.session.scalars(q), dtype=np.int64)

    def corpus_text_ids(self, model_id: int, corpus: str) -> np.ndarray:
        """Ids of the texts of ``corpus`` with a vector of this model."""
        q = select(TextItem.id).join(TextVector, TextVector.text_id == TextItem.id).where(
            TextVector.model_id == model_id, TextItem.corpus == corpus
        )
        return np.fromiter(self.session.scalars(q), dtype=np.int64)

    def corpora(self) -> list[str]:
        return list(self.session.scalars(select(TextItem.corpus).distinct().order_by(TextItem.corpus)))

    # --------------------------------------------------------------- status
    def counts(self, failures: int = 20) -> dict[str, Any]:
        """What ``crossfind status`` reports after the library's folder: the
        default model, images by status, texts by corpus, vectors and token
        rows per model, the first ``failures`` failed files (by path) and the
        number of stored searches."""
        s = self.session
        by_status = dict(s.execute(select(Image.status, func.count()).group_by(Image.status)).all())
        corpora = dict(s.execute(select(TextItem.corpus, func.count()).group_by(TextItem.corpus)).all())
        models = []
        for m in self.models():
            n_tok = s.scalar(select(func.count()).select_from(ImageVector)
                             .where(ImageVector.model_id == m.id, ImageVector.has_tokens.is_(True)))
            models.append({"spec": m.spec, "dim": m.dim, "image_vectors": self.count_vectors(m.id, "images"),
                           "text_vectors": self.count_vectors(m.id, "texts"), "image_tokens": n_tok})
        failed = select(Image.path, Image.error).where(Image.status == "failed").order_by(Image.path).limit(failures)
        return {
            "default_model": self.get_setting("default_model"),
            "images": sum(by_status.values()),
            "images_ok": by_status.get("ok", 0),
            "images_failed": by_status.get("failed", 0),
            "images_pending": by_status.get("pending", 0),
            "texts": sum(corpora.values()),
            "corpora": corpora,
            "models": models,
            "failures": [{"path": p, "error": e} for p, e in s.execute(failed)],
            "queries": s.scalar(select(func.count()).select_from(Query)),
        }

    def identical_images(self, glob: str | None = None) -> list[tuple[int, str]]:
        """(image id, content hash) of every image whose bytes another image
        shares, by id; with ``glob`` (SQLite GLOB) both must match it."""
        dup_hashes = select(Image.content_hash).group_by(Image.content_hash).having(func.count() > 1)
        q = select(Image.id, Image.content_hash)
        if glob is not None:
            dup_hashes = dup_hashes.where(glob_match(Image.path, glob))
            q = q.where(glob_match(Image.path, glob))
        return [(i, h) for i, h in self.session.execute(q.where(Image.content_hash.in_(dup_hashes)).order_by(Image.id))]



def _check_head(engine: SAEngine, where: str) -> None:
    """A read-only library cannot be upgraded: it must be at the newest schema."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if current != head:
        raise LibraryError(
            f"library database {where} is read-only and needs an upgrade (schema {current}, this crossfind uses {head}); "
            "open it once where it is writable"
        )


def _reason(exc: BaseException) -> str:
    """The first line of a database error, without SQLAlchemy's notes."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _ready(engine: SAEngine, where: str, read_only: bool) -> SAEngine:
    """``engine`` once its database is at the newest schema: checked when
    ``read_only``, else upgraded (Alembic takes a third of a second to load:
    it runs only when the database is not at the newest revision already)."""
    try:
        if read_only:
            _check_head(engine, where)
        else:
            current = _current_revision(engine)
            if current is None or current != head_revision():
                upgrade(engine)
    except LibraryError:
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        raise LibraryError(f"cannot open library database {where}: {_reason(exc)}") from exc
    return engine


def open_store(db: str | Path, read_only: bool = False) -> Store:
    """Open (creating or upgrading) the library database: a SQLite file at
    ``db``, or the database at the URL ``db`` (``postgresql+psycopg://...``);
    ``read_only`` opens an existing one as it is."""
    if isinstance(db, str) and is_database_url(db):
        return Store(_ready(make_engine(db), mask_url(db), read_only), read_only=read_only, url=db)
    db_path = Path(db)
    if read_only and not db_path.is_file():
        raise LibraryError(f"no library database at {db_path}, and its folder is read-only")
    if not read_only:
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LibraryError(f"cannot create library folder {db_path.parent}: {exc.strerror}") from exc
    engine = _ready(make_engine(db_path, read_only=read_only), str(db_path), read_only)
    return Store(engine, read_only=read_only, path=db_path)


#: The SQLite database of a library, in its folder.
DB_NAME = "library.db"
#: In a library folder whose store is a database elsewhere: which library the folder belongs to.
BINDING_NAME = "store.json"


def _read_binding(library_dir: Path) -> dict[str, Any] | None:
    import json

    path = library_dir / BINDING_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LibraryError(f"cannot read {path}: {exc}; it says which library database this folder belongs to") from None
    if not isinstance(data, dict) or not isinstance(data.get("library"), str):
        raise LibraryError(f"{path} is damaged; it says which library database this folder belongs to")
    return data


def open_library(library_dir: str | os.PathLike[str] | None, db: str | None) -> tuple[Store, Path]:
    """The store of the library folder ``library_dir`` (default: :func:`default_library`)
    and the folder, resolved; see :meth:`retrieval.Engine.open`. A folder on a
    read-only file system (or without write permission) opens read-only."""
    from .locations import database, default_database, default_library

    if library_dir is not None and not os.fspath(library_dir).strip():
        raise LibraryError("empty library path; give a folder (or leave --library out for the default)")
    lib = Path(library_dir).expanduser() if library_dir is not None else default_library()
    if lib.exists() and not lib.is_dir():
        raise LibraryError(f"library path {lib} is a file, not a folder")
    url = database(db) if db is not None else default_database()
    sqlite = lib / DB_NAME
    read_only = lib.is_dir() and (
        not os.access(lib, os.W_OK) or (url is None and sqlite.exists() and not os.access(sqlite, os.W_OK))
    )
    return open_library_store(lib, url, read_only=read_only), lib.resolve()


def open_library_store(library_dir: str | Path, db: str | None = None, read_only: bool = False) -> Store:
    """The store of the library in ``library_dir``: its own ``library.db``
    (``db`` None), or the database at the URL ``db``.

    A database elsewhere is bound to the folder that holds its index and token
    files: the first open writes ``store.json`` (the library id, the URL
    without password, a folder id) there, and every later open checks it, so a
    folder is never used with another library's database, a SQLite library's
    folder never with a database URL, and a database-backed folder never
    silently gets a new, empty ``library.db``. Several folders (one per
    machine) may share one database: each is a cache of its vectors (see
    :mod:`retrieval.slot`)."""
    import json
    import uuid

    lib = Path(library_dir)
    binding = _read_binding(lib) if lib.is_dir() else None
    if db is None:
        if binding is not None and not (lib / DB_NAME).exists():
            where = binding.get("database") or "another database"
            raise LibraryError(
                f"library {lib} keeps its store in {where}: give --db URL (or set $CROSSFIND_DATABASE_URL)"
            )
        return open_store(lib / DB_NAME, read_only=read_only)
    if (lib / DB_NAME).exists():
        raise LibraryError(
            f"library folder {lib} holds a SQLite library ({DB_NAME}); it cannot be used with {mask_url(db)}: "
            "give a new folder (--library) for that database"
        )
    store = open_store(db, read_only=read_only)
    library = store.library_id
    if binding is not None:
        if binding["library"] != library:
            store.close()
            raise LibraryError(
                f"library folder {lib} belongs to library {binding['library']} "
                f"({binding.get('database') or 'another database'}), but {mask_url(db)} is library {library}: "
                "give the folder that goes with this database, or a new one"
            )
        store.folder_id = str(binding.get("folder") or "")
        return store
    if read_only:
        return store
    folder = uuid.uuid4().hex
    data = {"library": library, "database": mask_url(db), "folder": folder}
    try:
        lib.mkdir(parents=True, exist_ok=True)
        tmp = lib / f"{BINDING_NAME}.{folder}.tmp"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(data, indent=1) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, lib / BINDING_NAME)  # never replaces one another process wrote meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except OSError as exc:
        store.close()
        raise LibraryError(f"cannot write to library folder {lib}: {exc.strerror}") from None
    store.close()
    return open_library_store(lib, db, read_only)  # checked as any later open is
