"""Folder scanning: which image files exist, with their size and mtime.

Recursive, extension-filtered, with repeatable exclude globs, hidden entries
skipped unless asked, and symlinked folders followed once (loops are safe:
a folder already visited by device and inode is not entered again).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .imageio import IMAGE_EXTENSIONS

#: Bytes read at a time while hashing.
HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class FileInfo:
    """A file found by the scan."""

    path: str  # absolute path, symlinks in the folder part kept as walked
    size: int  # bytes
    mtime_ns: int  # modification time, nanoseconds


def _excluded(rel: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def scan(
    roots: Iterable[str | os.PathLike[str]],
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> Iterator[FileInfo]:
    """Yield the image files under ``roots`` (files given directly are yielded too).

    ``exclude`` globs match either the path relative to its root or the bare
    name of a file or folder (``*.tmp``, ``raw/*``, ``thumbnails``).
    """
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    for root in roots:
        root_path = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        if root_path.is_file():
            st = root_path.stat()
            if str(root_path) not in seen_files:
                seen_files.add(str(root_path))
                yield FileInfo(str(root_path), st.st_size, st.st_mtime_ns)
            continue
        for dirpath, dirnames, filenames in os.walk(root_path, followlinks=True):
            try:
                st = os.stat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add(key)
            rel_dir = os.path.relpath(dirpath, root_path)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            dirnames[:] = sorted(
                d
                for d in dirnames
                if (include_hidden or not d.startswith(".")) and not _excluded(rel_dir + d, d, exclude)
            )
            for name in sorted(filenames):
                if not include_hidden and name.startswith("."):
                    continue
                if os.path.splitext(name)[1].lower() not in extensions:
                    continue
                if _excluded(rel_dir + name, name, exclude):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    fst = os.stat(full)
                except OSError:
                    continue  # dangling symlink or vanished file
                if full in seen_files:
                    continue
                seen_files.add(full)
                yield FileInfo(full, fst.st_size, fst.st_mtime_ns)


def file_hash(path: str | os.PathLike[str]) -> str:
    """BLAKE2b content hash (hex) of a file, read in blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while True:
            block = fh.read(HASH_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
