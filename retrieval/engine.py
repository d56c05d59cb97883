"""The engine: index folders and corpora, search every direction, keep history.

``Engine(store, library_dir, model)`` takes its collaborators; ``Engine.open``
builds the real ones. Per model, the engine keeps a :class:`~retrieval.slot.ModelSlot`
(encoder, vector indexes, patch-token store and reranker, all loaded on first use).

Crash safety: image and text rows are committed before encoding; vectors are
added to the in-memory index and made durable at checkpoints (atomic index
save, token flush, then the vector rows' commit). On load, each model's slot
(:mod:`retrieval.slot`) reconciles its index with the vector rows, so a crash
loses at most the work since the last checkpoint.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from sqlalchemy import select

from .corpus import read_corpus
from .encoders import DEFAULT_MODEL, Encoder, parse_spec
from .duplicates import default_threshold, fold_duplicates
from .errors import CorpusError, LibraryError, QueryError
from .imageio import ImageLoadError, LoadedImage, load_image
from .lock import WriterLock
from .paths import is_utf8, normalize_path
from .locations import default_library
from .scan import file_hash
from .slot import ModelSlot
from .store import Image, ImageVector, Query, Result, Store, TextItem, TextVector, open_store, utcnow
from .types import TARGETS, HistoryEntry, Hit, ImageInput, IndexReport, SearchQuery, SearchResult, TextsReport

if TYPE_CHECKING:  # pragma: no cover
    from .ray_index import RayOptions

LOG = logging.getLogger(__name__)

#: Largest |weight| of an --add/--subtract term (larger ones overflow float32 sums).
MAX_TERM_WEIGHT = 1000.0

#: Seconds between checkpoints (index save + commit) while indexing.
CHECKPOINT_SECONDS = 30.0
DB_NAME = "library.db"
#: With ``SearchQuery(dedup=True)``, at least this many candidates per hit wanted are fetched to fold.
DEDUP_CANDIDATES = 4

_F = TypeVar("_F", bound=Callable[..., Any])


def _write_failure(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` means the library cannot be written
    (full disk, read-only file system); None for any other error."""
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return os.strerror(exc.errno).lower()
    if isinstance(exc, (OperationalError, sqlite3.OperationalError)):
        msg = str(getattr(exc, "orig", exc)).lower()
        if "disk is full" in msg:
            return "no space left on device"
        if "disk i/o error" in msg:
            return "disk I/O error (is the disk full?)"
        if "readonly" in msg or "read-only" in msg:
            return "the library is read-only"
    if isinstance(exc, RuntimeError) and "No space left on device" in str(exc):
        return "no space left on device"
    return None


def writes(method: _F) -> _F:
    """Run an :class:`Engine` method under the library's writer lock (see
    :meth:`Engine.writer`); a full disk or read-only library becomes a
    one-line :class:`LibraryError`, with what was committed before kept."""

    @functools.wraps(method)
    def run(self: Engine, *args: Any, **kwargs: Any) -> Any:
        with self.writer():
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


def path_pattern(glob: str) -> str:
    """The SQLite GLOB for ``--path``: absolute globs as given (normalised), others
    match at any depth (``'2024/*'`` is ``'*/2024/*'``); a leading ``./`` is
    dropped, never a leading dot of a name (``'.hidden/*'``)."""
    if glob.startswith("/"):
        return glob
    while glob.startswith("./"):
        glob = glob[2:]
    return glob if glob.startswith("*") else "*/" + glob


