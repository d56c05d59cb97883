"""Exceptions raised by the crossfind library.

Every expected failure is one of these; the CLI turns them into a one-line
message and exit status 1.
"""

from __future__ import annotations

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
