"""Durability of a model's vector indexes: checkpoints, reconciliation, rebuilds.

The store is the durable truth and the index files are kept in step with it:

* every vector row in the store keeps its float32 vector, so an index file
  that is missing, cut off or garbled is rebuilt from the store, never
  re-encoded;
* a saved index carries a generation number, its CRC-32 and the library's id
  in a sidecar (``images.generation``), and the store records the generation
  in the same commit as the rows: a clean library opens on that check alone,
  one out of step is reconciled with the vector rows (count and ids), and a
  file of another library is discarded;
* patch-token rows carry a CRC-32 in the store, checked on every read
  (:func:`checksum_token_rows` gives an older library's rows theirs);
* when several folders share one database (PostgreSQL, a folder per machine),
  each generation names the folder that saved it: a folder whose index
  another folder's writer has moved past rebuilds it from the store (vectors
  that changed in place would slip through an id-by-id reconciliation).

A checkpoint is :meth:`IndexFiles.save` (index file first, the sidecar
marked dirty until then), :meth:`IndexFiles.record` (the vector rows, with
the vectors the caller encoded), then the caller's commit. Repairs are
written only when ``writable()`` says this process may write (it holds the
library's writer lock); otherwise only the in-memory index is repaired.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from .index import VectorIndex
from .store import Store
from .tokens import TokenStore, row_crc

LOG = logging.getLogger(__name__)

KINDS = ("images", "texts")


def remove_temp_files(library_dir: Path) -> None:
    """Remove the temp files of saves a crash interrupted (only the writer saves,
    so the writer calls this on taking the lock)."""
    for pattern in ("*.tmp", "models/*/*.tmp", "rerank-features/*/*/*.tmp"):
        for tmp in library_dir.glob(pattern):
            try:
                tmp.unlink()
                LOG.info("removed %s, left by an interrupted save", tmp)
            except OSError:
                pass


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temp file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class IndexFiles:
    """One model's saved image and text indexes in its folder, kept in step with the store.

    ``model()`` returns the model's store row (its id and dimension);
    ``writable()`` is a context manager yielding whether this process may
    write the library now.
    """

    def __init__(self, store: Store, spec: str, folder: Path, model: Callable[[], Any],
                 writable: Callable[[], ContextManager[bool]]) -> None:
        self.store = store
        self.spec = spec
        self.dir = folder
        self._model = model
        self._writable = writable
        #: The store's generation of each index as this process loaded or saved it.
        self.generation: dict[str, str | None] = {}

    def drop_if_weights_changed(self, fingerprint: str | None) -> bool:
        """Drop this model's files and vector rows (tokens and cached query
        vectors with them) when its weights are not the ones they were computed
        with (a local model retrained in place); whether they were dropped.

        The files go first, then one commit drops the rows and records the new
        fingerprint: a crash in between leaves the old fingerprint, so the next
        open drops again.
        """
        if fingerprint is None:
            return False
        store, key = self.store, f"weights:{self.spec}"
        before = store.get_setting(key)
        if before == fingerprint:
            return False
        changed = before is not None and store.find_model(self.spec) is not None
        with self._writable() as ok:
            if not ok:
                if changed:
                    LOG.warning("the weights of model %s changed; its vectors are dropped by the next writing command", self.spec)
                return False
            if changed:
                shutil.rmtree(self.dir, ignore_errors=True)
                store.forget_model(self.spec)
                LOG.warning(
                    "the weights of model %s changed since this library was indexed with it: its vectors were dropped; "
                    "run `crossfind index PATH` (and `add-texts`) again to re-embed with the new weights", self.spec,
                )
            store.set_setting(key, fingerprint)
            store.commit()
            return changed

    # A generation number ties each saved index to the commit that follows it:
    # the sidecar file and the store agree only when both writes completed, so
    # a clean library opens without the full reconciliation scan.
    def saved_generation(self, kind: str) -> str | None:
        """The generation of ``kind``'s index that the store last committed."""
        return self.store.get_setting(f"generation:{self.spec}:{kind}")

    def sidecar(self, kind: str) -> dict[str, Any] | None:
        """What the sidecar of ``kind``'s index says (None: no readable sidecar).

        A sidecar written before the library had an id is plain text (the
        generation, or ``dirty``); it has no ``library`` key.
        """
        try:
            text = (self.dir / f"{kind}.generation").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return {"generation": text} if text and "\n" not in text and len(text) < 64 else None
        return data if isinstance(data, dict) else None

    def mappable(self, kind: str) -> tuple[VectorIndex, str] | None:
        """``kind``'s saved index memory-mapped (nothing read up front) and its
        generation, when its sidecar says it is this library's committed
        generation and it holds the store's count of vectors; else None (then
        :meth:`open`'s full checks, which read the whole file, decide)."""
        path = self.dir / f"{kind}.faiss"
        side = self.sidecar(kind)
        saved = self.saved_generation(kind)
        if not (path.is_file() and side is not None and saved is not None and side.get("generation") == saved
                and side.get("library") == self.store.library_id):
            return None
        model = self._model()
        try:
            mapped = VectorIndex.open(path, model.dim, mmap=True)
        except (RuntimeError, ValueError, OSError):
            return None
        return (mapped, saved) if len(mapped) == self.store.count_vectors(model.id, kind) else None

    # ----------------------------------------------------------------- open
    def open(self, kind: str) -> VectorIndex:
        """Load ``kind``'s index and make sure it holds exactly the store's vectors.

        In step (the sidecar's generation is the store's, its checksum the
        file's, its count the store's): used as is. A file of another library,
        or one that cannot be read: rebuilt from the store's vectors. Otherwise
        (a crash between an index save and its commit): reconciled id by id.
        """
        store = self.store
        model = self._model()
        path = self.dir / f"{kind}.faiss"
        side = self.sidecar(kind)
        saved = self.saved_generation(kind)
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
                index = VectorIndex.from_bytes(data, model.dim)
                if side is not None and side.get("crc32") is not None and side.get("crc32") != zlib.crc32(data):
                    index, why = None, "its checksum does not match"
            except (OSError, ValueError) as exc:
                index, why = None, str(exc)
        elif store.count_vectors(model.id, kind):
            why = "it is missing"
        in_step = (
            index is not None and side is not None and saved is not None and side.get("generation") == saved
            and len(index) == store.count_vectors(model.id, kind)
        )
        if in_step:
            assert index is not None
            self.backfill(kind, index)
        else:
            with self._writable() as ok:
                if index is None:
                    index = self.rebuild(kind, why, ok)
                else:
                    self.reconcile(kind, index, ok)
                    self.backfill(kind, index)
        self.generation[kind] = self.saved_generation(kind)
        return index

    def rebuild(self, kind: str, why: str, write: bool) -> VectorIndex:
        """A new index of the store's durable vectors (``why``: what was wrong with the file)."""
        store = self.store
        model = self._model()
        ids, vecs, empty = store.vectors(model.id, kind)
        index = VectorIndex(model.dim)
        index.add(ids, vecs)
        if why:
            LOG.warning("the %s index of model %s was rebuilt from the library's %d stored vectors: %s",
                        kind, self.spec, len(ids), why)
        if write:
            if empty:
                # Rows of an older library whose vector only the lost file had: encoded again.
                store.delete_vectors(model.id, kind, empty)
            self.save(kind, index)
            store.commit()
        return index

    def backfill(self, kind: str, index: VectorIndex) -> None:
        """Give the vector rows of an older library their vectors, read from its index."""
        model_id = self._model().id
        if not self.store.vectorless_ids(model_id, kind):
            return
        with self._writable() as ok:
            if not ok:
                return
            empty = self.store.vectorless_ids(model_id, kind)
            have = set(index.ids().tolist())
            fill = [i for i in empty if i in have]
            gone = [i for i in empty if i not in have]
            for start in range(0, len(fill), 4096):
                part = fill[start : start + 4096]
                self.store.fill_vectors(model_id, kind, part, index.reconstruct(part))
            if gone:
                self.store.delete_vectors(model_id, kind, gone)
            self.store.commit()
            LOG.info("stored %d %s vectors of model %s in the library database", len(fill), kind, self.spec)

    def reconcile(self, kind: str, index: VectorIndex, write: bool = True) -> None:
        """Make ``kind``'s index and its vector rows agree after a crash.

        Vectors the index lacks are put back from the store (rows of an older
        library that have no stored vector are dropped: their items are encoded
        again). Vectors without a row were saved after the last commit: those
        of items that still exist (their row was committed before encoding) are
        adopted, the rest removed from the index. Without ``write`` only the
        in-memory index is repaired (another process is writing).
        """
        store = self.store
        model_id = self._model().id
        in_index = set(index.ids().tolist())
        rows = store.vector_map(model_id, kind)
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
                store.delete_vectors(model_id, kind, lost)
        drop: list[int] = []
        if orphans:
            live = store.vector_sources(kind, orphans)
            keep = [i for i in orphans if i in live]
            drop = [i for i in orphans if i not in live]
            if keep and write:
                adopted = [(i, live[i], False) if kind == "images" else (i, live[i]) for i in keep]
                self.record(kind, adopted, index.reconstruct(keep))
            elif keep:
                drop += keep  # not committed yet: not searchable for this reader
        if drop:
            index.remove(drop)
            changed = True
        if not write:
            return
        if changed:
            self.save(kind, index)
        else:
            self.mark_in_step(kind, index)
        store.commit()
        if missing or orphans:
            LOG.info("reconciled %s %s index: %d vectors put back from the store, %d orphans",
                     self.spec, kind, len(missing), len(orphans))

    # ---------------------------------------------------------- checkpoints
    def record(self, kind: str, rows: Sequence[tuple[Any, ...]], vectors: np.ndarray,
               token_crcs: dict[int, int] | None = None) -> None:
        """Record vector rows with their vectors (``vectors[j]`` for ``rows[j]``):
        (image id, content hash, has tokens) with the token rows' checksums, or
        (text id, content hash). The caller commits, after :meth:`save`."""
        if not rows:
            return
        model_id = self._model().id
        if kind == "images":
            self.store.set_image_vectors(model_id, rows, vectors, token_crcs)  # type: ignore[arg-type]
        else:
            self.store.set_text_vectors(model_id, rows, vectors)  # type: ignore[arg-type]

    def save(self, kind: str, index: VectorIndex) -> None:
        """Save an index atomically; the caller commits the store right after."""
        self.write_config()
        self._write_sidecar(kind, "dirty", None)  # a crash before the commit forces reconciliation
        crc = index.save(self.dir / f"{kind}.faiss")
        self._set_generation(kind, crc)

    def mark_in_step(self, kind: str, index: VectorIndex) -> None:
        """Record the file on disk as in step (its content is ``index``'s)."""
        path = self.dir / f"{kind}.faiss"
        if not path.exists():
            self.save(kind, index)
            return
        self._set_generation(kind, zlib.crc32(path.read_bytes()))

    def write_config(self) -> None:
        """``model.json``: what the indexes in this folder hold, for a reader of the files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        model = self._model()
        cfg = {"spec": self.spec, "dim": model.dim, "metric": "inner_product", "normalised": True,
               "library": self.store.library_id}
        write_atomic(self.dir / "model.json", json.dumps(cfg, indent=2) + "\n")

    def _write_sidecar(self, kind: str, generation: str, crc: int | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        side = {"library": self.store.library_id, "generation": generation, "crc32": crc}
        write_atomic(self.dir / f"{kind}.generation", json.dumps(side) + "\n")

    def _set_generation(self, kind: str, crc: int) -> None:
        generation = str(time.time_ns())
        if self.store.folder_id:  # a database shared by folders: say which one saved it
            generation += "@" + self.store.folder_id
        self._write_sidecar(kind, generation, crc)
        self.store.set_setting(f"generation:{self.spec}:{kind}", generation)  # committed by the caller
        self.generation[kind] = generation


class Pending:
    """Vector rows encoded since the last checkpoint, with their vectors, in
    order, and what decoding found for the image rows since then."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self._vectors: list[np.ndarray] = []
        self.facts: list[tuple[Any, ...]] = []  # image rows' decoding outcomes, for Store.set_image_facts

    def add(self, rows: Sequence[tuple[Any, ...]], vectors: np.ndarray) -> None:
        """Add rows (as :meth:`IndexFiles.record` takes them) and their vectors."""
        self.rows.extend(rows)
        self._vectors.append(np.asarray(vectors, np.float32))

    def vectors(self) -> np.ndarray:
        """The vectors of :attr:`rows`, one per row."""
        return np.concatenate(self._vectors) if self._vectors else np.empty((0, 0), np.float32)


def checksum_token_rows(store: Store, model_id: int, tokens: TokenStore) -> int:
    """Give the token rows of an older library (no CRC yet) their CRC-32;
    rows already unusable (cut off: zeros, or not finite) are marked missing.
    Returns how many rows were looked at; commits when there were any."""
    ids = store.tokens_without_crc(model_id)
    if not ids:
        return 0
    crcs: dict[int, int | None] = {}
    for start in range(0, len(ids), 1024):
        part = ids[start : start + 1024]
        for i, row in zip(part, tokens.read(part)):
            usable = bool(np.isfinite(row).all()) and bool(np.any(row))
            crcs[i] = row_crc(row) if usable else None
    store.set_tokens(model_id, crcs)
    store.commit()
    return len(ids)
