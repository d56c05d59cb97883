"""Per-model resources of a library and their durability.

A :class:`ModelSlot` holds what one model needs in one library, each part
loaded on first use: the encoder, the image and text vector indexes, the
patch-token store and the reranker. It also keeps those files in step with the
store: a saved index carries a generation number that the store records in the
same commit, and an index that is out of step is reconciled with the vector
rows on load, so a crash loses at most the work since the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .encoders import Encoder, ModelSpec, load_encoder, weights_fingerprint
from .index import VectorIndex
from .onnx_runtime import OnnxEncoder, OnnxReranker, export_key, find_export, onnx_enabled
from .store import Store
from .tokens import TokenStore

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
        self, store: Store, library_dir: Path, spec: ModelSpec, device: str | None = None, encoder: Encoder | None = None
    ) -> None:
        self.store = store
        self.device = device
        self.spec = spec
        self._encoder = encoder
        self._injected = encoder is not None  # an encoder handed in is used for everything
        self._onnx: Any = False  # False: not looked up yet; None: torch is used
        self._images: VectorIndex | None = None
        self._mapped: dict[str, VectorIndex] = {}  # memory-mapped indexes, for searching only
        self._texts: VectorIndex | None = None
        self._tokens: TokenStore | None = None
        self._reranker: Any = False  # False: not looked up yet
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
        cfg = {"spec": self.spec.spec, "dim": self.dim, "metric": "inner_product", "normalised": True}
        (self.dir / "model.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @property
    def images(self) -> VectorIndex:
        if self._images is None:
            self._mapped.pop("images", None)
            self._images = VectorIndex.open(self.dir / "images.faiss", self.dim)
            if not self._in_step("images"):
                self._reconcile_images()
        return self._images

    def search_index(self, kind: str) -> VectorIndex:
        """The index to search: the writable one when this process has it open,
        else the saved file memory-mapped (nothing read up front), when it is in
        step with the store."""
        if (self._images if kind == "images" else self._texts) is None and kind not in self._mapped:
            path = self.dir / f"{kind}.faiss"
            if path.is_file() and self._in_step(kind):
                self._mapped[kind] = VectorIndex.open(path, self.dim, mmap=True)
        if (self._images if kind == "images" else self._texts) is None and kind in self._mapped:
            return self._mapped[kind]
        return self.images if kind == "images" else self.texts

    @property
    def texts(self) -> VectorIndex:
        if self._texts is None:
            self._mapped.pop("texts", None)
            self._texts = VectorIndex.open(self.dir / "texts.faiss", self.dim)
            if not self._in_step("texts"):
                self._reconcile_texts()
        return self._texts

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
            if not TokenStore.holds(path, shape, self.token_layer):
                # Rows of another layer or shape are about to go: invalid first, re-encoded on use.
                self.store.clear_tokens(self.row.id)
                self.store.commit()
            self._tokens = TokenStore(path, shape, layer=self.token_layer)
        return self._tokens

    @property
    def token_layer(self) -> str:
        """The vision-tower layer whose patch tokens this model's reranker reads."""
        return self.reranker.config.image_layer if self.reranker is not None else "final"

    # ------------------------------------------------------------ reconcile
    def _reconcile_images(self) -> None:
        store = self.store
        self._reconcile(
            "images", store.image_vector_map, store.delete_image_vectors, store.images_by_id,
            # Only images that still load count: a failed row keeps no vector.
            lambda row: row.status == "ok",
            lambda keep: store.set_image_vectors(self.row.id, [(i, h, False) for i, h in keep]),
        )

    def _reconcile_texts(self) -> None:
        store = self.store
        self._reconcile(
            "texts", store.text_vector_map, store.delete_text_vectors, store.texts_by_id,
            lambda row: True,
            lambda keep: store.set_text_vectors(self.row.id, keep),
        )

    def _reconcile(
        self,
        kind: str,
        vector_map: Callable[[int], dict[int, Any]],
        delete_rows: Callable[[int, list[int]], None],
        rows_by_id: Callable[[list[int]], dict[int, Any]],
        usable: Callable[[Any], bool],
        adopt: Callable[[list[tuple[int, str]]], None],
    ) -> None:
        """Make one index and its vector rows agree after a crash.

        Rows whose vector the saved index lacks are dropped (their items are
        encoded again). Vectors without a row were saved after the last commit:
        those of items that still exist (their row was committed before
        encoding) are adopted, the rest removed from the index.
        """
        store = self.store
        model_id = self.row.id
        index = self._images if kind == "images" else self._texts
        assert index is not None
        in_index = set(index.ids().tolist())
        rows = vector_map(model_id)
        missing = [i for i in rows if i not in in_index]  # row says vector, index lacks it
        orphans = [i for i in in_index if i not in rows]  # vector without a row
        drop: list[int] = []
        if missing:
            delete_rows(model_id, missing)
        if orphans:
            live = rows_by_id(orphans)
            keep = [(i, live[i].content_hash) for i in orphans if i in live and usable(live[i])]
            drop = [i for i in orphans if i not in live or not usable(live[i])]
            if keep:
                adopt(keep)
        if drop:
            index.remove(drop)
            self._save(kind, index)
        else:
            self._mark_in_step(kind)
        store.commit()
        if missing or orphans:
            LOG.info("reconciled %s %s index: %d rows dropped, %d orphans", self.spec.spec, kind, len(missing), len(orphans))

    # A generation number ties each saved index to the commit that follows it:
    # the sidecar file and the store agree only when both writes completed, so
    # a clean library opens without the full reconciliation scan.
    def _generation_key(self, kind: str) -> str:
        return f"generation:{self.spec.spec}:{kind}"

    def _in_step(self, kind: str) -> bool:
        sidecar = self.dir / f"{kind}.generation"
        saved = self.store.get_setting(self._generation_key(kind))
        return saved is not None and sidecar.is_file() and sidecar.read_text().strip() == saved

    def _save(self, kind: str, index: VectorIndex) -> None:
        """Save an index atomically; the caller commits the store right after."""
        self._write_config()
        _write_atomic(self.dir / f"{kind}.generation", "dirty")  # a crash before the commit forces reconciliation
        index.save(self.dir / f"{kind}.faiss")
        self._mark_in_step(kind)

    def _mark_in_step(self, kind: str) -> None:
        generation = str(time.time_ns())
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / f"{kind}.generation", generation)
        self.store.set_setting(self._generation_key(kind), generation)  # committed by the caller

    def save_images(self) -> None:
        if self._tokens is not None:
            self._tokens.flush()
        self._save("images", self.images)

    def save_texts(self) -> None:
        self._save("texts", self.texts)

    def close(self) -> None:
        if self._tokens is not None:
            self._tokens.close()
            self._tokens = None
