"""Per-model resources of a library.

A :class:`ModelSlot` holds what one model needs in one library, each part
loaded on first use: the encoder (or its ONNX export), the image and text
vector indexes, the patch-token store and the reranker. The index files are
kept in step with the store by :class:`~retrieval.durability.IndexFiles`
(checkpoints, reconciliation after a crash, rebuilds from stored vectors).

Repairs are written only while this process holds the library's writer lock
(:mod:`retrieval.lock`); a reader that finds something to repair while another
process writes repairs its in-memory copy only.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .durability import IndexFiles, checksum_token_rows
from .encoders import Encoder, ModelSpec, load_encoder, weights_fingerprint
from .index import VectorIndex
from .index.compressed import CompressedIndex
from .lock import WriterLock
from .onnx_runtime import OnnxEncoder, OnnxReranker, export_key, find_export, gpu_visible, onnx_enabled
from .store import Store
from .tokens import TokenStore

LOG = logging.getLogger(__name__)


class ModelSlot:
    """What one model needs in this library, loaded lazily: its encoder, its
    image and text indexes, its patch-token store and its reranker."""

    def __init__(
        self,
        store: Store,
        library_dir: Path,
        spec: ModelSpec,
        device: str | None = None,
        encoder: Encoder | None = None,
        lock: WriterLock | None = None,
    ) -> None:
        self.store = store
        self.lock = lock if lock is not None else WriterLock(library_dir)
        self.device = device
        self.spec = spec
        self._encoder = encoder
        self._injected = encoder is not None  # an encoder handed in is used for everything
        self._onnx: Any = False  # False: not looked up yet; None: torch is used
        self._images: VectorIndex | None = None
        self._mapped: dict[str, VectorIndex | CompressedIndex] = {}  # memory-mapped indexes, for searching only
        self._mapped_generation: dict[str, str | None] = {}  # the store's generation of each mapped index
        self._texts: VectorIndex | None = None
        self._tokens: TokenStore | None = None
        self._reranker: Any = False  # False: not looked up yet
        self.library_dir = library_dir
        self.dir = library_dir / "models" / spec.slug
        self.files = IndexFiles(store, spec.spec, self.dir, lambda: self.row, self._writable)
        self.fingerprint = weights_fingerprint(spec)
        self.weights_changed = self.files.drop_if_weights_changed(self.fingerprint)

    # ------------------------------------------------------------ lazy parts
    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.spec, device=self.device)
        return self._encoder

    @property
    def onnx(self) -> OnnxEncoder | None:
        """The model's ONNX exports on ONNX Runtime, or None when torch is used
        (see :mod:`retrieval.onnx_runtime`). A missing export is made now, once
        per weights (this loads torch); one that cannot be made is said once,
        and torch serves from then on."""
        if self._onnx is False:
            self._onnx = None if self._injected or not onnx_enabled(self.device) else self._open_onnx()
        return self._onnx

    @property
    def onnx_loaded(self) -> OnnxEncoder | None:
        """:attr:`onnx` when it has been opened already (never exports or loads)."""
        return self._onnx or None

    def _open_onnx(self) -> OnnxEncoder | None:
        key = export_key(self.spec, self.fingerprint)
        where = find_export(self.library_dir, self.spec, key)
        failed = self.dir / f"onnx-{key}.failed"  # beside, not inside, the export: its folder may be what fails
        if where is None and not failed.is_file():
            where = self._export(key, failed)
        if where is None:
            return None
        try:
            return OnnxEncoder(where, self.spec)
        except (OSError, ValueError, KeyError) as exc:
            LOG.warning("cannot read the ONNX export of %s (%s); using torch", self.spec.spec, exc)
            return None

    def _export(self, key: str, failed: Path) -> Path | None:
        LOG.info("exporting %s to ONNX for torch-free searches (once per model and weights)", self.spec.spec)
        try:
            from .onnx_export import export_model

            # ONNX Runtime runs the export on the CPU: made from a CPU copy when the encoder is on a GPU
            enc = self._encoder if self._encoder is not None else (None if self._images_on_gpu else self.encoder)
            if enc is None or enc.device != "cpu":
                enc = load_encoder(self.spec, device="cpu")
            return export_model(enc, self.library_dir, key, reranker=self._torch_reranker(enc))
        except Exception as exc:  # any exporter failure: torch keeps working
            try:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(exc).__name__}: {exc}\n")
            except OSError:
                pass  # then it is tried (and said) again next time
            LOG.warning("could not export %s to ONNX (%s); searches use torch (slower to start). "
                        "Delete %s to try again.", self.spec.spec, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__, failed)
            return None

    @property
    def _images_on_gpu(self) -> bool:
        return (self.device is None and gpu_visible()) or str(self.device or "").startswith("cuda")

    def runtime(self, part: str) -> Any:
        """What encodes ``part`` (``text`` or ``image``) here: the ONNX export
        when it holds that part (and, for images, the reranker's patch tokens),
        else the torch encoder; images go to torch (on the GPU) when no device was named and a GPU is visible."""
        if part == "image" and self.device is None and gpu_visible():
            return self.encoder
        fast = self.onnx
        if fast is not None:
            if part == "text":
                return fast
            if fast.has_image and (self.reranker is None or fast.tokens_layer == self.token_layer):
                return fast
        return self.encoder

    @property
    def row(self):
        """The model's store row (created on first use, which loads the encoder)."""
        found = self.store.find_model(self.spec.spec)
        if found is not None:
            return found
        # A GPU index run does not stop to export (for searches on the CPU): the first such search does.
        fast = self.onnx if not self._images_on_gpu else self.onnx_loaded
        return self.store.model(self.spec.spec, fast.dim if fast is not None else self.encoder.dim)

    @property
    def dim(self) -> int:
        return self.row.dim

    @property
    def images(self) -> VectorIndex:
        if self._images is None:
            self._images = self._load("images")
        return self._images

    @property
    def texts(self) -> VectorIndex:
        if self._texts is None:
            self._texts = self._load("texts")
        return self._texts

    def _load(self, kind: str) -> VectorIndex:
        """Open ``kind``'s writable index (replacing a mapped one)."""
        self._mapped.pop(kind, None)
        return self.files.open(kind)

    def _loaded(self, kind: str) -> VectorIndex | None:
        return self._images if kind == "images" else self._texts

    def search_index(self, kind: str) -> VectorIndex | CompressedIndex:
        """The index to search: the writable one when this process has it open,
        else the compressed index of ``--index-memory`` (:mod:`retrieval.scale`)
        when one was built from the committed generation, else the saved file
        memory-mapped when it is in step with the store (see
        :meth:`IndexFiles.mappable`), else the writable one loaded now."""
        if self._loaded(kind) is None and kind not in self._mapped:
            from .scale import open_scaled

            scaled = open_scaled(self, kind)
            if scaled is not None:
                self._mapped[kind] = scaled
                self._mapped_generation[kind] = self.files.saved_generation(kind)
        if self._loaded(kind) is None and kind not in self._mapped:
            found = self.files.mappable(kind)
            if found is not None:
                self._mapped[kind], self._mapped_generation[kind] = found
        if self._loaded(kind) is None and kind in self._mapped:
            return self._mapped[kind]
        return self.images if kind == "images" else self.texts

    def drop_if_stale(self) -> None:
        """Forget indexes (loaded or memory-mapped) that another process saved
        since they were opened here; they reload on use. Called when this
        process takes the writer lock, and by a long-lived reader before a search."""
        for kind in ("images", "texts"):
            now = self.files.saved_generation(kind)
            if kind in self._mapped and self._mapped_generation.get(kind) != now:
                del self._mapped[kind]
            if kind == "images" and self._images is not None and now != self.files.generation.get(kind):
                self._images = None
                self.close()  # the token store too: its rows' checksums are re-read from the store
            if kind == "texts" and self._texts is not None and now != self.files.generation.get(kind):
                self._texts = None

    @property
    def reranker(self) -> Any:
        """The reranker trained for this model, or None: its ONNX export when the
        model runs on ONNX Runtime, else the torch module."""
        if self._reranker is False:
            from .rerank_files import reranker_dir

            if reranker_dir(self.spec) is None:  # decided without loading torch
                self._reranker = None
            elif self.onnx is not None and self.onnx.manifest.get("reranker_cross"):
                self._reranker = OnnxReranker(self.onnx)
            else:
                self._reranker = self._torch_reranker()
        return self._reranker

    @contextmanager
    def _writable(self) -> Iterator[bool]:
        """Whether this process may write the library's files now: it holds the
        writer lock, or takes it for the block when no other writer has it."""
        if self.store.read_only:
            yield False
            return
        if self.lock.held:
            yield True
            return
        if not self.lock.try_acquire():
            yield False
            return
        try:
            yield True
        finally:
            self.lock.release()

    def _torch_reranker(self, encoder: Any = None) -> Any:
        from .rerank_files import reranker_dir

        where = reranker_dir(self.spec)
        if where is None:
            return None
        from .rerank import Reranker

        # The encoder only when the reranker needs it: a query asked
        # before is re-scored from its kept tokens without it.
        if encoder is None:
            encoder = self._encoder if self._encoder is not None else (lambda: self.encoder)
        return Reranker.load(where, encoder, model=self.spec.spec)

    @property
    def tokens(self) -> TokenStore | None:
        """The patch-token store, when this model has a reranker."""
        if self._tokens is None and self.reranker is not None and (self._encoder is None or self._encoder.has_tokens):
            cfg = self.reranker.config  # checked against the encoder when the reranker binds it
            shape = (cfg.image_tokens, cfg.image_features)
            path = self.dir / "tokens.f16"
            library = self.store.library_id
            with self._writable() as ok:
                if not ok:
                    self._tokens = TokenStore(path, shape, layer=self.token_layer, library=library, read_only=True)
                    return self._tokens
                if not TokenStore.holds(path, shape, self.token_layer, library):
                    # Rows of another layer, shape or library are about to go: invalid first, re-encoded on use.
                    self.store.clear_tokens(self.row.id)
                    self.store.commit()
                self._tokens = TokenStore(path, shape, layer=self.token_layer, library=library)
                n = checksum_token_rows(self.store, self.row.id, self._tokens)
                if n:
                    LOG.info("gave %d token rows of model %s their checksum", n, self.spec.spec)
        return self._tokens

    def read_tokens(self, ids: Sequence[int]) -> tuple[dict[int, np.ndarray], list[int]]:
        """Stored token rows of ``ids`` that pass their checksum, and the ids to
        encode again (never stored, or damaged on disk)."""
        tokens = self.tokens
        if tokens is None:
            return {}, list(ids)
        crcs = self.store.token_crcs(self.row.id, ids)
        good, bad = tokens.verify([i for i in ids if i in crcs], crcs)
        damaged = [i for i in bad if crcs.get(i) is not None]
        if damaged:
            LOG.warning("%d stored token rows of model %s are damaged; they are encoded again", len(damaged), self.spec.spec)
        return good, [i for i in ids if i not in good]

    def store_tokens(self, ids: Sequence[int], toks: np.ndarray) -> None:
        """Keep token rows encoded for a search (skipped when another process writes)."""
        tokens = self.tokens
        if tokens is None or tokens.read_only or not len(ids):
            return
        with self._writable() as ok:
            if not ok:
                return
            tokens.write(ids, toks)
            tokens.flush()
            self.store.set_tokens(self.row.id, dict(tokens.take_crcs(ids)))
            self.store.commit()

    @property
    def token_layer(self) -> str:
        """The vision-tower layer whose patch tokens this model's reranker reads."""
        return self.reranker.config.image_layer if self.reranker is not None else "final"

    # ---------------------------------------------------------- checkpoints
    def record_images(self, rows: Sequence[tuple[int, str, bool]], vectors: np.ndarray) -> None:
        """Record vector rows (image id, content hash, has tokens) with their
        vectors (``vectors[j]`` for ``rows[j]``, as added to the image index) and
        their token rows' checksums; the caller commits (after :meth:`save_images`)."""
        crcs = self._tokens.take_crcs([r[0] for r in rows]) if self._tokens is not None and rows else {}
        self.files.record("images", rows, vectors, crcs)

    def record_texts(self, rows: Sequence[tuple[int, str]], vectors: np.ndarray) -> None:
        """Record vector rows (text id, content hash) with their vectors."""
        self.files.record("texts", rows, vectors)

    def save(self, kind: str) -> None:
        """Save ``kind``'s index (and, for images, flush the token store)
        atomically; the caller records rows and commits right after."""
        if kind == "images" and self._tokens is not None:
            self._tokens.flush()
        self.files.save(kind, self.images if kind == "images" else self.texts)

    def save_images(self) -> None:
        self.save("images")

    def save_texts(self) -> None:
        self.save("texts")

    def reset(self) -> None:
        """Forget what is loaded (after a failed write): reloaded from disk on next use."""
        self.close()
        self._images = None
        self._texts = None

    def close(self) -> None:
        if self._tokens is not None:
            self._tokens.close()
            self._tokens = None
