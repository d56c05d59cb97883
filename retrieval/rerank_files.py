"""Where a model's reranker lives, answerable without importing torch.

A search only needs to load the encoder and the reranker when one exists, so
the file lookup is kept apart from :mod:`retrieval.rerank`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .encoders import ModelSpec

WEIGHTS_NAME = "reranker.safetensors"
CONFIG_NAME = "reranker.json"


def reranker_dirs(spec: ModelSpec) -> list[Path]:
    """Folders searched for a reranker of ``spec``, in order.

    The model's own folder (bundled and ``local-dir:`` models), then
    ``$CROSSFIND_RERANKERS/<slug>/`` when set, then
    ``$XDG_CACHE_HOME/crossfind/rerankers/<slug>/`` (``~/.cache`` by default).
    """
    dirs = [spec.local_dir] if spec.local_dir is not None else []
    env = os.environ.get("CROSSFIND_RERANKERS")
    if env:
        dirs.append(Path(env).expanduser() / spec.slug)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    dirs.append(cache / "crossfind" / "rerankers" / spec.slug)
    return dirs


def reranker_dir(spec: ModelSpec) -> Path | None:
    """The first folder of :func:`reranker_dirs` holding a reranker, or None."""
    for where in reranker_dirs(spec):
        if (where / WEIGHTS_NAME).is_file() and (where / CONFIG_NAME).is_file():
            return where
    return None


#: Version of what a crossfind reranker's image memory is (``CrossAttentionITM.encode_image``):
#: raised when that computation changes, so memory cached by an older crossfind is not read.
MEMORY_VERSION = 1


def reranker_fingerprint(folder: Path) -> str:
    """What the crossfind reranker in ``folder`` computes, in 16 hex characters:
    the content of its config and weights (and :data:`MEMORY_VERSION`). Image
    memory cached under one fingerprint is never read for another."""
    import hashlib

    digest = hashlib.sha256(f"crossfind-reranker-memory{MEMORY_VERSION}".encode())
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update(hashlib.sha256((Path(folder) / name).read_bytes()).digest())
    return digest.hexdigest()[:16]
