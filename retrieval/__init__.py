"""crossfind: cross-modal retrieval over image folders and text corpora.

    from retrieval import Engine
    with Engine.open("~/lib", model="shapes-tiny") as eng:
        eng.index_folder("~/Pictures")
        hits = eng.search_text("a red circle left of a blue square", k=5)

Heavy modules (torch, open_clip, faiss) load on first use, not on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CorpusError, CrossfindError, LibraryBusy, LibraryError, ModelNotAvailable, QueryError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine
    from .types import Hit, IndexReport, SearchQuery, SearchResult, Term, TextsReport

__all__ = [
    "Engine",
    "Hit",
    "SearchQuery",
    "SearchResult",
    "Term",
    "IndexReport",
    "TextsReport",
    "CrossfindError",
    "ModelNotAvailable",
    "LibraryError",
    "LibraryBusy",
    "QueryError",
    "CorpusError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name in ("Hit", "SearchQuery", "SearchResult", "Term", "IndexReport", "TextsReport"):
        from . import types

        return getattr(types, name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
