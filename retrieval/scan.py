"""Folder scanning: which image files exist, with their size and mtime.

Recursive, extension-filtered, with repeatable exclude globs, hidden entries
skipped unless asked, and symlinked folders followed once (loops are safe:
a folder already visited by device and inode is not entered again). Only
regular files are yielded (symlinks to regular files included): a FIFO or a
device named ``*.png`` is never opened. Entries that cannot be used (broken
symlinks, symlink loops, unreadable files, special files) are reported as
:class:`ScanIssue` to the caller's list, never silently dropped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import errno
import os
import stat
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .imageio import IMAGE_EXTENSIONS
from .paths import kind_of, normalize_path, open_regular

#: Bytes read at a time while hashing.
HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class FileInfo:
    """A file found by the scan."""

    path: str  # absolute path, symlinks in the folder part kept as walked
    size: int  # bytes
    mtime_ns: int  # modification time, nanoseconds


@dataclass(frozen=True)
class ScanIssue:
    """A file or folder the scan could not use, with the reason."""

    path: str
    reason: str


def _stat_issue(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, FileNotFoundError) and os.path.islink(path):
        return "broken symlink"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "vanished while scanning"
    return f"cannot read: {exc.strerror or exc}"


def _check_file(path: str, issues: list[ScanIssue] | None) -> os.stat_result | None:
    """The stat of ``path`` when it is a readable regular file, else None (issue noted)."""
    reason = None
    try:
        st = os.stat(path)
    except OSError as exc:
        reason, st = _stat_issue(path, exc), None
    if st is not None and not stat.S_ISREG(st.st_mode):
        reason = f"not a regular file ({kind_of(st.st_mode)})"
    elif st is not None and not os.access(path, os.R_OK):
        reason = "permission denied"
    if reason is None:
        return st
    if issues is not None:
        issues.append(ScanIssue(path, reason))
    return None


def _excluded(rel: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def scan(
    roots: Iterable[str | os.PathLike[str]],
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
    issues: list[ScanIssue] | None = None,
) -> Iterator[FileInfo]:
    """Yield the image files under ``roots`` (files given directly are yielded too).

    ``exclude`` globs match either the path relative to its root or the bare
    name of a file or folder (``*.tmp``, ``raw/*``, ``thumbnails``). Entries
    that cannot be used are appended to ``issues`` when it is given.
    """
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    for root in roots:
        root_path = normalize_path(root)
        if not os.path.isdir(root_path):
            st = _check_file(root_path, issues)
            if st is not None and root_path not in seen_files:
                seen_files.add(root_path)
                yield FileInfo(root_path, st.st_size, st.st_mtime_ns)
            continue
        yield from _walk(root_path, exclude, include_hidden, extensions, issues, seen_dirs, seen_files)


def _walk(
    root: str,
    exclude: Sequence[str],
    include_hidden: bool,
    extensions: frozenset[str],
    issues: list[ScanIssue] | None,
    seen_dirs: set[tuple[int, int]],
    seen_files: set[str],
) -> Iterator[FileInfo]:
    def on_error(exc: OSError) -> None:
        if issues is not None and exc.filename:
            issues.append(ScanIssue(os.fsdecode(exc.filename), _stat_issue(os.fsdecode(exc.filename), exc)))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            on_error(exc)
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            if issues is not None and os.path.islink(dirpath):
                issues.append(ScanIssue(dirpath, "symlink to a folder already scanned (a loop or a second link)"))
            dirnames[:] = []
            continue
        seen_dirs.add(key)
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(
            d for d in dirnames if (include_hidden or not d.startswith(".")) and not _excluded(rel_dir + d, d, exclude)
        )
        for name in sorted(filenames):
            if not include_hidden and name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() not in extensions:
                continue
            if _excluded(rel_dir + name, name, exclude):
                continue
            full = os.path.join(dirpath, name)
            if full in seen_files:
                continue
            fst = _check_file(full, issues)
            if fst is None:
                continue
            seen_files.add(full)
            yield FileInfo(full, fst.st_size, fst.st_mtime_ns)


def file_hash(path: str | os.PathLike[str]) -> str:
    """BLAKE2b content hash (hex) of a file, read in blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open_regular(path) as fh:
        while True:
            block = fh.read(HASH_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
