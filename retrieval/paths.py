"""One way to spell a file path everywhere, and to show it safely.

Paths are kept as Python ``str`` exactly as the file system gives them: a
name that is not valid UTF-8 carries its raw bytes as lone surrogates
(``os.fsdecode``'s surrogateescape), so it can be opened, stored (see
:class:`retrieval.store.FsPath`) and compared again without loss. Every place
that takes a path from a user (index, remove, ``--path``, ``search --image``)
goes through :func:`normalize_path`, the same lexical normalisation the
folder scan uses.
"""

from __future__ import annotations

import os
import re
import stat
from typing import IO

from .errors import LibraryError

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def normalize_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], what: str = "path") -> str:
    """The absolute, lexically normalised form of ``path`` (``~`` expanded, ``..`` folded).

    Symlinks are not resolved: a library indexed through a symlinked folder
    keeps the paths the user walked. An empty path is refused: it would
    otherwise mean the current directory.
    """
    raw = os.fsdecode(path)
    if not raw.strip():
        raise LibraryError(f"empty {what}; give a file or folder")
    return os.path.abspath(os.path.expanduser(raw))


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (it holds no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display(path: str) -> str:
    """``path`` safe to print on one line: control characters and bytes that
    are not UTF-8 become backslash escapes (``\\n``, ``\\x1b``, ``\\xff``)."""

    def esc(m: re.Match[str]) -> str:
        ch = m.group()
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a raw byte carried by surrogateescape
            return f"\\x{code - 0xDC00:02x}"
        if ch == "\n":
            return "\\n"
        if ch == "\t":
            return "\\t"
        if ch == "\r":
            return "\\r"
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(esc, path)


def json_safe(text: str) -> str:
    """JSON text with lone surrogates written as ``\\udcXX`` escapes, so it can be
    printed as UTF-8 and ``json.loads`` gives back the lossless path."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class NotRegularFile(OSError):
    """The path is a FIFO, socket, device or folder, not a regular file."""


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file (symlinks followed).

    The file is opened non-blocking and checked with ``fstat`` before anything
    is read, so a FIFO or device named ``*.png`` can never block a run.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"not a regular file: {kind_of(st.st_mode)}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def kind_of(mode: int) -> str:
    """A word for a file type that is not a regular file."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"
