"""Per-model resources of a library and their durability.

A :class:`ModelSlot` holds what one model needs in one library, each part
loaded on first use: the encoder, the image and text vector indexes, the
patch-token store and the reranker. It also keeps those files in step with the
store, which is the durable truth:

* every vector row in the store keeps its float32 vector, so an index file
  that is missing, cut off or garbled is rebuilt from the store, never
  re-encoded;
* a saved index carries a generation number, its CRC-32 and the library's id
  in a sidecar (``images.generation``), and the store records the generation
  in the same commit as the rows: a clean library opens on that check alone,
  one out of step is reconciled with the vector rows (count and ids), and a
  file of another library is discarded;
* patch-token rows carry a CRC-32 in the store, checked on every read;
* when several folders share one database (PostgreSQL, a folder per machine),
  each generation names the folder that saved it: a folder whose index
  another folder's writer has moved past rebuilds it from the store (vectors
  that changed in place would slip through an id-by-id reconciliation), and
  its token rows are checked by their CRC-32 as always.

Repairs are written only while this process holds the library's writer lock
(:mod:`retrieval.lock`); a reader that finds something to repair while another
process writes repairs its in-memory copy only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .encoders import Encoder, ModelSpec, load_encoder, weights_fingerprint
from .index import VectorIndex
from .index.compressed import CompressedIndex
from .lock import WriterLock
from .onnx_runtime import OnnxEncoder, OnnxReranker, export_key, find_export, onnx_enabled
from .store import Store
from .tokens import TokenStore, row_crc

LOG = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ModelSlot:
    """What one model needs in this library, loaded lazily: its encoder, its
    image and text indexes, its patch-token store and its reranker; and the
    durability of those files (reconciliation with the store, checkpoints)."""

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
        self._generation: dict[str, str | None] = {}  # the store's generation of each index as loaded
        self.library_dir = library_dir
        self.dir = library_dir / "models" / spec.slug
        self.weights_changed = self._check_weights()

    def _check_weights(self) -> bool:
        """Drop this model's vectors, tokens and cached query vectors when its
        weights are not the ones they were computed with (a local model
        retrained in place); whether they were dropped.

        The files go first, then one commit drops the rows and records the new
        fingerprint: a crash in between leaves the old fingerprint, so the next
        open drops again.
        """
        now = self._fingerprint = weights_fingerprint(self.spec)
        if now is None:
            return False
        store, key = self.store, f"weights:{self.spec.spec}"
        before = store.get_setting(key)
        if before == now:
            return False
        changed = before is not None and store.find_model(self.spec.spec) is not None
        with self._writable() as ok:
            if not ok:
                if changed:
                    LOG.warning("the weights of model %s changed; its vectors are dropped by the next writing command", self.spec.spec)
                return False
            return self._forget_if(changed, key, now)

    def _forget_if(self, changed: bool, key: str, now: str) -> bool:
        store = self.store
        if changed:
            shutil.rmtree(self.dir, ignore_errors=True)
            store.forget_model(self.spec.spec)
            LOG.warning(
                "the weights of model %s changed since this library was indexed with it: its vectors were dropped; "
                "run `crossfind index PATH` (and `add-texts`) again to re-embed with the new weights", self.spec.spec,
            )
        store.set_setting(key, now)
        store.commit()
        return changed

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
        key = export_key(self.spec, self._fingerprint)
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

            return export_model(self.encoder, self.library_dir, key, reranker=self._torch_reranker())
        except Exception as exc:  # any exporter failure: torch keeps working
            try:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(exc).__name__}: {exc}\n")
            except OSError:
                pass  # then it is tried (and said) again next time
            LOG.warning("could not export %s to ONNX (%s); searches use torch (slower to start). "
                        "Delete %s to try again.", self.spec.spec, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__, failed)
            return None

    def runtime(self, part: str) -> Any:
        """What encodes ``part`` (``text`` or ``image``) here: the ONNX export
        when it holds that part (and, for images, the reranker's patch tokens),
        else the torch encoder."""
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
        fast = self.onnx
        return self.store.model(self.spec.spec, fast.dim if fast is not None else self.encoder.dim)

    @property
    def dim(self) -> int:
        return self.row.dim

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = {"spec": self.spec.spec, "dim": self.dim, "metric": "inner_product", "normalised": True,
               "library": self.store.library_id}
        _write_atomic(self.dir / "model.json", json.dumps(cfg, indent=2) + "\n")

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
        """Open ``kind``'s writable index (replacing a mapped one) and remember its generation."""
        self._mapped.pop(kind, None)
        index = self._open(kind)
        self._generation[kind] = self.store.get_setting(self._generation_key(kind))
        return index

    def _loaded(self, kind: str) -> VectorIndex | None:
        return self._images if kind == "images" else self._texts

    def search_index(self, kind: str) -> VectorIndex | CompressedIndex:
        """The index to search: the writable one when this process has it open,
        else the compressed index of ``--index-memory`` (:mod:`retrieval.scale`)
        when one was built from the committed generation, else the saved file
        memory-mapped (nothing read up front), when it is in
        step with the store (this library's, the committed generation, the
        store's count; the full checks of :meth:`_open` read the whole file, so
        anything else takes that path)."""
        if self._loaded(kind) is None and kind not in self._mapped:
            from .scale import open_scaled

            scaled = open_scaled(self, kind)
            if scaled is not None:
                self._mapped[kind] = scaled
                self._mapped_generation[kind] = self.store.get_setting(self._generation_key(kind))
        if self._loaded(kind) is None and kind not in self._mapped:
            path = self.dir / f"{kind}.faiss"
            side = self._sidecar(kind)
            saved = self.store.get_setting(self._generation_key(kind))
            if (
                path.is_file() and side is not None and saved is not None and side.get("generation") == saved
                and side.get("library") == self.store.library_id
            ):
                try:
                    mapped: VectorIndex | None = VectorIndex.open(path, self.dim, mmap=True)
                except (RuntimeError, ValueError, OSError):
                    mapped = None
                if mapped is not None and len(mapped) == self.store.count_vectors(self.row.id, kind):
                    self._mapped[kind] = mapped
                    self._mapped_generation[kind] = saved
        if self._loaded(kind) is None and kind in self._mapped:
            return self._mapped[kind]
        return self.images if kind == "images" else self.texts

    def drop_if_stale(self) -> None:
        """Forget indexes (loaded or memory-mapped) that another process saved
        since they were opened here; they reload on use. Called when this
        process takes the writer lock, and by a long-lived reader before a search."""
        for kind in ("images", "texts"):
            now = self.store.get_setting(self._generation_key(kind))
            if kind in self._mapped and self._mapped_generation.get(kind) != now:
                del self._mapped[kind]
            if kind == "images" and self._images is not None and now != self._generation.get(kind):
                self._images = None
                self.close()  # the token store too: its rows' checksums are re-read from the store
            if kind == "texts" and self._texts is not None and now != self._generation.get(kind):
                self._texts = None

    @property
    def reranker(self) -> Any:
        """The reranker trained for this model, or None: its ONNX export when the
        model runs on ONNX Runtime, else the torch module."""
        if self._reranker is False:
            from .rerank_files import reranker_dir

            if reranker_dir(self.spec) is None:  # decided without loading torch
                self._reranker = None
            elif self.onnx is not None and self.onnx.manifest.get("reranker"):
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
    def _torch_reranker(self) -> Any:
        from .rerank_files import reranker_dir

        where = reranker_dir(self.spec)
        if where is None:
            return None
        from .rerank import Reranker

        # The encoder only when the reranker needs it: a query asked
        # before is re-scored from its kept tokens without it.
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
                self._check_token_crcs(self._tokens)
        return self._tokens

    def _check_token_crcs(self, tokens: TokenStore) -> None:
        """Give the token rows of an older library (no CRC yet) their CRC-32;
        rows already unusable (cut off: zeros, or not finite) are marked missing."""
        model_id = self.row.id
        from sqlalchemy import select

        from .store import ImageVector

        q = select(ImageVector.image_id).where(
            ImageVector.model_id == model_id, ImageVector.has_tokens.is_(True), ImageVector.token_crc.is_(None)
        )
        ids = list(self.store.session.scalars(q))
        if not ids:
            return
        crcs: dict[int, int | None] = {}
        for start in range(0, len(ids), 1024):
            part = ids[start : start + 1024]
            for i, row in zip(part, tokens.read(part)):
                usable = bool(np.isfinite(row).all()) and bool(np.any(row))
                crcs[i] = row_crc(row) if usable else None
        self.store.set_tokens(model_id, crcs)
        self.store.commit()
        LOG.info("gave %d token rows of model %s their checksum", len(ids), self.spec.spec)

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

    # ------------------------------------------------------- record vectors
    def record_images(self, rows: Sequence[tuple[int, str, bool]]) -> None:
        """Record vector rows (image id, content hash, has tokens) for vectors
        already in the image index, with the vectors themselves and their token
        rows' checksums; the caller commits (after :meth:`save_images`)."""
        if not rows:
            return
        ids = [r[0] for r in rows]
        crcs = self._tokens.take_crcs(ids) if self._tokens is not None else {}
        self.store.set_image_vectors(self.row.id, rows, self.images.reconstruct(ids), crcs)

    def record_texts(self, rows: Sequence[tuple[int, str]]) -> None:
        """Record vector rows (text id, content hash) for vectors already in the text index."""
        if not rows:
            return
        self.store.set_text_vectors(self.row.id, rows, self.texts.reconstruct([r[0] for r in rows]))

    # -------------------------------------------------------------- open
    def _sidecar(self, kind: str) -> dict[str, Any] | None:
        """What the sidecar of ``kind``'s index says (None: no readable sidecar).

        A sidecar written before the library had an id is plain text (the
        generation, or ``dirty``); it has no ``library`` key.
        """
        path = self.dir / f"{kind}.generation"
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return {"generation": text} if text and "\n" not in text and len(text) < 64 else None
        return data if isinstance(data, dict) else None

    def _open(self, kind: str) -> VectorIndex:
        """Load ``kind``'s index and make sure it holds exactly the store's vectors.

        In step (the sidecar's generation is the store's, its checksum the
        file's, its count the store's): used as is. A file of another library,
        or one that cannot be read: rebuilt from the store's vectors. Otherwise
        (a crash between an index save and its commit): reconciled id by id.
        """
        import zlib

        store = self.store
        model_id = self.row.id
        dim = self.dim
        path = self.dir / f"{kind}.faiss"
        side = self._sidecar(kind)
        saved = store.get_setting(self._generation_key(kind))
        library = store.library_id
        foreign = side is not None and side.get("library", library) != library
        elsewhere = saved is not None and saved.partition("@")[2] != store.folder_id
        # A file from before library ids is trusted only when this store knows its model's index.
        foreign = foreign or (side is not None and "library" not in side and saved is None)
        index: VectorIndex | None = None
        why = ""
        if foreign:
            why = "it belongs to another library"
        elif elsewhere:
            why = "another folder sharing the library's database saved a newer one"
        elif path.exists():
            try:
                data = path.read_bytes()
                index = VectorIndex.from_bytes(data, dim)
                if side is not None and side.get("crc32") is not None and side.get("crc32") != zlib.crc32(data):
                    index, why = None, "its checksum does not match"
            except (OSError, ValueError) as exc:
                index, why = None, str(exc)
        elif store.count_vectors(model_id, kind):
            why = "it is missing"
        in_step = (
            index is not None and side is not None and saved is not None and side.get("generation") == saved
            and len(index) == store.count_vectors(model_id, kind)
        )
        if in_step:
            assert index is not None
            self._backfill(kind, index)
            return index
        with self._writable() as ok:
            if index is None:
                index = self._rebuild(kind, why, ok)
            else:
                if kind == "images":
                    self._reconcile_images(index, ok)
                else:
                    self._reconcile_texts(index, ok)
                self._backfill(kind, index)
        return index

    def _rebuild(self, kind: str, why: str, write: bool) -> VectorIndex:
        """A new index of the store's durable vectors (``why``: what was wrong with the file)."""
        store = self.store
        ids, vecs, empty = store.vectors(self.row.id, kind)
        index = VectorIndex(self.dim)
        index.add(ids, vecs)
        if why:
            LOG.warning("the %s index of model %s was rebuilt from the library's %d stored vectors: %s",
                        kind, self.spec.spec, len(ids), why)
        if write:
            if empty:
                # Rows of an older library whose vector only the lost file had: encoded again.
                self._delete_rows(kind, empty)
            self._save(kind, index)
            store.commit()
        return index

    def _delete_rows(self, kind: str, ids: list[int]) -> None:
        if kind == "images":
            self.store.delete_image_vectors(self.row.id, ids)
        else:
            self.store.delete_text_vectors(self.row.id, ids)

    def _backfill(self, kind: str, index: VectorIndex) -> None:
        """Give the vector rows of an older library their vectors, read from its index."""
        from sqlalchemy import func, select

        from .store import ImageVector, TextVector

        table: Any = ImageVector if kind == "images" else TextVector
        item = table.image_id if kind == "images" else table.text_id
        q = select(func.count()).select_from(table).where(table.model_id == self.row.id, table.vector.is_(None))
        if not self.store.session.scalar(q):
            return
        with self._writable() as ok:
            if not ok:
                return
            empty = list(self.store.session.scalars(select(item).where(table.model_id == self.row.id, table.vector.is_(None))))
            have = set(index.ids().tolist())
            fill = [i for i in empty if i in have]
            gone = [i for i in empty if i not in have]
            for start in range(0, len(fill), 4096):
                part = fill[start : start + 4096]
                self.store.fill_vectors(self.row.id, kind, part, index.reconstruct(part))
            if gone:
                self._delete_rows(kind, gone)
            self.store.commit()
            LOG.info("stored %d %s vectors of model %s in the library database", len(fill), kind, self.spec.spec)

    # ------------------------------------------------------------ reconcile
    def _reconcile_images(self, index: VectorIndex, write: bool = True) -> None:
        store = self.store
        self._reconcile(
            "images", index, write, store.image_vector_map, store.images_by_id,
            # Only images that still load count: a failed row keeps no vector.
            lambda row: row.status == "ok",
            lambda keep: self.store.set_image_vectors(
                self.row.id, [(i, h, False) for i, h in keep], index.reconstruct([i for i, _ in keep])
            ),
        )

    def _reconcile_texts(self, index: VectorIndex, write: bool = True) -> None:
        store = self.store
        self._reconcile(
            "texts", index, write, store.text_vector_map, store.texts_by_id,
            lambda row: True,
            lambda keep: self.store.set_text_vectors(self.row.id, keep, index.reconstruct([i for i, _ in keep])),
        )

    def _reconcile(
        self,
        kind: str,
        index: VectorIndex,
        write: bool,
        vector_map: Callable[[int], dict[int, Any]],
        rows_by_id: Callable[[list[int]], dict[int, Any]],
        usable: Callable[[Any], bool],
        adopt: Callable[[list[tuple[int, str]]], None],
    ) -> None:
        """Make one index and its vector rows agree after a crash.

        Vectors the index lacks are put back from the store (rows of an older
        library that have no stored vector are dropped: their items are encoded
        again). Vectors without a row were saved after the last commit: those
        of items that still exist (their row was committed before encoding) are
        adopted, the rest removed from the index. Without ``write`` only the
        in-memory index is repaired (another process is writing).
        """
        store = self.store
        model_id = self.row.id
        in_index = set(index.ids().tolist())
        rows = vector_map(model_id)
        missing = [i for i in rows if i not in in_index]  # row says vector, index lacks it
        orphans = [i for i in in_index if i not in rows]  # vector without a row
        changed = False
        if missing:
            ids, vecs, empty = store.vectors(model_id, kind)
            want = set(missing)
            sel = [j for j, i in enumerate(ids.tolist()) if i in want]
            if sel:
                index.add(ids[sel], vecs[sel])
                changed = True
            lost = [i for i in empty if i in want]
            if lost and write:
                self._delete_rows(kind, lost)
        drop: list[int] = []
        if orphans:
            live = rows_by_id(orphans)
            keep = [(i, live[i].content_hash) for i in orphans if i in live and usable(live[i])]
            drop = [i for i in orphans if i not in live or not usable(live[i])]
            if keep and write:
                adopt(keep)
            elif keep:
                drop += [i for i, _ in keep]  # not committed yet: not searchable for this reader
        if drop:
            index.remove(drop)
            changed = True
        if not write:
            return
        if changed:
            self._save(kind, index)
        else:
            self._mark_in_step(kind, index)
        store.commit()
        if missing or orphans:
            LOG.info("reconciled %s %s index: %d vectors put back from the store, %d orphans",
                     self.spec.spec, kind, len(missing), len(orphans))

    # A generation number ties each saved index to the commit that follows it:
    # the sidecar file and the store agree only when both writes completed, so
    # a clean library opens without the full reconciliation scan.
    def _generation_key(self, kind: str) -> str:
        return f"generation:{self.spec.spec}:{kind}"

    def _write_sidecar(self, kind: str, generation: str, crc: int | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        side = {"library": self.store.library_id, "generation": generation, "crc32": crc}
        _write_atomic(self.dir / f"{kind}.generation", json.dumps(side) + "\n")

    def _save(self, kind: str, index: VectorIndex) -> None:
        """Save an index atomically; the caller commits the store right after."""
        self._write_config()
        self._write_sidecar(kind, "dirty", None)  # a crash before the commit forces reconciliation
        crc = index.save(self.dir / f"{kind}.faiss")
        self._set_generation(kind, crc)

    def _mark_in_step(self, kind: str, index: VectorIndex) -> None:
        """Record the file on disk as in step (its content is ``index``'s)."""
        import zlib

        path = self.dir / f"{kind}.faiss"
        if not path.exists():
            self._save(kind, index)
            return
        self._set_generation(kind, zlib.crc32(path.read_bytes()))

    def _set_generation(self, kind: str, crc: int) -> None:
        generation = str(time.time_ns())
        if self.store.folder_id:  # a database shared by folders: say which one saved it
            generation += "@" + self.store.folder_id
        self._write_sidecar(kind, generation, crc)
        self.store.set_setting(self._generation_key(kind), generation)  # committed by the caller
        self._generation[kind] = generation

    def save_images(self) -> None:
        if self._tokens is not None:
            self._tokens.flush()
        self._save("images", self.images)

    def save_texts(self) -> None:
        self._save("texts", self.texts)

    def reset(self) -> None:
        """Forget what is loaded (after a failed write): reloaded from disk on next use."""
        self.close()
        self._images = None
        self._texts = None

    def close(self) -> None:
        if self._tokens is not None:
            self._tokens.close()
            self._tokens = None
