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

import datetime as dt
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from sqlalchemy import select

from .corpus import read_corpus
from .encoders import DEFAULT_MODEL, Encoder, parse_spec
from .errors import LibraryError, QueryError
from .imageio import ImageLoadError, LoadedImage, load_image
from .locations import default_library
from .pipeline import default_workers, load_batches
from .scan import FileInfo, file_hash, scan
from .slot import ModelSlot
from .store import Image, ImageVector, Query, Result, Store, TextItem, TextVector, open_store, utcnow
from .types import TARGETS, Hit, ImageInput, IndexReport, SearchQuery, SearchResult, TextsReport

LOG = logging.getLogger(__name__)

#: Seconds between checkpoints (index save + commit) while indexing.
CHECKPOINT_SECONDS = 30.0
DB_NAME = "library.db"


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
        self._models: dict[str, ModelSlot] = {}
        self._text_vectors: dict[tuple[str, str], np.ndarray] = {}
        self._query_tokens: dict[tuple[str, str], np.ndarray] = {}  # reranker tokens of text queries
        self._model_spec = model
        if encoder is not None:
            self._models[encoder.spec.spec] = ModelSlot(store, self.library_dir, encoder.spec, device=device, encoder=encoder)
            self._model_spec = encoder.spec.spec

    @classmethod
    def open(cls, library_dir: str | os.PathLike[str] | None = None, model: str | None = None, device: str | None = None) -> Engine:
        """Open (creating or upgrading) the library at ``library_dir``.

        ``model`` is a model spec (see :mod:`retrieval.encoders`); when None the
        library's default model is used, else ``ViT-B-32:laion2b_s34b_b79k``.
        Nothing heavy is loaded until it is needed.
        """
        lib = Path(library_dir).expanduser() if library_dir is not None else default_library()
        if lib.exists() and not lib.is_dir():
            raise LibraryError(f"library path {lib} is a file, not a folder")
        store = open_store(lib / DB_NAME)
        return cls(store, lib.resolve(), model=model, device=device)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for state in self._models.values():
            state.close()
        self.store.close()

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
            self._models[ms.spec] = ModelSlot(self.store, self.library_dir, ms, device=self.device)
        return self._models[ms.spec]

    @property
    def encoder(self) -> Encoder:
        return self.state().encoder

    def _mark_default(self, state: ModelSlot) -> None:
        if self.store.get_setting("default_model") is None:
            self.store.set_setting("default_model", state.spec.spec)

    def set_default_model(self, spec: str) -> str:
        """Make ``spec`` the library's default model (it must load)."""
        state = self.state(spec)
        state.row  # loads the encoder: a spec that cannot load is refused now
        self.store.set_setting("default_model", state.spec.spec)
        self.store.commit()
        return state.spec.spec

    # ------------------------------------------------------------- indexing
    def index_folder(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        exclude: Sequence[str] = (),
        include_hidden: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        progress: bool = False,
    ) -> IndexReport:
        """Index image files under ``paths`` incrementally; returns counts.

        Unchanged files (same size and mtime) are not decoded again; renamed
        or duplicated files are recognised by content hash and reuse their
        vector; files gone from disk leave the store and the index; files that
        cannot be decoded are recorded as failed with their reason.
        """
        t0 = time.perf_counter()
        roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        abs_roots = []
        for r in roots:
            p = Path(os.path.expanduser(os.fspath(r))).absolute()
            if not p.exists():
                raise LibraryError(f"{p}: no such file or folder")
            abs_roots.append(str(p))
        state = self.state()
        model_id = state.row.id
        self._mark_default(state)
        store = self.store
        report = IndexReport()

        files = list(scan(abs_roots, exclude=exclude, include_hidden=include_hidden))
        report.scanned = len(files)
        existing = {row.path: row for row in store.images_under(abs_roots)}
        found = {f.path for f in files}
        gone = {p: row for p, row in existing.items() if p not in found}
        new_files: list[FileInfo] = []
        changed: list[tuple[FileInfo, Image]] = []
        for f in files:
            row = existing.get(f.path)
            if row is None:
                new_files.append(f)
            elif row.size != f.size or row.mtime_ns != f.mtime_ns:
                changed.append((f, row))
            else:
                report.unchanged += 1

        hashes = self._hash_files([f.path for f in new_files] + [f.path for f, _ in changed], workers, progress)
        vectors = state.images
        vec_map = store.image_vector_map(model_id)
        for f, row in changed:
            h = hashes.get(f.path)
            if h is None:
                continue  # vanished while scanning
            if h == row.content_hash:
                report.unchanged += 1  # touched, same bytes
            else:
                report.updated += 1
                row.content_hash, row.status, row.error = h, "pending", None
            row.size, row.mtime_ns = f.size, f.mtime_ns
        gone_by_hash: dict[str, list[Image]] = {}
        for row in gone.values():
            gone_by_hash.setdefault(row.content_hash, []).append(row)
        known = store.images_by_hash(h for p, h in hashes.items() if p not in existing)
        copies: list[tuple[int, int, str]] = []  # (new id, source id, hash) sharing a vector
        for f in new_files:
            h = hashes.get(f.path)
            if h is None:
                continue
            moved = gone_by_hash.get(h)
            if moved:
                row = moved.pop()
                del gone[row.path]
                row.path, row.size, row.mtime_ns = f.path, f.size, f.mtime_ns
                report.updated += 1
                continue
            source = next((r for r in known.get(h, []) if r.path not in gone), None)
            row = Image(path=f.path, size=f.size, mtime_ns=f.mtime_ns, content_hash=h, status="pending")
            if source is not None and source.status in ("ok", "failed"):
                row.status, row.error = source.status, source.error
                row.width, row.height, row.taken_at = source.width, source.height, source.taken_at
            store.session.add(row)
            store.session.flush()
            report.added += 1
            if source is not None and source.id in vec_map and vec_map[source.id] == h:
                copies.append((row.id, source.id, h))
        if gone:
            ids = [row.id for row in gone.values()]
            vectors.remove(ids)
            store.delete_images(ids)
            report.removed = len(ids)
        if copies:
            vectors.add([n for n, _, _ in copies], vectors.reconstruct([s for _, s, _ in copies]))
            tokens = state.tokens
            token_src = store.token_ids(model_id, [s for _, s, _ in copies]) if tokens is not None else set()
            if tokens is not None and token_src:
                pairs = [(n, s) for n, s, _ in copies if s in token_src]
                tokens.write([n for n, _ in pairs], tokens.read([s for _, s in pairs]))
            store.set_image_vectors(model_id, [(n, h, s in token_src) for n, s, h in copies])
        if gone or copies:
            state.save_images()
        store.commit()

        # Everything under the roots that lacks a current vector for this model.
        vec_map = store.image_vector_map(model_id)
        todo = [
            row
            for row in store.images_under(abs_roots)
            if row.status != "failed" and vec_map.get(row.id) != row.content_hash
        ]
        self._encode_images(state, todo, report, batch_size, workers, checkpoint_seconds, progress)
        report.failed = sum(row.status == "failed" for row in todo)
        report.seconds = time.perf_counter() - t0
        return report

    def _hash_files(self, paths: list[str], workers: int | None, progress: bool) -> dict[str, str]:
        out: dict[str, str] = {}
        if not paths:
            return out
        bar = _progress(len(paths), "hashing", progress, "file")

        def one(p: str) -> tuple[str, str | None]:
            try:
                return p, file_hash(p)
            except OSError:
                return p, None

        with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
            for p, h in pool.map(one, paths):
                if h is not None:
                    out[p] = h
                bar.update(1)
        bar.close()
        return out

    def _encode_images(
        self,
        state: ModelSlot,
        rows: list[Image],
        report: IndexReport,
        batch_size: int | None,
        workers: int | None,
        checkpoint_seconds: float,
        progress: bool,
    ) -> None:
        if not rows:
            return
        enc = state.encoder
        model_id = state.row.id
        index = state.images
        tokens = state.tokens
        batch_size = batch_size or (128 if enc.device.startswith("cuda") else 32)
        size = enc.image_size

        def load(row: Image) -> tuple[LoadedImage, Any]:
            img = load_image(row.path, min_size=size)
            return img, enc.prepare(img.image)

        bar = _progress(len(rows), "indexing", progress)
        pending: list[tuple[int, str, bool]] = []
        last = time.monotonic()
        try:
            for batch in load_batches(rows, load, batch_size, workers, errors=(ImageLoadError, OSError)):
                good = []
                for out in batch:
                    row = out.item
                    if out.error is not None:
                        row.status, row.error = "failed", out.error
                        continue
                    assert out.value is not None
                    loaded, pixels = out.value
                    row.status, row.error = "ok", None
                    row.width, row.height = loaded.width, loaded.height
                    row.taken_at = loaded.taken_at or dt.datetime.fromtimestamp(row.mtime_ns / 1e9)
                    good.append((row, pixels))
                if good:
                    x = enc.batch([p for _, p in good])
                    vecs, toks = enc.encode_images(x, with_tokens=tokens is not None, token_layer=state.token_layer)
                    ids = [r.id for r, _ in good]
                    index.add(ids, vecs)
                    if tokens is not None and toks is not None:
                        tokens.write(ids, toks)
                    pending.extend((r.id, r.content_hash, toks is not None) for r, _ in good)
                    report.encoded += len(good)
                bar.update(len(batch))
                if time.monotonic() - last >= checkpoint_seconds:
                    self._checkpoint_images(state, model_id, pending)
                    pending = []
                    last = time.monotonic()
        finally:
            bar.close()
        self._checkpoint_images(state, model_id, pending)

    def _checkpoint_images(self, state: ModelSlot, model_id: int, pending: list[tuple[int, str, bool]]) -> None:
        """Make the work so far durable: index (and tokens) first, then rows."""
        state.save_images()
        if pending:
            self.store.set_image_vectors(model_id, pending)
        self.store.commit()

    # --------------------------------------------------------------- texts
    def add_texts(self, path: str | os.PathLike[str], corpus: str | None = None, replace: bool = False, progress: bool = False) -> TextsReport:
        """Add or update a text corpus from a ``.txt``, ``.jsonl`` or ``.csv`` file.

        ``corpus`` defaults to the file's stem. Changed texts are re-encoded,
        new ones added; with ``replace`` texts no longer in the file are removed.
        Malformed records are reported (``report.errors``) and the rest load.
        """
        t0 = time.perf_counter()
        path = Path(path).expanduser()
        parsed = read_corpus(path)
        corpus = corpus or path.stem
        state = self.state()
        self._mark_default(state)
        store = self.store
        report = TextsReport(scanned=parsed.read, failed=len(parsed.errors), errors=list(parsed.errors))
        rows = {r.ext_id: r for r in store.corpus_rows(corpus)}
        for rec in parsed.records:
            row = rows.get(rec.ext_id)
            if row is None:
                store.session.add(TextItem(corpus=corpus, ext_id=rec.ext_id, text=rec.text, meta=rec.meta, content_hash=rec.content_hash))
                report.added += 1
            elif row.content_hash != rec.content_hash or row.meta != rec.meta:
                if row.content_hash != rec.content_hash:
                    report.updated += 1
                else:
                    report.unchanged += 1
                row.text, row.meta, row.content_hash = rec.text, rec.meta, rec.content_hash
            else:
                report.unchanged += 1
        texts = state.texts
        if replace:
            keep = {rec.ext_id for rec in parsed.records}
            drop = [r.id for k, r in rows.items() if k not in keep]
            if drop:
                texts.remove(drop)
                store.delete_texts(drop)
                state.save_texts()
                report.removed = len(drop)
        store.commit()
        self._encode_texts(state, store.corpus_rows(corpus), progress)
        report.seconds = time.perf_counter() - t0
        return report

    def _encode_texts(self, state: ModelSlot, rows: list[TextItem], progress: bool, batch_size: int = 256) -> int:
        store = self.store
        model_id = state.row.id
        vec_map = store.text_vector_map(model_id)
        todo = [r for r in rows if vec_map.get(r.id) != r.content_hash]
        if not todo:
            return 0
        enc = state.encoder
        index = state.texts
        bar = _progress(len(todo), "encoding texts", progress, "text")
        last = time.monotonic()
        pending: list[tuple[int, str]] = []
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            vecs = enc.encode_texts([r.text for r in part], batch_size=batch_size)
            index.add([r.id for r in part], vecs)
            pending.extend((r.id, r.content_hash) for r in part)
            bar.update(len(part))
            if time.monotonic() - last >= CHECKPOINT_SECONDS:
                state.save_texts()
                store.set_text_vectors(model_id, pending)
                store.commit()
                pending, last = [], time.monotonic()
        bar.close()
        state.save_texts()
        store.set_text_vectors(model_id, pending)
        store.commit()
        return len(todo)

    # -------------------------------------------------------------- removal
    def remove_images(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """Remove images (files, or every image under folders) from the library."""
        roots = [str(Path(os.path.expanduser(os.fspath(p))).absolute()) for p in paths]
        rows = self.store.images_under(roots)
        ids = [r.id for r in rows]
        if ids:
            self._remove_from_all(ids, "images")
            self.store.delete_images(ids)
            self.store.commit()
        return len(ids)

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
                vec = state.encoder.encode_texts([text])[0]
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
        path = Path(os.path.expanduser(os.fspath(image)))
        if not path.is_file():
            raise QueryError(f"query image {path} does not exist")
        try:
            return load_image(path, min_size=self.encoder.image_size)
        except ImageLoadError as exc:
            raise QueryError(f"cannot use query image {path}: {exc.reason}") from None

    def _encode_query_image(
        self, image: ImageInput, with_tokens: bool = False, token_layer: str = "final"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        enc = self.encoder
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
                pattern = query.path_glob if query.path_glob.startswith("/") else "*/" + query.path_glob.lstrip("./")
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
        path = Path(os.path.expanduser(os.fspath(query.image))).absolute()
        out = set()
        row = self.store.image_by_path(str(path))
        if row is not None:
            out.add(row.id)
        try:
            h = file_hash(path)
        except OSError:
            return out
        for rows in self.store.images_by_hash([h]).values():
            out.update(r.id for r in rows)
        return out

    def search(self, query: SearchQuery) -> SearchResult:
        """Run one search and record it in the history; see :class:`SearchQuery`."""
        t0 = time.perf_counter()
        if query.target not in TARGETS:
            raise QueryError(f"unknown target {query.target!r}; choose one of: {', '.join(TARGETS)}")
        if query.k <= 0:
            raise QueryError("k must be at least 1")
        if query.threshold is not None and not 0.0 <= query.threshold <= 1.0:
            raise QueryError("threshold is a probability between 0 and 1")
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

        t1 = time.perf_counter()
        index = state.images if query.target == "images" else state.texts
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
        qid = self.store.add_query(qrow, results)
        return SearchResult(qid, qjson, state.spec.spec, reranker is not None, hits, seconds, timings, tuple(notes))

    @staticmethod
    def _image_label(image: ImageInput | None) -> str | None:
        if image is None:
            return None
        if isinstance(image, (str, os.PathLike)):
            return str(Path(os.path.expanduser(os.fspath(image))).absolute())
        return "<PIL image>"

    def _candidate_tokens(self, state: ModelSlot, ids: list[int], rows: dict[int, Image]) -> np.ndarray:
        """Patch tokens of candidate images: stored rows, else re-encoded (and stored)."""
        model_id = state.row.id
        tokens = state.tokens
        have = self.store.token_ids(model_id, ids) if tokens is not None else set()
        out: dict[int, np.ndarray] = {}
        if have and tokens is not None:
            stored = [i for i in ids if i in have]
            for i, t in zip(stored, tokens.read(stored)):
                out[i] = t
        missing = [i for i in ids if i not in out]
        if missing:
            enc = state.encoder
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
                if tokens is not None:
                    tokens.write(ok, toks)
                    tokens.flush()
                    for row in self.store.session.scalars(
                        select(ImageVector).where(ImageVector.model_id == model_id, ImageVector.image_id.in_(ok))
                    ):
                        row.has_tokens = True
                    self.store.commit()
            shape = next(iter(out.values())).shape if out else (1, 1)
            for i in missing:
                out.setdefault(i, np.zeros(shape, np.float16))
        return np.stack([out[i] for i in ids])

    # -------------------------------------------------------------- history
    def history(self, limit: int = 20) -> list[Query]:
        """The most recent searches, newest first."""
        return self.store.queries(limit)

    def show(self, query_id: int) -> SearchResult:
        """A stored search's results, as they were found (nothing recomputed)."""
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

