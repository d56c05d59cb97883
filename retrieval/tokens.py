"""Per-model store of image patch tokens for the reranker, keyed by image id.

One raw float16 file of fixed-size rows (patch tokens of the vision-tower
layer the model's reranker reads, recorded beside it), row ``id`` at offset ``id * row_bytes``
and memory-mapped for reading: re-scoring candidates reads their rows instead
of decoding images again. The file is sparse where ids are missing. A row is
valid only when the store's ``image_vectors.has_tokens`` says so, and that is
committed after :meth:`TokenStore.flush`, so a crash leaves at most unused rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


class TokenStore:
    """Fixed-shape float16 token rows in one file, addressed by integer id."""

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, int], layer: str = "final") -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.layer = layer
        self.row_bytes = self.shape[0] * self.shape[1] * 2
        meta = self.path.with_suffix(".json")
        if not self.holds(self.path, self.shape, layer):
            # Tokens of another model build or another layer (a new reranker): start over.
            # The caller marks its rows invalid before opening (see :meth:`holds`).
            self.path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"shape": list(self.shape), "dtype": "float16", "layer": layer}))
        self.path.touch(exist_ok=True)
        self._fh = open(self.path, "r+b")

    @staticmethod
    def holds(path: str | os.PathLike[str], shape: tuple[int, int], layer: str = "final") -> bool:
        """Whether the store at ``path`` keeps rows of this shape and layer (or none yet).

        When it does not, opening it drops its rows: mark them invalid first,
        so that a crash in between cannot leave rows marked valid that are gone.
        """
        meta = Path(path).with_suffix(".json")
        if not meta.exists():
            return True
        saved = json.loads(meta.read_text())
        return tuple(saved["shape"]) == (int(shape[0]), int(shape[1])) and saved.get("layer", "final") == layer

    def write(self, ids: Sequence[int], tokens: np.ndarray) -> None:
        """Write rows for ``ids`` (tokens shaped ``(n, *shape)``)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.float16)
        if tokens.shape[1:] != self.shape:
            raise ValueError(f"token rows of shape {tokens.shape[1:]}, store holds {self.shape}")
        for i, row in zip(ids, tokens):
            self._fh.seek(int(i) * self.row_bytes)
            self._fh.write(row.tobytes())

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def read(self, ids: Sequence[int]) -> np.ndarray:
        """Rows for ``ids`` as ``(n, *shape)`` float16 (zeros past the end)."""
        self._fh.flush()
        size = os.fstat(self._fh.fileno()).st_size
        n_rows = size // self.row_bytes
        out = np.zeros((len(ids), *self.shape), np.float16)
        if n_rows == 0:
            return out
        mm = np.memmap(self.path, dtype=np.float16, mode="r", shape=(n_rows, *self.shape))
        for j, i in enumerate(ids):
            if 0 <= i < n_rows:
                out[j] = mm[int(i)]
        del mm
        return out

    def close(self) -> None:
        self._fh.close()
