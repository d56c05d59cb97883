"""Exceptions raised by the crossfind library.

Every expected failure is one of these; the CLI turns them into a one-line
message and exit status 1.
"""

from __future__ import annotations

import errno
import os

__all__ = ["CrossfindError", "ModelNotAvailable", "LibraryError", "LibraryBusy", "QueryError", "CorpusError", "MissingExtra"]


class CrossfindError(Exception):
    """Base class of every error crossfind raises on purpose."""


class ModelNotAvailable(CrossfindError):
    """A model spec cannot be resolved or its weights are not at hand."""


class LibraryError(CrossfindError):
    """The library folder or its database cannot be used as asked."""


class LibraryBusy(LibraryError):
    """Another process holds the library's writer lock (and the caller would not wait)."""


class QueryError(CrossfindError):
    """A search was asked with bad arguments (missing image, unknown target...)."""


class CorpusError(CrossfindError):
    """A text corpus file cannot be read at all."""


class MissingExtra(ModelNotAvailable):
    """An optional dependency is not installed; the message names the extra to install."""


def write_failure(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` means the library cannot be written
    (full disk, read-only file system); None for any other error."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return os.strerror(exc.errno).lower()
    if isinstance(exc, (OperationalError, sqlite3.OperationalError)):
        msg = str(getattr(exc, "orig", exc)).lower()
        if "disk is full" in msg or "no space left" in msg:
            return "no space left on device"
        if "disk i/o error" in msg:
            return "disk I/O error (is the disk full?)"
        if "readonly" in msg or "read-only" in msg:
            return "the library is read-only"
    if isinstance(exc, RuntimeError) and "No space left on device" in str(exc):
        return "no space left on device"
    return None


def cannot_write(library_dir: object, exc: BaseException) -> LibraryError | None:
    """The one-line :class:`LibraryError` for a write that failed because the
    library cannot be written (see :func:`write_failure`), else None."""
    reason = write_failure(exc)
    if reason is None:
        return None
    todo = "make it writable" if "read-only" in reason else "free some space"
    return LibraryError(
        f"cannot write to library {library_dir}: {reason}; what was saved before is kept, {todo} and run the command again"
    )
