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
        self._images: VectorIndex | None = None
        self._texts: VectorIndex | None = None
        self._tokens: TokenStore | None = None
        self._reranker: Any = False  # False: not looked up yet
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
        now = weights_fingerprint(self.spec)
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
    def row(self):
        """The model's store row (created on first use, which loads the encoder)."""
        found = self.store.find_model(self.spec.spec)
        return found if found is not None else self.store.model(self.spec.spec, self.encoder.dim)

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
            self._images = VectorIndex.open(self.dir / "images.faiss", self.dim)
            if not self._in_step("images"):
                self._reconcile_images()
        return self._images

    @property
    def texts(self) -> VectorIndex:
        if self._texts is None:
            self._texts = VectorIndex.open(self.dir / "texts.faiss", self.dim)
            if not self._in_step("texts"):
                self._reconcile_texts()
        return self._texts

    @property
    def reranker(self) -> Any:
        """The reranker trained for this model, or None."""
        if self._reranker is False:
            from .rerank_files import reranker_dir

            where = reranker_dir(self.spec)  # decided without loading torch
            if where is None:
                self._reranker = None
            else:
                from .rerank import Reranker

                # The encoder only when the reranker needs it: a query asked
                # before is re-scored from its kept tokens without it.
                encoder = self._encoder if self._encoder is not None else (lambda: self.encoder)
                self._reranker = Reranker.load(where, encoder, model=self.spec.spec)
        return self._reranker

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
