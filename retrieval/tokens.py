"""Per-model store of image patch tokens for the reranker, keyed by image id.

One raw float16 file of fixed-size rows (patch tokens of the vision-tower
layer the model's reranker reads, recorded beside it with the library's id),
row ``id`` at offset ``id * row_bytes`` and memory-mapped for reading:
re-scoring candidates reads their rows instead of decoding images again. The
file is sparse where ids are missing. A row is valid only when the store's
``image_vectors.has_tokens`` says so, and that is committed after
:meth:`TokenStore.flush`, so a crash leaves at most unused rows. Each valid row
carries the CRC-32 of its bytes in the store (``token_crc``): a row damaged or
cut off on disk fails :meth:`TokenStore.verify` and is encoded again.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np


def row_crc(row: np.ndarray) -> int:
    """CRC-32 of one float16 token row as it lies on disk."""
    return zlib.crc32(np.ascontiguousarray(row, dtype=np.float16).tobytes())


class TokenStore:
    """Fixed-shape float16 token rows in one file, addressed by integer id."""

    def __init__(
        self, path: str | os.PathLike[str], shape: tuple[int, int], layer: str = "final", library: str = "",
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.layer = layer
        self.library = library
        self.read_only = read_only
        self.row_bytes = self.shape[0] * self.shape[1] * 2
        #: CRC-32 of every row written since it was last taken (see :meth:`take_crcs`).
        self._written: dict[int, int] = {}
        meta = self.path.with_suffix(".json")
        self._fh: BinaryIO | None = None
        if read_only:
            self._fh = open(self.path, "rb") if self.path.is_file() and self.holds(self.path, self.shape, layer, library) else None
            return
        if not self.holds(self.path, self.shape, layer, library):
            # Tokens of another model build, another layer or another library: start over.
            # The caller marks its rows invalid before opening (see :meth:`holds`).
            self.path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"shape": list(self.shape), "dtype": "float16", "layer": layer, "library": library})
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, meta)
        self.path.touch(exist_ok=True)
        self._fh = open(self.path, "r+b")

    @staticmethod
    def holds(path: str | os.PathLike[str], shape: tuple[int, int], layer: str = "final", library: str = "") -> bool:
        """Whether the store at ``path`` keeps rows of this shape and layer for
        this library (or none yet).

        When it does not (or its description is unreadable), opening it drops
        its rows: mark them invalid first, so that a crash in between cannot
        leave rows marked valid that are gone.
        """
        meta = Path(path).with_suffix(".json")
        if not meta.exists():
            return not Path(path).exists() or Path(path).stat().st_size == 0
        try:
            saved = json.loads(meta.read_text())
            same = tuple(saved["shape"]) == (int(shape[0]), int(shape[1])) and saved.get("layer", "final") == layer
            # A library id is written beside the rows since schema 0005; an older file has none.
            return bool(same) and saved.get("library", library) == library
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
            return False

    def write(self, ids: Sequence[int], tokens: np.ndarray) -> None:
        """Write rows for ``ids`` (tokens shaped ``(n, *shape)``)."""
        if self._fh is None or self.read_only:
            raise OSError("the token store is read-only")
        tokens = np.ascontiguousarray(tokens, dtype=np.float16)
        if tokens.shape[1:] != self.shape:
            raise ValueError(f"token rows of shape {tokens.shape[1:]}, store holds {self.shape}")
        for i, row in zip(ids, tokens):
            data = row.tobytes()
            self._fh.seek(int(i) * self.row_bytes)
            self._fh.write(data)
            self._written[int(i)] = zlib.crc32(data)

    def take_crcs(self, ids: Sequence[int]) -> dict[int, int]:
        """The CRC-32 of the rows written for ``ids`` (those written since the last take)."""
        return {int(i): self._written.pop(int(i)) for i in ids if int(i) in self._written}

    def flush(self) -> None:
        if self._fh is not None and not self.read_only:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def read(self, ids: Sequence[int]) -> np.ndarray:
        """Rows for ``ids`` as ``(n, *shape)`` float16 (zeros past the end)."""
        out = np.zeros((len(ids), *self.shape), np.float16)
        if self._fh is None:
            return out
        if not self.read_only:
            self._fh.flush()
        size = os.fstat(self._fh.fileno()).st_size
        n_rows = size // self.row_bytes
        if n_rows == 0:
            return out
        mm = np.memmap(self.path, dtype=np.float16, mode="r", shape=(n_rows, *self.shape))
        for j, i in enumerate(ids):
            if 0 <= i < n_rows:
                out[j] = mm[int(i)]
        del mm
        return out

    def verify(self, ids: Sequence[int], crcs: dict[int, int | None]) -> tuple[dict[int, np.ndarray], list[int]]:
        """Read rows for ``ids`` and check each against its CRC-32 in ``crcs``:
        the rows that match, and the ids whose row is damaged, cut off or has no CRC."""
        rows = self.read(ids)
        good: dict[int, np.ndarray] = {}
        bad: list[int] = []
        for i, row in zip(ids, rows):
            want = crcs.get(int(i))
            if want is not None and row_crc(row) == want and np.isfinite(row).all():
                good[int(i)] = row
            else:
                bad.append(int(i))
        return good, bad

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
