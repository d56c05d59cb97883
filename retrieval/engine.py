"""The engine: index folders and corpora, search every direction, keep history.

``Engine(store, library_dir, model)`` takes its collaborators; ``Engine.open``
builds the real ones. Per model, the engine keeps a :class:`~retrieval.slot.ModelSlot`
(encoder, vector indexes, patch-token store and reranker, all loaded on first use);
searches run through its :class:`~retrieval.search.Searcher`.

Crash safety: image and text rows are committed before encoding; vectors are
added to the in-memory index and made durable at checkpoints (atomic index
save, token flush, then the vector rows' commit). On load, each model's slot
(:mod:`retrieval.slot`) reconciles its index with the vector rows, so a crash
loses at most the work since the last checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from .corpus import read_corpus
from .encoders import DEFAULT_MODEL, Encoder, parse_spec
from .errors import CorpusError, LibraryError, QueryError, write_failure
from .lock import WriterLock
from .paths import is_utf8, normalize_path
from .locations import database, default_database, default_library
from .search import Searcher
from .slot import ModelSlot
from .store import DB_NAME, Store, open_library_store
from .types import HistoryEntry, Hit, ImageInput, IndexReport, SearchQuery, SearchResult, TextsReport

if TYPE_CHECKING:  # pragma: no cover
    from .ray_index import RayOptions

LOG = logging.getLogger(__name__)

#: Seconds between checkpoints (index save + commit) while indexing.
CHECKPOINT_SECONDS = 30.0

_F = TypeVar("_F", bound=Callable[..., Any])


def writes(method: _F) -> _F:
    """Run an :class:`Engine` method under the library's writer lock (see
    :meth:`Engine.writer`); a full disk or read-only library becomes a
    one-line :class:`LibraryError`, with what was committed before kept."""

    @functools.wraps(method)
    def run(self: Engine, *args: Any, **kwargs: Any) -> Any:
        with self.writer():
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


def _bars(enabled: bool) -> Callable[[int | None, str, str], Any]:
    """A progress-bar factory ``(total, desc, unit) -> tqdm`` (bars hidden unless ``enabled``)."""

    def bar(total: int | None, desc: str, unit: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)

    return bar


class Engine:
    """Index image folders and text corpora; search across modalities.

    Use :meth:`open` and the engine as a context manager::

        with Engine.open("~/lib", model="shapes-tiny") as eng:
            eng.index_folder("~/Pictures")
            for hit in eng.search_text("a dog on a beach", k=5):
                print(hit.rank, hit.path, hit.score)
    """

    def __init__(
        self,
        store: Store,
        library_dir: Path,
        model: str | None = None,
        encoder: Encoder | None = None,
        device: str | None = None,
    ) -> None:
        self.store = store
        self.library_dir = Path(library_dir)
        self.device = device
        self.lock = WriterLock(self.library_dir, shared=store.shared_lock())
        self._models: dict[str, ModelSlot] = {}
        self._model_spec = model
        self.searcher = Searcher(store, self.state, self.library_dir)
        if encoder is not None:
            self._models[encoder.spec.spec] = ModelSlot(
                store, self.library_dir, encoder.spec, device=device, encoder=encoder, lock=self.lock
            )
            self._model_spec = encoder.spec.spec

    @classmethod
    def open(
        cls,
        library_dir: str | os.PathLike[str] | None = None,
        model: str | None = None,
        device: str | None = None,
        db: str | None = None,
    ) -> Engine:
        """Open (creating or upgrading) the library at ``library_dir``.

        ``model`` is a model spec (see :mod:`retrieval.encoders`); when None the
        library's default model is used, else ``ViT-B-32:laion2b_s34b_b79k``.
        ``db`` is a database URL for the store (``postgresql+psycopg://USER:PASSWORD@HOST/DB``,
        or ``"sqlite"`` for the folder's own ``library.db``; default ``$CROSSFIND_DATABASE_URL``,
        else SQLite in the library folder);
        the folder keeps the vector indexes and token files either way.
        Nothing heavy is loaded until it is needed.
        """
        if library_dir is not None and not os.fspath(library_dir).strip():
            raise LibraryError("empty library path; give a folder (or leave --library out for the default)")
        lib = Path(library_dir).expanduser() if library_dir is not None else default_library()
        if lib.exists() and not lib.is_dir():
            raise LibraryError(f"library path {lib} is a file, not a folder")
        url = database(db) if db is not None else default_database()
        sqlite = lib / DB_NAME
        # A library on a read-only file system (or without write permission) is
        # opened read-only: searches, status, history and show work, writes refuse.
        read_only = lib.is_dir() and (
            not os.access(lib, os.W_OK) or (url is None and sqlite.exists() and not os.access(sqlite, os.W_OK))
        )
        store = open_library_store(lib, url, read_only=read_only)
        return cls(store, lib.resolve(), model=model, device=device)

    @property
    def read_only(self) -> bool:
        """Whether the library was opened read-only (its folder cannot be written)."""
        return self.store.read_only

    @contextmanager
    def writer(self, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the library's writer lock for a block of writing operations.

        Every writing method takes it itself; wrap calls in ``with
        eng.writer(wait=False):`` to fail at once with
        :class:`~retrieval.errors.LibraryBusy` when another process writes, or
        pass ``on_wait`` to say that this one waits. Readers never need it.
        On taking the lock, temp files left by a crash during a save are
        removed. A full disk or read-only file system inside the block becomes
        a one-line :class:`LibraryError`; what was committed before is kept.
        """
        if self.read_only:
            raise LibraryError(f"library {self.library_dir} is read-only; searches work, changes need a writable folder")
        first = self.lock.acquire(wait=wait, on_wait=on_wait)
        try:
            if first:
                self._clean_temp_files()
                self.refresh()
            yield
        except Exception as exc:
            reason = write_failure(exc)
            if reason is None:
                raise
            self._abandon()
            todo = "make it writable" if "read-only" in reason else "free some space"
            raise LibraryError(
                f"cannot write to library {self.library_dir}: {reason}; what was saved before is kept, "
                f"{todo} and run the command again"
            ) from None
        finally:
            self.lock.release()

    def refresh(self) -> None:
        """See what other processes committed since this engine loaded its
        indexes: stale ones are dropped and reload on use (a long-lived reader,
        such as a server, calls this before a search; writers on taking the lock)."""
        self.store.expire()
        for slot in self._models.values():
            slot.drop_if_stale()

    def _abandon(self) -> None:
        """After a failed write: drop uncommitted changes and in-memory indexes
        (they are reloaded, and reconciled, from what is on disk)."""
        try:
            self.store.rollback()
        except Exception:  # the session may be unusable after a disk error
            LOG.debug("rollback failed", exc_info=True)
        for slot in self._models.values():
            slot.reset()
        self.searcher.queries.clear()

    def _clean_temp_files(self) -> None:
        """Remove temp files of saves a crash interrupted (only the writer saves)."""
        for pattern in ("*.tmp", "models/*/*.tmp", "rerank-features/*/*/*.tmp"):
            for tmp in self.library_dir.glob(pattern):
                try:
                    tmp.unlink()
                    LOG.info("removed %s, left by an interrupted save", tmp)
                except OSError:
                    pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for state in self._models.values():
            state.close()
        self.store.close()
        self.lock.close()

    # --------------------------------------------------------------- models
    @property
    def model_spec(self) -> str:
        """The spec of the model in use: the one asked for, else the library default."""
        if self._model_spec:
            return parse_spec(self._model_spec).spec
        return self.store.get_setting("default_model") or DEFAULT_MODEL

    def state(self, spec: str | None = None) -> ModelSlot:
        ms = parse_spec(spec or self.model_spec)
        if ms.spec not in self._models:
            self._models[ms.spec] = ModelSlot(self.store, self.library_dir, ms, device=self.device, lock=self.lock)
        return self._models[ms.spec]

    @property
    def encoder(self) -> Encoder:
        return self.state().encoder

    def _mark_default(self, state: ModelSlot) -> None:
        if self.store.get_setting("default_model") is None:
            self.store.set_setting("default_model", state.spec.spec)

    @writes
    def set_default_model(self, spec: str) -> str:
        """Make ``spec`` the library's default model (it must load)."""
        state = self.state(spec)
        state.row  # loads the encoder: a spec that cannot load is refused now
        self.store.set_setting("default_model", state.spec.spec)
        self.store.commit()
        return state.spec.spec

    # ------------------------------------------------------------ rerankers
    def reranker_for(self, model: str | None = None) -> str | None:
        """The reranker spec chosen for ``model`` (default: the model in use), or
        None when the model's own reranker is used (see :mod:`retrieval.rerank_select`)."""
        from .rerank_select import chosen

        return chosen(self.store, parse_spec(model or self.model_spec).spec)

    @writes
    def set_reranker(self, spec: str, model: str | None = None) -> str:
        """Choose the reranker searches with ``model`` (default: the model in
        use) re-rank with: a spec (``local-dir:PATH``, ``hf-hub:ORG/NAME``), or
        ``default`` for the model's own. Returns the spec as stored."""
        from .rerank_select import DEFAULT, check_spec, choice_key

        value = DEFAULT if spec.strip() == DEFAULT else check_spec(spec).spec
        self.store.set_setting(choice_key(parse_spec(model or self.model_spec).spec), value)
        self.store.commit()
        return value

    @writes
    def calibrate_reranker(
        self, folder: str | os.PathLike[str], reranker: str | None = None, model: str | None = None,
        candidates: int = 16, annotations: str | os.PathLike[str] | None = None, progress: bool = False,
    ) -> dict[str, Any]:
        """Fit the Platt calibration of a BLIP reranker (default: the one chosen
        for ``model``) on a captioned folder (as ``crossfind eval`` reads it) and
        keep it in the library beside the choice; returns the fit's report."""
        from .eval_rerank import calibrate_on_folder
        from .rerank_select import calibration_key, check_spec, not_blip

        model_spec = parse_spec(model or self.model_spec).spec
        spec = reranker or self.reranker_for(model_spec)
        if spec is None:
            raise QueryError(f"no reranker chosen for model {model_spec}; give one with --reranker SPEC "
                             "or choose one with `crossfind set-reranker SPEC`")
        rs = check_spec(spec)
        if rs.kind != "blip":
            raise not_blip(rs.spec)
        cal, report = calibrate_on_folder(Path(folder), model_spec, rs.spec, candidates,
                                          Path(annotations) if annotations is not None else None, self.device, progress)
        value = {**json.loads(cal.to_json()), "fingerprint": report["fingerprint"], "folder": str(Path(folder).resolve()),
                 "model": model_spec}
        self.store.set_setting(calibration_key(rs.spec), json.dumps(value))
        self.store.commit()
        return report

    def rerank_features(self, reranker: str | None = None, progress: bool = False, batch: int = 64) -> int:
        """Compute and cache the BLIP image features of every indexed image that
        lacks them, for ``reranker`` (default: the one chosen for the model in
        use), so that searches never wait for the vision tower; how many were computed."""
        from .rerank_blip import FeatureItem

        spec = reranker or self.reranker_for()
        if spec is None:
            raise QueryError("no BLIP reranker chosen for this model; give one with --reranker SPEC or `crossfind set-reranker`")
        state = self.state()
        rr = self.searcher.rerankers.get(spec, lambda: state.encoder)
        if getattr(rr, "kind", None) != "blip":
            raise QueryError(f"{spec} is a crossfind reranker; its patch tokens are stored while indexing already")
        ids = self.store.image_ids("ok")
        done = 0
        bar = _bars(progress)(len(ids), "reranker features", "img")
        try:
            for start in range(0, len(ids), batch):
                part = ids[start : start + batch]
                rows = self.store.images_by_id(part)
                counted: list[int] = []
                rr.features([FeatureItem(i, rows[i].content_hash, rows[i].path) for i in part if i in rows],
                            self.searcher.rerankers.feature_cache(rr), on_compute=counted.append)
                done += sum(counted)
                bar.update(len(part))
        finally:
            bar.close()
        return done

    # ------------------------------------------------------------- indexing
    @writes
    def index_folder(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        exclude: Sequence[str] = (),
        include_hidden: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        progress: bool = False,
        prune: bool = False,
        ray: RayOptions | str | None = None,
    ) -> IndexReport:
        """Index image files under ``paths`` incrementally; returns counts.

        Unchanged files (same size and mtime) are not decoded again; renamed
        or duplicated files are recognised by content hash and reuse their
        vector; files gone from disk leave the store and the index; files that
        cannot be decoded are recorded as failed with their reason. Files
        indexed before that are still on disk but no longer selected (hidden,
        or matched by a new ``exclude``) are kept and reported, or removed
        with ``prune``. See :mod:`retrieval.indexing`.

        With ``ray`` (a cluster address, ``"auto"``, or :class:`~retrieval.ray_index.RayOptions`)
        the files to encode are decoded and encoded through Ray Data, and the
        vectors written here with the same checkpoints (:mod:`retrieval.ray_index`).
        """
        from .indexing import EncodeOptions, Indexer, ScanOptions

        encode = None
        if ray is not None:
            from .ray_index import RayEncode, RayOptions

            encode = RayEncode(ray if isinstance(ray, RayOptions) else RayOptions(address=ray))
        t0 = time.perf_counter()
        roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        state = self.state()
        state.row  # loads the model before anything is written
        self._mark_default(state)
        indexer = Indexer(self.store, state, _bars(progress), encode)
        report = indexer.run(roots, ScanOptions(tuple(exclude), include_hidden, prune),
                             EncodeOptions(batch_size, workers, checkpoint_seconds))
        report.seconds = time.perf_counter() - t0
        return report

    # --------------------------------------------------------------- texts
    @writes
    def add_texts(self, path: str | os.PathLike[str], corpus: str | None = None, replace: bool = False, progress: bool = False) -> TextsReport:
        """Add or update a text corpus from a ``.txt``, ``.jsonl`` or ``.csv`` file.

        ``corpus`` defaults to the file's stem. Changed texts are re-encoded,
        new ones added; with ``replace`` texts no longer in the file are removed.
        Malformed records are reported (``report.errors``) and the rest load.
        See :mod:`retrieval.ingest_texts`.
        """
        from .ingest_texts import add_texts

        t0 = time.perf_counter()
        path = Path(path).expanduser()
        parsed = read_corpus(path)
        corpus = corpus or path.stem
        if not corpus.strip() or not is_utf8(corpus):
            raise CorpusError(f"corpus name {corpus!r} is empty or not valid UTF-8; give one with --corpus NAME")
        state = self.state()
        self._mark_default(state)
        report = add_texts(self.store, state, parsed, corpus, replace, _bars(progress))
        report.seconds = time.perf_counter() - t0
        return report

    # -------------------------------------------------------------- removal
    def images_under(self, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
        """Paths of the library's images that are ``paths`` or lie under them."""
        roots = [normalize_path(p) for p in paths]
        return sorted(r.path for r in self.store.images_under(roots))

    @writes
    def remove_images(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """Remove images (files, or every image under folders) from the library."""
        roots = [normalize_path(p) for p in paths]
        if not roots:
            raise LibraryError("no path to remove")
        rows = self.store.images_under(roots)
        ids = [r.id for r in rows]
        if ids:
            self._remove_from_all(ids, "images")
            self.store.delete_images(ids)
            self.store.commit()
        return len(ids)

    @writes
    def remove_texts(self, corpus: str) -> int:
        """Remove a whole corpus from the library."""
        ids = self.store.text_ids(corpus)
        if not ids:
            raise LibraryError(f"no corpus named {corpus!r}; corpora: {', '.join(self.store.corpora()) or 'none'}")
        self._remove_from_all(ids, "texts")
        self.store.delete_texts(ids)
        self.store.commit()
        return len(ids)

    def _remove_from_all(self, ids: list[int], kind: str) -> None:
        for model in self.store.models():
            state = self.state(model.spec)
            if (state.images if kind == "images" else state.texts).remove(ids):
                state.save(kind)

    # --------------------------------------------------------------- search
    def search_text(self, query: str, k: int = 10, target: str = "images", **options: Any) -> list[Hit]:
        """Text → images (default) or text → texts."""
        return self.search(SearchQuery(text=query, k=k, target=target, **options)).hits

    def search_image(self, image: ImageInput, k: int = 10, target: str = "images", **options: Any) -> list[Hit]:
        """Image → images (the query image itself left out) or image → texts."""
        return self.search(SearchQuery(image=image, k=k, target=target, **options)).hits

    def search(self, query: SearchQuery) -> SearchResult:
        """Run one search and record it in the history; see :class:`SearchQuery`
        and :mod:`retrieval.search`."""
        return self.searcher.search(query)

    def query_vector(self, query: SearchQuery) -> np.ndarray:
        """The normalised query vector: the main query plus weighted terms."""
        return self.searcher.queries.vector(query)

    def text_vector(self, text: str) -> np.ndarray:
        """The embedding of ``text``: from this session or the search history
        when it was asked before with this model (no encoder load), else encoded."""
        return self.searcher.queries.text_vector(text)

    def image_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """The reranker's patch tokens of library images ``ids``, stacked in
        their order: stored, else re-encoded from the files (and stored)."""
        return self.searcher.candidate_tokens(self.state(), ids)

    # -------------------------------------------------------------- history
    def history(self, limit: int = 20) -> list[HistoryEntry]:
        """The most recent searches, newest first."""
        return self.searcher.history.recent(limit)

    def show(self, query_id: int) -> SearchResult:
        """A stored search's results, as they were found (nothing recomputed)."""
        return self.searcher.history.show(query_id)

    # --------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Counts of items, failures and vectors per model (no model is loaded)."""
        return {"library": str(self.library_dir), "store": self.store.location, **self.store.counts()}
