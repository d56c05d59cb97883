"""crossfind: cross-modal retrieval over image folders and text corpora.

    from retrieval import Engine
    with Engine.open("~/lib", model="shapes-tiny") as eng:
        eng.index_folder("~/Pictures")
        hits = eng.search_text("a red circle left of a blue square", k=5)

Heavy modules (torch, open_clip, faiss) load on first use, not on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CorpusError, CrossfindError, LibraryBusy, LibraryError, MissingExtra, ModelNotAvailable, QueryError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine
    from .types import HistoryEntry, Hit, IndexReport, SearchQuery, SearchResult, Term, TextsReport

__all__ = [
    "Engine",
    "Hit",
    "SearchQuery",
    "SearchResult",
    "Term",
    "IndexReport",
    "TextsReport",
    "HistoryEntry",
    "CrossfindError",
    "ModelNotAvailable",
    "LibraryError",
    "LibraryBusy",
    "QueryError",
    "CorpusError",
    "MissingExtra",
]


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source);
    a source tree that was never installed reports ``0+unknown``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crossfind")
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read on first use, not at import
        return _version()
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name in ("Hit", "SearchQuery", "SearchResult", "Term", "IndexReport", "TextsReport", "HistoryEntry"):
        from . import types

        return getattr(types, name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
