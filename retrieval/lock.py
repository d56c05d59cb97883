"""The library writer lock: one writing process at a time, readers never wait.

Every operation that changes a library's items, vectors or index files holds an
exclusive ``fcntl.flock`` on ``writer.lock`` in the library folder. The kernel
drops it when the process dies (``kill -9`` included), so a crash never leaves
a stale lock behind. Searches, ``status``, ``history`` and ``show`` do not take
it: SQLite's WAL mode lets them read while a writer commits, and saved index
files are replaced atomically.

When the store is a database that several folders (machines) share
(PostgreSQL), the lock also holds a lock of that database, taken after the
``flock`` (see :class:`retrieval.dialect.AdvisoryLock`): writers on every
machine take turns, and the server drops the lock when a writer's connection
ends.

The lock is re-entrant within one :class:`WriterLock` object, so a writing
method may call another.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .errors import LibraryBusy, LibraryError

LOCK_NAME = "writer.lock"
#: Seconds between attempts while waiting for another writer.
POLL_SECONDS = 0.1

__all__ = ["WriterLock", "LOCK_NAME", "SharedLock"]


class SharedLock(Protocol):
    """A lock that writers elsewhere take too (a database's)."""

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class WriterLock:
    """An exclusive, re-entrant lock on a library folder for writing (and on
    the library's database, with ``shared``)."""

    def __init__(self, library_dir: str | os.PathLike[str], shared: SharedLock | None = None) -> None:
        self.path = Path(library_dir) / LOCK_NAME
        self._fd: int | None = None
        self._depth = 0
        self.shared = shared

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._depth > 0

    def _try(self) -> bool:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise LibraryError(f"cannot write to library {self.path.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        if self.shared is not None:
            try:
                got = self.shared.try_acquire()
            except BaseException:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                raise
            if not got:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                return False
        return True

    def acquire(self, wait: bool = True, on_wait: Callable[[], None] | None = None, timeout: float | None = None) -> bool:
        """Take the lock; whether this call took it (False when it was already held here).

        When another process holds it: with ``wait``, call ``on_wait`` once and
        block until it is free (or ``timeout`` seconds pass); without, raise
        :class:`~retrieval.errors.LibraryBusy` at once.
        """
        if self._depth:
            self._depth += 1
            return False
        if not self._try():
            if not wait:
                raise LibraryBusy(f"another crossfind process is writing to library {self.path.parent}; try again when it is done")
            if on_wait is not None:
                on_wait()
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._try():
                if deadline is not None and time.monotonic() >= deadline:
                    raise LibraryBusy(f"another crossfind process kept writing to library {self.path.parent} for {timeout:.0f}s")
                time.sleep(POLL_SECONDS)
        self._depth = 1
        return True

    def try_acquire(self) -> bool:
        """Take the lock only if it is free now (or already held here)."""
        if self._depth:
            self._depth += 1
            return True
        try:
            ok = self._try()
        except (LibraryError, OSError):
            return False
        if ok:
            self._depth = 1
        return ok

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            try:
                if self.shared is not None:
                    self.shared.release()
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextmanager
    def hold(self, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """``with lock.hold(): ...`` — :meth:`acquire` then :meth:`release`."""
        self.acquire(wait=wait, on_wait=on_wait)
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        if self._depth and self.shared is not None:
            self.shared.release()
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock too
            self._fd = None
        self._depth = 0
