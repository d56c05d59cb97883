"""Query encoding: the vector a search looks up and the tokens its reranker reads.

A text asked before with the same model is not encoded again: its vector and
reranker tokens come from this process's cache or from the search history
(which keeps both), so a repeated query needs no encoder load at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QueryError
from .imageio import ImageLoadError, LoadedImage, load_image
from .paths import normalize_path
from .slot import ModelSlot
from .store import Store
from .types import ImageInput, SearchQuery


class QueryEncoder:
    """Encode queries with the current model, caching text vectors and tokens.

    ``slot()`` returns the :class:`~retrieval.slot.ModelSlot` of the model in
    use; caches are keyed by its spec, so switching models never mixes them.
    """

    def __init__(self, store: Store, slot: Callable[[], ModelSlot]) -> None:
        self.store = store
        self._slot = slot
        self._vectors: dict[tuple[str, str], np.ndarray] = {}
        self._tokens: dict[tuple[str, str], np.ndarray] = {}  # reranker tokens of text queries

    def clear(self) -> None:
        """Forget cached vectors (after a failed write, the history may have lost them)."""
        self._vectors.clear()

    def remember(self, text: str, vector: np.ndarray) -> None:
        """Use ``vector`` as the embedding of ``text`` with the current model
        (benchmarks hand over query vectors of a chosen distribution this way)."""
        self._vectors[(self._slot().spec.spec, text)] = np.asarray(vector, np.float32)

    def vector(self, query: SearchQuery) -> np.ndarray:
        """The normalised query vector: the main query plus weighted terms."""
        parts: list[tuple[float, np.ndarray]] = []
        if query.text is not None:
            parts.append((1.0, self.text_vector(query.text)))
        if query.image is not None:
            parts.append((1.0, self.image(query.image)[0]))
        for t in query.terms:
            if t.text is not None:
                parts.append((t.weight, self.text_vector(t.text)))
            elif t.image is not None:
                parts.append((t.weight, self.image(t.image)[0]))
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
        state = self._slot()
        key = (state.spec.spec, text)
        vec = self._vectors.get(key)
        if vec is None:
            raw = self.store.text_vector(state.spec.spec, text)
            if raw is not None and len(raw) == 4 * state.dim:
                vec = np.frombuffer(raw, dtype=np.float32).copy()
            else:
                vec = state.runtime("text").encode_texts([text])[0]
            self._vectors[key] = vec
        return vec

    def text_tokens(self, text: str) -> np.ndarray:
        """The reranker's tokens of a text query: from this session or the
        search history when it was re-ranked before (no encoder load), else encoded."""
        state = self._slot()
        key = (state.spec.spec, text)
        tok = self._tokens.get(key)
        if tok is None:
            raw = self.store.text_tokens(state.spec.spec, text)
            row = 4 * state.reranker.config.text_features  # a reranker of other text features: encode again
            if raw is not None and len(raw) and len(raw) % row == 0:
                tok = np.frombuffer(raw, dtype=np.float32).reshape(-1, row // 4).copy()
            else:
                tok = state.reranker.query_tokens(text)
            self._tokens[key] = tok
        return tok

    def image(self, image: ImageInput, with_tokens: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The vector of a query image and, ``with_tokens``, the patch tokens
        its model's reranker reads."""
        state = self._slot()
        enc = state.runtime("image")
        loaded = self._open_image(image, enc.image_size)
        vecs, toks = enc.encode_images(enc.image_batch([loaded.image]), with_tokens=with_tokens,
                                       token_layer=state.token_layer if with_tokens else "final")
        return vecs[0], (toks[0] if toks is not None else None)

    @staticmethod
    def _open_image(image: ImageInput, min_size: int) -> LoadedImage:
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
            return load_image(path, min_size=min_size)
        except ImageLoadError as exc:
            raise QueryError(f"cannot use query image {path}: {exc.reason}") from None


def image_label(image: ImageInput | None) -> str | None:
    """How a query image is shown and kept in the history: its normalised path."""
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        return normalize_path(image, "query image path")
    return "<PIL image>"