def _progress(total: int | None, desc: str, enabled: bool, unit: str = "img") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


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
        self.lock = WriterLock(self.library_dir)
        self._models: dict[str, ModelSlot] = {}
        self._text_vectors: dict[tuple[str, str], np.ndarray] = {}
        self._query_tokens: dict[tuple[str, str], np.ndarray] = {}  # reranker tokens of text queries
        self._model_spec = model
        #: Free each ONNX session as soon as a search is done with it: lower peak
        #: memory for a process that searches once (the CLI), slower for one that searches on.
        self.lean = False
        if encoder is not None:
            self._models[encoder.spec.spec] = ModelSlot(
                store, self.library_dir, encoder.spec, device=device, encoder=encoder, lock=self.lock
            )
            self._model_spec = encoder.spec.spec

    @classmethod
    def open(cls, library_dir: str | os.PathLike[str] | None = None, model: str | None = None, device: str | None = None) -> Engine:
        """Open (creating or upgrading) the library at ``library_dir``.

        ``model`` is a model spec (see :mod:`retrieval.encoders`); when None the
        library's default model is used, else ``ViT-B-32:laion2b_s34b_b79k``.
        Nothing heavy is loaded until it is needed.
        """
        if library_dir is not None and not os.fspath(library_dir).strip():
            raise LibraryError("empty library path; give a folder (or leave --library out for the default)")
        lib = Path(library_dir).expanduser() if library_dir is not None else default_library()
        if lib.exists() and not lib.is_dir():
            raise LibraryError(f"library path {lib} is a file, not a folder")
        db = lib / DB_NAME
        # A library on a read-only file system (or without write permission) is
        # opened read-only: searches, status, history and show work, writes refuse.
        read_only = lib.is_dir() and (not os.access(lib, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)))
        store = open_store(db, read_only=read_only)
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
            reason = _write_failure(exc)
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
        self.store.session.expire_all()
        for slot in self._models.values():
            slot.drop_if_stale()

    def _abandon(self) -> None:
        """After a failed write: drop uncommitted changes and in-memory indexes
        (they are reloaded, and reconciled, from what is on disk)."""
        try:
            self.store.session.rollback()
        except Exception:  # the session may be unusable after a disk error
            LOG.debug("rollback failed", exc_info=True)
        for slot in self._models.values():
            slot.reset()
        self._text_vectors.clear()

    def _clean_temp_files(self) -> None:
        """Remove temp files of saves a crash interrupted (only the writer saves)."""
        for pattern in ("*.tmp", "models/*/*.tmp"):
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
        indexer = Indexer(self.store, state, lambda total, desc, unit: _progress(total, desc, progress, unit), encode)
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
        report = add_texts(self.store, state, parsed, corpus, replace,
                           lambda total, desc, unit: _progress(total, desc, progress, unit))
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
            index = state.images if kind == "images" else state.texts
            if index.remove(ids):
                state._save(kind, index)

    # --------------------------------------------------------------- search
    def search_text(self, query: str, k: int = 10, target: str = "images", **options: Any) -> list[Hit]:
        """Text → images (default) or text → texts."""
        return self.search(SearchQuery(text=query, k=k, target=target, **options)).hits

    def search_image(self, image: ImageInput, k: int = 10, target: str = "images", **options: Any) -> list[Hit]:
        """Image → images (the query image itself left out) or image → texts."""
        return self.search(SearchQuery(image=image, k=k, target=target, **options)).hits

    def query_vector(self, query: SearchQuery) -> np.ndarray:
        """The normalised query vector: the main query plus weighted terms."""
        parts: list[tuple[float, np.ndarray]] = []
        if query.text is not None:
            parts.append((1.0, self.text_vector(query.text)))
        if query.image is not None:
            parts.append((1.0, self._encode_query_image(query.image)[0]))
        for t in query.terms:
            if t.text is not None:
                parts.append((t.weight, self.text_vector(t.text)))
            elif t.image is not None:
                parts.append((t.weight, self._encode_query_image(t.image)[0]))
        if not parts:
            raise QueryError("a search needs a text, an image, or at least one --add term")
        v = np.sum([w * x for w, x in parts], axis=0).astype(np.float32)
        norm = float(np.linalg.norm(v))
        if norm < 1e-8:
            raise QueryError("the weighted query terms cancel out; change their weights")
        return v / norm

    def text_vector(self, text: str) -> np.ndarray:
        """The embedding of ``text``: from this session or the search history
        when it was asked before with this model (no encoder load), else encoded."""
        state = self.state()
        key = (state.spec.spec, text)
        vec = self._text_vectors.get(key)
        if vec is None:
            raw = self.store.text_vector(state.spec.spec, text)
            if raw is not None and len(raw) == 4 * state.dim:
                vec = np.frombuffer(raw, dtype=np.float32).copy()
            else:
                vec = state.runtime("text").encode_texts([text])[0]
            self._text_vectors[key] = vec
        return vec

    def _text_query_tokens(self, state: ModelSlot, text: str) -> np.ndarray:
        """The reranker's tokens of a text query: from this session or the
        search history when it was re-ranked before (no encoder load), else encoded."""
        key = (state.spec.spec, text)
        tok = self._query_tokens.get(key)
        if tok is None:
            raw = self.store.text_tokens(state.spec.spec, text)
            row = 4 * state.reranker.config.text_features  # a reranker of other text features: encode again
            if raw is not None and len(raw) and len(raw) % row == 0:
                tok = np.frombuffer(raw, dtype=np.float32).reshape(-1, row // 4).copy()
            else:
                tok = state.reranker.query_tokens(text)
            self._query_tokens[key] = tok
        return tok

    def _open_query_image(self, image: ImageInput) -> LoadedImage:
        from PIL import Image as PILImage

        if isinstance(image, PILImage.Image):
            from .imageio import to_rgb

            return LoadedImage(to_rgb(image), image.width, image.height, None)
        path = Path(normalize_path(image, "query image path"))
        if path.is_dir():
            raise QueryError(f"query image {path} is a folder; give an image file")
        if not path.exists():
            raise QueryError(f"query image {path} does not exist")
        try:
            return load_image(path, min_size=self.state().runtime("image").image_size)
        except ImageLoadError as exc:
            raise QueryError(f"cannot use query image {path}: {exc.reason}") from None

    def _encode_query_image(
        self, image: ImageInput, with_tokens: bool = False, token_layer: str = "final"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        enc = self.state().runtime("image")
        loaded = self._open_query_image(image)
        vecs, toks = enc.encode_images(enc.image_batch([loaded.image]), with_tokens=with_tokens, token_layer=token_layer)
        return vecs[0], (toks[0] if toks is not None else None)

    def _allowed(self, query: SearchQuery, model_id: int) -> np.ndarray | None:
        """Ids passing the filters (None: no filter), restricted to vectors of this model."""
        store = self.store
        if query.target == "images":
            if query.path_glob is None and query.since is None and query.until is None:
                return None
            q = select(Image.id).join(ImageVector, ImageVector.image_id == Image.id).where(ImageVector.model_id == model_id)
            if query.path_glob is not None:
                pattern = path_pattern(query.path_glob)
                q = q.where(Image.path.op("GLOB")(pattern))
            if query.since is not None:
                q = q.where(Image.taken_at >= query.since)
            if query.until is not None:
                q = q.where(Image.taken_at <= query.until)
            return np.fromiter(store.session.scalars(q), dtype=np.int64)
        if query.corpus is None:
            return None
        q = select(TextItem.id).join(TextVector, TextVector.text_id == TextItem.id).where(
            TextVector.model_id == model_id, TextItem.corpus == query.corpus
        )
        return np.fromiter(store.session.scalars(q), dtype=np.int64)

    def _exclude_query_image(self, query: SearchQuery) -> set[int]:
        """Library ids of the query image itself (same path or same bytes)."""
        if query.target != "images" or query.image is None or not isinstance(query.image, (str, os.PathLike)):
            return set()
        path = normalize_path(query.image, "query image path")
        out = set()
        row = self.store.image_by_path(path)
        if row is not None:
            out.add(row.id)
        try:
            h = file_hash(path)
        except OSError:
            return out
        for rows in self.store.images_by_hash([h]).values():
            out.update(r.id for r in rows)
        return out

    def _check_query(self, query: SearchQuery) -> None:
        """Refuse what would be silently wrong: bad weights, text that is not
        UTF-8, filters that do not apply to the target, an unknown corpus."""
        for t in query.terms:
            if not math.isfinite(t.weight) or abs(t.weight) > MAX_TERM_WEIGHT:
                raise QueryError(f"term weight {t.weight!r} must be a finite number between "
                                 f"-{MAX_TERM_WEIGHT:g} and {MAX_TERM_WEIGHT:g}")
        for text in [query.text] + [t.text for t in query.terms]:
            if text is not None and not is_utf8(text):
                raise QueryError("the query text is not valid UTF-8; check the terminal's encoding")
            if text is not None and not text.strip():
                raise QueryError("the query text is empty")
        if query.target == "texts" and (query.path_glob or query.since or query.until):
            raise QueryError("--path, --since and --until filter images; they do not apply to --target texts")
        if query.target == "images" and query.corpus is not None:
            raise QueryError("--corpus filters texts; use it with --target texts")
        if query.corpus is not None and query.corpus not in self.store.corpora():
            raise QueryError(f"no corpus named {query.corpus!r}; corpora: {', '.join(self.store.corpora()) or 'none'}")

    def search(self, query: SearchQuery) -> SearchResult:
        """Run one search and record it in the history; see :class:`SearchQuery`."""
        t0 = time.perf_counter()
        if query.target not in TARGETS:
            raise QueryError(f"unknown target {query.target!r}; choose one of: {', '.join(TARGETS)}")
        if query.k <= 0:
            raise QueryError("k must be at least 1")
        if query.threshold is not None and not 0.0 <= query.threshold <= 1.0:
            raise QueryError("threshold is a probability between 0 and 1")
        self._check_query(query)
        state = self.state()
        model = self.store.find_model(state.spec.spec)
        if model is None:
            why = " since its weights changed" if state.weights_changed else ""
            raise LibraryError(
                f"nothing is indexed with model {state.spec.spec!r} in {self.library_dir}{why}; "
                "run `crossfind index PATH` (or add-texts) with it first"
            )
        notes: list[str] = []
        timings: dict[str, float] = {}
        vec = self.query_vector(query)
        timings["encode"] = time.perf_counter() - t0
        if self.lean and state.onnx_loaded is not None and not (query.rerank and state.reranker is not None):
            state.onnx_loaded.release()  # before the index is read: the two never share the peak

        t1 = time.perf_counter()
        index = state.search_index(query.target)
        allowed = self._allowed(query, model.id)
        exclude = self._exclude_query_image(query)
        text_mode = query.text is not None and query.image is None
        image_mode = query.image is not None and query.text is None
        can_rerank = query.rerank and (
            (query.target == "images" and text_mode) or (query.target == "texts" and image_mode)
        )
        reranker = state.reranker if can_rerank else None
        if can_rerank and reranker is None:
            notes.append(f"model {state.spec.spec} has no reranker; results are ranked by the dual encoder alone")
        n_cand = max(query.k, query.candidates) if reranker is not None else query.k
        n_cand = max(n_cand, DEDUP_CANDIDATES * query.k) if query.dedup else n_cand  # folded hits leave room
        res = index.search(vec, n_cand + len(exclude), allowed=allowed)
        ids = [int(i) for i in res.ids[0] if i >= 0 and int(i) not in exclude][:n_cand]
        scores = {int(i): float(s) for i, s in zip(res.ids[0], res.scores[0]) if i >= 0}
        if query.target == "images":
            rows_i = self.store.images_by_id(ids)
            ids = [i for i in ids if i in rows_i]
        else:
            rows_t = self.store.texts_by_id(ids)
            ids = [i for i in ids if i in rows_t]
        timings["index"] = time.perf_counter() - t1

        rerank_scores: dict[int, float] = {}
        kept_tokens: np.ndarray | None = None  # the text query's reranker tokens, kept in the history
        if reranker is not None and ids:
            t2 = time.perf_counter()
            dual = np.array([scores[i] for i in ids], np.float32)
            if query.target == "images":
                assert query.text is not None
                toks = self._candidate_tokens(state, ids, rows_i)
                kept_tokens = self._text_query_tokens(state, query.text)
                logits = reranker.logits_images(kept_tokens, toks, dual_scores=dual)
            else:
                assert query.image is not None
                _, qtok = self._encode_query_image(query.image, with_tokens=True, token_layer=state.token_layer)
                logits = reranker.logits_texts(qtok, [rows_t[i].text for i in ids], dual_scores=dual)
            rerank_scores = dict(zip(ids, reranker.probability(logits).tolist()))
            # Order by the raw logit: probabilities of a sharp reranker round to 1.0 and would tie.
            by_logit = dict(zip(ids, logits.tolist()))
            ids.sort(key=lambda i: (-by_logit[i], -scores[i]))
            timings["rerank"] = time.perf_counter() - t2
        if query.threshold is not None:
            if reranker is not None:
                ids = [i for i in ids if rerank_scores[i] >= query.threshold]
            else:
                notes.append("--threshold needs a reranker's match probability; it was not applied")
        if query.dedup:
            ids = fold_duplicates(index, ids, default_threshold(state.spec))
        ids = ids[: query.k]
        hits = []
        for rank, i in enumerate(ids, 1):
            if query.target == "images":
                hits.append(Hit(rank, "image", i, rows_i[i].path, None, scores[i], rerank_scores.get(i)))
            else:
                t = rows_t[i]
                hits.append(Hit(rank, "text", i, None, t.text, scores[i], rerank_scores.get(i), t.corpus))
        seconds = time.perf_counter() - t0
        qjson = {"text": query.text, "image": self._image_label(query.image), "target": query.target}
        qrow = Query(
            model=state.spec.spec,
            text=query.text,
            image_path=qjson["image"],
            target=query.target,
            terms=[t.to_json() for t in query.terms] or None,
            filters=query.filters_json() or None,
            k=query.k,
            candidates=query.candidates,
            reranked=reranker is not None,
            seconds=seconds,
            created_at=utcnow(),
            text_vector=self._text_vectors[(state.spec.spec, query.text)].tobytes() if query.text is not None else None,
            text_tokens=kept_tokens.tobytes() if kept_tokens is not None else None,
        )
        results = [Result(rank=h.rank, kind=h.kind, item_id=h.id, path=h.path, text=h.text, score=h.score, rerank_score=h.rerank_score) for h in hits]
        qid = self._keep_history(qrow, results, notes)
        return SearchResult(qid, qjson, state.spec.spec, reranker is not None, hits, seconds, timings, tuple(notes))

    def _keep_history(self, qrow: Query, results: list[Result], notes: list[str]) -> int | None:
        """Record a search in the history; on a read-only or full library the
        search still answers, with a note that it was not recorded. History
        needs no writer lock: SQLite's WAL lets it commit while a writer runs."""
        if self.read_only:
            notes.append("the library is read-only: this search was not added to the history")
            return None
        try:
            return self.store.add_query(qrow, results)
        except Exception as exc:
            reason = _write_failure(exc)
            if reason is None:
                from sqlalchemy.exc import OperationalError

                if not isinstance(exc, OperationalError):
                    raise
                reason = str(exc.orig).splitlines()[0]
            self.store.session.rollback()
            notes.append(f"this search was not added to the history: {reason}")
            return None

    @staticmethod
    def _image_label(image: ImageInput | None) -> str | None:
        if image is None:
            return None
        if isinstance(image, (str, os.PathLike)):
            return normalize_path(image, "query image path")
        return "<PIL image>"

    def _candidate_tokens(self, state: ModelSlot, ids: list[int], rows: dict[int, Image]) -> np.ndarray:
        """Patch tokens of candidate images: stored rows, else re-encoded (and stored)."""
        # Rows whose checksum fails (a damaged or cut-off token file) count as missing.
        out, missing = state.read_tokens(ids)
        if missing:
            enc = state.runtime("image")
            ok: list[int] = []
            pix = []
            for i in missing:
                try:
                    pix.append(enc.prepare(load_image(rows[i].path, min_size=enc.image_size).image))
                    ok.append(i)
                except ImageLoadError as exc:
                    LOG.warning("cannot re-read %s for re-ranking: %s", rows[i].path, exc.reason)
            if ok:
                _, toks = enc.encode_images(enc.batch(pix), with_tokens=True, token_layer=state.token_layer)
                assert toks is not None
                for i, t in zip(ok, toks):
                    out[i] = t
                state.store_tokens(ok, toks)
            shape = next(iter(out.values())).shape if out else (1, 1)
            for i in missing:
                out.setdefault(i, np.zeros(shape, np.float16))
        return np.stack([out[i] for i in ids])

    # -------------------------------------------------------------- history
    def history(self, limit: int = 20) -> list[HistoryEntry]:
        """The most recent searches, newest first."""
        return [
            HistoryEntry(q.id, q.created_at, q.text, q.image_path, q.target, q.model, q.k, q.terms, q.filters,
                         q.reranked, q.seconds)
            for q in self.store.queries(limit)
        ]

    def show(self, query_id: int) -> SearchResult:
        """A stored search's results, as they were found (nothing recomputed)."""
        if not 0 < query_id < 2**63:
            raise QueryError(f"no stored search with id {query_id}; see `crossfind history`")
        found = self.store.query(query_id)
        if found is None:
            raise QueryError(f"no stored search with id {query_id}; see `crossfind history`")
        q, rows = found
        hits = [Hit(r.rank, r.kind, r.item_id, r.path, r.text, r.score, r.rerank_score) for r in rows]
        qjson = {"text": q.text, "image": q.image_path, "target": q.target}
        return SearchResult(q.id, qjson, q.model, q.reranked, hits, q.seconds)

    # --------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Counts of items, failures and vectors per model (no model is loaded)."""
        from sqlalchemy import func

        s = self.store.session
        by_status = dict(s.execute(select(Image.status, func.count()).group_by(Image.status)).all())
        corpora = dict(s.execute(select(TextItem.corpus, func.count()).group_by(TextItem.corpus)).all())
        models = []
        for m in self.store.models():
            n_img = s.scalar(select(func.count()).select_from(ImageVector).where(ImageVector.model_id == m.id))
            n_txt = s.scalar(select(func.count()).select_from(TextVector).where(TextVector.model_id == m.id))
            n_tok = s.scalar(
                select(func.count()).select_from(ImageVector).where(ImageVector.model_id == m.id, ImageVector.has_tokens.is_(True))
            )
            models.append({"spec": m.spec, "dim": m.dim, "image_vectors": n_img, "text_vectors": n_txt, "image_tokens": n_tok})
        failures = [
            {"path": p, "error": e}
            for p, e in s.execute(select(Image.path, Image.error).where(Image.status == "failed").order_by(Image.path).limit(20))
        ]
        return {
            "library": str(self.library_dir),
            "default_model": self.store.get_setting("default_model"),
            "images": sum(by_status.values()),
            "images_ok": by_status.get("ok", 0),
            "images_failed": by_status.get("failed", 0),
            "images_pending": by_status.get("pending", 0),
            "texts": sum(corpora.values()),
            "corpora": corpora,
            "models": models,
            "failures": failures,
            "queries": s.scalar(select(func.count()).select_from(Query)),
        }

