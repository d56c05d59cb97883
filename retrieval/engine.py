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
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from .encoders import DEFAULT_MODEL, Encoder, parse_spec
from .errors import LibraryError, cannot_write
from .lock import WriterLock
from .durability import remove_temp_files
from .paths import normalize_path
from .search import Searcher
from .slot import ModelSlot
from .store import Store, open_library
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

    def __init__(self, store: Store, library_dir: Path, model: str | None = None, encoder: Encoder | None = None,
                 device: str | None = None) -> None:
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
    def open(cls, library_dir: str | os.PathLike[str] | None = None, model: str | None = None,
             device: str | None = None, db: str | None = None) -> Engine:
        """Open (creating or upgrading) the library at ``library_dir``.

        ``model`` is a model spec (see :mod:`retrieval.encoders`); when None the
        library's default model is used, else ``ViT-B-32:laion2b_s34b_b79k``.
        ``db`` is a database URL for the store (``postgresql+psycopg://USER:PASSWORD@HOST/DB``,
        or ``"sqlite"`` for the folder's own ``library.db``; default ``$CROSSFIND_DATABASE_URL``,
        else SQLite in the library folder);
        the folder keeps the vector indexes and token files either way.
        Nothing heavy is loaded until it is needed.
        """
        store, lib = open_library(library_dir, db)
        return cls(store, lib, model=model, device=device)

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
                remove_temp_files(self.library_dir)
                self.refresh()
            yield
        except Exception as exc:
            failed = cannot_write(self.library_dir, exc)
            if failed is None:
                raise
            self._abandon()
            raise failed from None
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
        from .rerank_select import calibrate

        model_spec = parse_spec(model or self.model_spec).spec
        return calibrate(self.store, Path(folder), model_spec, reranker or self.reranker_for(model_spec), candidates,
                         Path(annotations) if annotations is not None else None, self.device, progress)

    def rerank_features(self, reranker: str | None = None, progress: bool = False, batch: int = 64) -> int:
        """Compute and cache what re-ranking needs per image for every indexed image that
        lacks it, for ``reranker`` (default: the one chosen for the model in use, else the
        model's own): BLIP image features, or a crossfind reranker's image memory, so
        that searches never wait for them; how many were computed."""
        from .rerank_select import compute_features

        return compute_features(self.store, self.searcher, reranker or self.reranker_for(), self.state(),
                                _bars(progress), batch)

    # ------------------------------------------------------------- indexing
    @writes
    def index_folder(
        self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], exclude: Sequence[str] = (),
        include_hidden: bool = False, batch_size: int | None = None, workers: int | None = None,
        checkpoint_seconds: float = CHECKPOINT_SECONDS, progress: bool = False, prune: bool = False,
        ray: RayOptions | str | None = None, int8: bool | None = None,
    ) -> IndexReport:
        """Index image files under ``paths`` incrementally; returns counts.

        Unchanged files (same size and mtime) are not decoded again; renamed
        or duplicated files are recognised by content hash and reuse their
        vector; files gone from disk leave the store and the index; files that
        cannot be decoded are recorded as failed with their reason. Files
        indexed before that are still on disk but no longer selected (hidden,
        or matched by a new ``exclude``) are kept and reported, or removed
        with ``prune``. See :mod:`retrieval.indexing`.

        With ``ray`` (a cluster address, ``"auto"``, or :class:`~retrieval.ray_index.RayOptions`) the files to encode are
        decoded and encoded through Ray Data, and the vectors written here with the same checkpoints (:mod:`retrieval.ray_index`).
        ``int8`` encodes with an 8-bit image tower (True) or float32 (False), remembered for the model; None: as remembered (float32 at first).
        """
        from .indexing import EncodeOptions, Indexer, ScanOptions, int8_choice
        from .ray_index import RayEncode

        encode, t0 = RayEncode.of(ray) if ray is not None else None, time.perf_counter()
        roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        state = self.state()
        state.row  # loads the model before anything is written
        self._mark_default(state)
        report = Indexer(self.store, state, _bars(progress), encode).run(
            roots, ScanOptions(tuple(exclude), include_hidden, prune),
            EncodeOptions(batch_size, workers, checkpoint_seconds, int8_choice(self.store, state, int8, ray is not None)))
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
        state = self.state()
        self._mark_default(state)
        report = add_texts(self.store, state, Path(path).expanduser(), corpus, replace, _bars(progress))
        report.seconds = time.perf_counter() - t0
        return report

    # -------------------------------------------------------------- removal
    def images_under(self, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
        """Paths of the library's images that are ``paths`` or lie under them."""
        return sorted(r.path for r in self.store.images_under([normalize_path(p) for p in paths]))

    @writes
    def remove_images(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """Remove images (files, or every image under folders) from the library."""
        from .removal import remove_images

        return remove_images(self.store, self._all_slots(), [normalize_path(p) for p in paths])

    @writes
    def remove_texts(self, corpus: str) -> int:
        """Remove a whole corpus from the library."""
        from .removal import remove_corpus

        return remove_corpus(self.store, self._all_slots(), corpus)

    def _all_slots(self) -> list[ModelSlot]:
        return [self.state(model.spec) for model in self.store.models()]

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
