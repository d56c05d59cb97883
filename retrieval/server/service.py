"""What the server does, without HTTP: searches, items, files, thumbnails,
history, status and index jobs over one library.

Engines are not thread-safe (one database session each), so every engine call
happens under one lock; searches are short, and the index job runs with an
engine of its own outside that lock. Each read starts from a fresh database
snapshot, so rows committed by a job or by another process are seen.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from ..encoders import DEFAULT_MODEL, parse_spec
from ..engine import Engine
from ..errors import CrossfindError, LibraryError
from ..imageio import ImageLoadError, LoadedImage, load_image
from ..store import Image, Store, TextItem, open_library_store
from ..types import SearchQuery, SearchResult
from .jobs import Job, JobRunner
from .thumbs import ThumbCache

if TYPE_CHECKING:  # pragma: no cover
    from ..duplicates import DuplicateReport


class NotFound(CrossfindError):
    """No such item, file, search or job (HTTP 404)."""


class Service:
    """One library served: engines per model (loaded once, kept warm), a job runner, a thumbnail cache."""

    def __init__(
        self, library: str | os.PathLike[str] | None, model: str | None = None, device: str | None = None, db: str | None = None
    ) -> None:
        self._meta = Engine.open(library, model=model, device=device, db=db)  # status, history, items
        self.db = self._meta.store.url  # None: SQLite in the library folder
        self.library = self._meta.library_dir
        self.model = parse_spec(model).spec if model else None  # None: the library's default model
        self.device = device
        self._lock = threading.RLock()
        self._engines: dict[str, Engine] = {}
        self._folders: set[str] = set()  # real paths of the folders holding library images
        self.thumbs = ThumbCache(self.library / "thumbs")
        self.jobs = JobRunner(self._job_engine, self._reload)

    def close(self) -> None:
        self.jobs.wait(timeout=60)
        with self._lock:
            for eng in self._engines.values():
                eng.close()
            self._engines.clear()
            self._meta.close()

    # ------------------------------------------------------------- engines
    def library_default(self) -> str:
        with self._lock:
            self._fresh(self._meta)
            return parse_spec(self._meta.store.get_setting("default_model") or DEFAULT_MODEL).spec

    def resolve_model(self, spec: str | None, library_default: bool = False) -> str:
        """The model a request uses: the one it names, else the server's, else the library's default."""
        if spec:
            return parse_spec(spec).spec
        if self.model and not library_default:
            return self.model
        return self.library_default()

    def _engine(self, spec: str) -> Engine:
        eng = self._engines.get(spec)
        if eng is None:
            eng = self._engines[spec] = Engine(self._store(), self.library, model=spec, device=self.device)
        return eng

    @staticmethod
    def _fresh(eng: Engine) -> None:
        eng.store.session.rollback()  # end the last read transaction: see what others committed since
        eng.refresh()  # indexes another process saved since are reloaded

    def warm(self) -> str:
        """Load the server's model now (encoder, indexes, reranker), not on the first request; its spec."""
        spec = self.resolve_model(None)
        with self._lock:
            eng = self._engine(spec)
            if self._meta.store.find_model(spec) is not None:
                state = eng.state()
                state.encoder, state.images, state.texts, state.reranker  # noqa: B018 - load them
                if state.reranker is not None:
                    state.tokens  # noqa: B018
        return spec

    def _job_engine(self, spec: str) -> Engine:
        """An engine of its own for an index job, sharing the loaded encoder."""
        with self._lock:
            state = self._engine(spec).state()
            encoder = state.encoder
        return Engine(self._store(), self.library, encoder=encoder, device=self.device)

    def _store(self) -> Store:
        """A store of its own (engines are not thread-safe) on the library's database."""
        return open_library_store(self.library, self.db, read_only=self._meta.read_only)

    def _reload(self, spec: str) -> None:
        """After a job: reopen that model's searching engine (same encoder, new indexes)."""
        with self._lock:
            old = self._engines.pop(spec, None)
            if old is not None:
                encoder = old.state()._encoder
                old.close()
                if encoder is not None:
                    self._engines[spec] = Engine(self._store(), self.library, encoder=encoder, device=self.device)
            self._folders.clear()

    # -------------------------------------------------------------- search
    def search(self, query: SearchQuery, model: str | None = None, library_default: bool = False) -> SearchResult:
        spec = self.resolve_model(model, library_default)
        with self._lock:
            eng = self._engine(spec)
            self._fresh(eng)
            return eng.search(query)

    def duplicates(self, threshold: float | None = None, path: str | None = None, model: str | None = None) -> DuplicateReport:
        """The library's near-duplicate groups (``crossfind duplicates``): seconds on a large library,
        under the engine lock like every engine call."""
        from ..duplicates import find_duplicates

        spec = self.resolve_model(model)
        with self._lock:
            eng = self._engine(spec)
            self._fresh(eng)
            return find_duplicates(eng, threshold=threshold, path=path)

    def image_path(self, image_id: int) -> str:
        """The path of library image ``image_id`` (a query by example)."""
        with self._lock:
            self._fresh(self._meta)
            row = self._meta.store.session.get(Image, image_id)
            if row is None:
                raise NotFound(f"no image with id {image_id}")
            return row.path

    def load_upload(self, path: Path, model: str | None = None) -> LoadedImage:
        """Decode an uploaded image file as a query is decoded (size limits included)."""
        spec = self.resolve_model(model)
        with self._lock:
            size = self._engine(spec).state().encoder.image_size
        try:
            return load_image(path, min_size=size)
        except ImageLoadError as exc:
            raise CrossfindError(f"cannot use the uploaded image: {exc.reason}") from None

    # --------------------------------------------------------------- items
    def item(self, kind: str, item_id: int) -> dict[str, Any]:
        """An image (path, size, date, status, failure reason) or a text (corpus, text, metadata)."""
        with self._lock:
            self._fresh(self._meta)
            s = self._meta.store.session
            if kind == "images":
                im = s.get(Image, item_id)
                if im is None:
                    raise NotFound(f"no image with id {item_id}")
                return {
                    "kind": "image", "id": im.id, "path": im.path, "size": im.size, "width": im.width, "height": im.height,
                    "date": im.taken_at.isoformat(timespec="seconds") if im.taken_at else None,
                    "status": im.status, "error": im.error,
                    "indexed": im.indexed_at.isoformat(timespec="seconds") if im.indexed_at else None,
                }
            if kind == "texts":
                t = s.get(TextItem, item_id)
                if t is None:
                    raise NotFound(f"no text with id {item_id}")
                return {"kind": "text", "id": t.id, "corpus": t.corpus, "ext_id": t.ext_id, "text": t.text, "meta": t.meta}
        raise NotFound(f"unknown item kind {kind!r}; use images or texts")

    def image_file(self, image_id: int) -> tuple[str, str]:
        """``(path, content hash)`` of an image the server may send: it exists in
        the library, is still a file, and its real path lies in one of the
        folders that hold library images (a symlink swapped in that points
        elsewhere is refused). Raises :class:`NotFound` otherwise."""
        with self._lock:
            self._fresh(self._meta)
            row = self._meta.store.session.get(Image, image_id)
            if row is None:
                raise NotFound(f"no image with id {image_id}")
            path, content_hash = row.path, row.content_hash
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            raise NotFound(f"image {image_id} is no longer on disk")
        folder = os.path.dirname(real)
        if folder not in self._folders:
            self._folders = self._library_folders()
            if folder not in self._folders:
                raise NotFound(f"image {image_id} now points outside the library's folders")
        return real, content_hash

    def _library_folders(self) -> set[str]:
        with self._lock:
            self._fresh(self._meta)
            paths = self._meta.store.session.scalars(select(Image.path))
            folders = {os.path.dirname(p) for p in paths}
        return {os.path.realpath(f) for f in folders}

    def thumbnail(self, image_id: int, size: int) -> tuple[Path, str]:
        """``(JPEG file, ETag)`` of image ``image_id``'s thumbnail."""
        path, content_hash = self.image_file(image_id)
        try:
            return self.thumbs.get(path, content_hash, size), self.thumbs.etag(content_hash, size)
        except ImageLoadError as exc:
            raise NotFound(f"image {image_id} cannot be shown: {exc.reason}") from None

    def thumb_etag(self, image_id: int, size: int) -> str | None:
        """The ETag a thumbnail would have (a cheap check for ``If-None-Match``)."""
        with self._lock:
            self._fresh(self._meta)
            row = self._meta.store.session.get(Image, image_id)
            return None if row is None else self.thumbs.etag(row.content_hash, size)

    # ------------------------------------------------------- history, status
    def history(self, limit: int) -> dict[str, Any]:
        with self._lock:
            self._fresh(self._meta)
            return {"searches": [q.to_json() for q in self._meta.history(limit)]}

    def show(self, query_id: int) -> dict[str, Any]:
        with self._lock:
            self._fresh(self._meta)
            found = self._meta.store.query(query_id)
            if found is None:
                raise NotFound(f"no stored search with id {query_id}")
            return self._meta.show(query_id).to_json()

    def status(self) -> dict[str, Any]:
        with self._lock:
            self._fresh(self._meta)
            return self._meta.status()

    # ---------------------------------------------------------------- jobs
    def start_index(self, path: str, model: str | None = None) -> dict[str, Any]:
        p = Path(os.path.expanduser(path))
        if not p.is_absolute():
            raise LibraryError(f"give an absolute path to index, got {path!r}")
        if not p.exists():
            raise LibraryError(f"{p}: no such file or folder")
        spec = self.resolve_model(model)
        job = self.jobs.start(str(p.absolute()), spec, baseline=self._progress(str(p.absolute()))["done"])
        return self.job_json(job)

    def _progress(self, root: str) -> dict[str, int]:
        prefix = root.rstrip("/") + "/"
        with self._lock:
            self._fresh(self._meta)
            s = self._meta.store.session
            under = (Image.path == root) | (func.substr(Image.path, 1, len(prefix)) == prefix)
            rows = dict(s.execute(select(Image.status, func.count()).where(under).group_by(Image.status)).all())
        return {"done": rows.get("ok", 0) + rows.get("failed", 0), "total": sum(rows.values()), "failed": rows.get("failed", 0)}

    def job(self, job_id: int) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id}")
        return self.job_json(job)

    def job_json(self, job: Job) -> dict[str, Any]:
        return job.to_json(self._progress(job.path))

    def all_jobs(self) -> dict[str, Any]:
        return {"jobs": [self.job_json(j) for j in self.jobs.jobs()]}
