"""Per-image reranker features kept on disk in the library, without torch.

Two rerankers keep what they compute per candidate image here, so that a
repeated or overlapping query does not compute it again: BLIP's vision tower
output (:mod:`retrieval.rerank_blip`) and a crossfind reranker's image memory,
its patch tokens as the text sees them (:mod:`retrieval.rerank_memory`). Both
live under the library's ``rerank-features/`` folder, one folder per
fingerprint of the weights that made them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOG = logging.getLogger(__name__)

#: The library's folder of reranker features, one subfolder per fingerprint.
FEATURES_DIR = "rerank-features"


@dataclass(frozen=True)
class FeatureItem:
    """A candidate image whose features may be cached."""

    id: int  # the library's image id
    key: str  # what the file's content is: its content hash, or size and mtime
    path: str  # where to read it when the features must be computed


class FeatureCache:
    """Image features kept on disk as float16, one ``.npy`` file per image.

    Files live under ``root/<fingerprint>/<id % 256>/<id>-<key>.npy``: a new
    fingerprint (other weights) or a new content key (the file changed) is a
    miss, and writing an item's features removes the ones of its older
    content. Writes are atomic (temp file, rename), so searches write without
    the library's writer lock and readers never see half a file; a file that
    cannot be read is a miss. ``read_only`` caches answer but never write.
    ``what`` names the features in log messages.
    """

    def __init__(self, root: str | os.PathLike[str], fingerprint: str, shape: tuple[int, ...], read_only: bool = False,
                 what: str = "BLIP features") -> None:
        self.dir = Path(root) / fingerprint
        self.shape = tuple(shape)
        self.read_only = read_only
        self.what = what
        self._warned = False

    def _path(self, item: FeatureItem) -> Path:
        key = "".join(c for c in item.key if c.isalnum() or c in "-_")[:32] or "0"
        return self.dir / f"{item.id % 256:02x}" / f"{item.id}-{key}.npy"

    def get(self, item: FeatureItem) -> np.ndarray | None:
        """The cached features of ``item`` (float16 ``shape``), or None."""
        path = self._path(item)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if arr.shape != self.shape or arr.dtype != np.float16 or not np.isfinite(arr).all():
            LOG.warning("ignoring damaged cached %s %s", self.what, path)
            return None
        return arr

    def put(self, item: FeatureItem, features: np.ndarray) -> None:
        """Keep ``item``'s features (rounded to float16); a failed write is only logged (once)."""
        if self.read_only:
            return
        path = self._path(item)
        # A name of its own per writer: a server and a CLI search may cache the same item at once.
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for old in path.parent.glob(f"{item.id}-*.npy"):
                if old != path:
                    old.unlink(missing_ok=True)
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(features, dtype=np.float16), allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not self._warned:
                LOG.warning("cannot cache %s in %s: %s", self.what, self.dir, exc)
                self._warned = True

    def bytes_per_image(self) -> int:
        """Disk taken by one image's features (the .npy header included)."""
        return int(np.prod(self.shape)) * 2 + 128
