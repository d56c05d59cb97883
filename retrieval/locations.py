"""Where a library lives, decided without importing anything heavy (the CLI
needs it before it knows whether to load the engine at all)."""

from __future__ import annotations

import os
from pathlib import Path


def default_library() -> Path:
    """``$CROSSFIND_LIBRARY``, else ``$XDG_DATA_HOME/crossfind`` (``~/.local/share/crossfind``)."""
    env = os.environ.get("CROSSFIND_LIBRARY")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "crossfind"


#: ``--db sqlite``: the library's own SQLite file, whatever ``$CROSSFIND_DATABASE_URL`` says.
SQLITE = "sqlite"


def default_database() -> str | None:
    """``$CROSSFIND_DATABASE_URL`` (the store in a database such as PostgreSQL), else None (SQLite in the library folder)."""
    return database(os.environ.get("CROSSFIND_DATABASE_URL"))


def database(db: str | None) -> str | None:
    """The store's URL for a ``--db`` value: None for SQLite in the library folder (no value, or ``sqlite``)."""
    return None if not db or db == SQLITE else db


def library_dir(library: str | os.PathLike[str] | None) -> Path:
    """The absolute, resolved library folder ``Engine.open(library)`` would use."""
    lib = Path(library).expanduser() if library is not None else default_library()
    return lib.resolve()
