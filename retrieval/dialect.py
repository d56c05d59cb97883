"""Everything that differs between the store's two databases, in one place.

The store runs on SQLite (the default: ``library.db`` in the library folder)
or on PostgreSQL (``--db postgresql+psycopg://...``). The models, queries and
Alembic revisions are the same on both; what is not lives here:

* file paths (:class:`retrieval.store.FsPath`): SQLite keeps a name that is
  not UTF-8 as its raw bytes in a TEXT value; PostgreSQL text cannot hold
  such bytes, so there path columns are ``bytea`` (revision 0006). Both
  compare and order paths byte by byte.
* ``--path`` globs: SQLite's ``GLOB``; on PostgreSQL the same glob becomes an
  anchored regular expression over the path's bytes (:func:`glob_regex`).
* the writer lock across machines: on PostgreSQL a session-level advisory
  lock keyed by the library id (:class:`AdvisoryLock`); SQLite needs none
  beyond the folder's ``flock``.
* URLs: which ones name a database, and how they are shown (never with the
  password, :func:`mask_url`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from sqlalchemy import Boolean, String, cast, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

__all__ = ["is_database_url", "mask_url", "glob_match", "glob_regex", "AdvisoryLock", "advisory_key"]


def is_database_url(value: str) -> bool:
    """Whether ``value`` is a SQLAlchemy URL (``postgresql+psycopg://...``, ``sqlite:///...``), not a path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


def mask_url(url: Any) -> str:
    """``url`` as text with its password (if any, also a ``password=`` query parameter) replaced by ``***``."""
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(str(url)).render_as_string(hide_password=True)
        return re.sub(r"([?&]password=)[^&]*", r"\1***", shown)
    except Exception:  # noqa: BLE001 - not a URL we can parse: show nothing that could be secret
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


# ------------------------------------------------------------------- paths
class as_stored_text(FunctionElement[str]):
    """A bound path as the column stores it: SQLite gets raw bytes as TEXT."""

    inherit_cache = True
    type = String()


@compiles(as_stored_text)
def _as_stored_text(element: Any, compiler: Any, **kw: Any) -> str:
    (arg,) = element.clauses
    return str(compiler.process(arg, **kw))


@compiles(as_stored_text, "sqlite")
def _as_stored_text_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    (arg,) = element.clauses
    return str(compiler.process(cast(arg, String), **kw))


class as_fetched_bytes(FunctionElement[bytes]):
    """A path column fetched as bytes: sqlite3 would refuse to decode a name that is not UTF-8."""

    inherit_cache = True


@compiles(as_fetched_bytes)
def _as_fetched_bytes(element: Any, compiler: Any, **kw: Any) -> str:
    (arg,) = element.clauses
    return str(compiler.process(arg, **kw))


@compiles(as_fetched_bytes, "sqlite")
def _as_fetched_bytes_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    (arg,) = element.clauses
    return f"CAST({compiler.process(arg, **kw)} AS BLOB)"


def paths_as_bytes(dialect: Any) -> bool:
    """Whether path columns are ``bytea`` on this database (every name is sent as bytes)."""
    return dialect.name == "postgresql"


# -------------------------------------------------------------------- globs
class _glob_match(FunctionElement[bool]):
    inherit_cache = True
    type = Boolean()


def glob_match(column: Any, pattern: str) -> ColumnElement[bool]:
    """``column`` (a path) matches the SQLite-style glob ``pattern`` (``*``,
    ``?``, ``[...]``), case-sensitive, on either database. Both forms are
    bound now, so a cached statement never reuses another pattern's regex."""
    return _glob_match(column, literal(pattern, column.type), literal(glob_regex(pattern), String))


@compiles(_glob_match)
def _glob_match_default(element: Any, compiler: Any, **kw: Any) -> str:
    column, pattern, _regex = element.clauses
    return f"({compiler.process(column, **kw)} GLOB {compiler.process(pattern, **kw)})"


@compiles(_glob_match, "postgresql")
def _glob_match_pg(element: Any, compiler: Any, **kw: Any) -> str:
    column, _pattern, regex = element.clauses
    # The path's bytes as Latin-1 text: one character per byte, for any name.
    return f"(convert_from({compiler.process(column, **kw)}, 'LATIN1') ~ {compiler.process(regex, **kw)})"


# One character as SQLite's GLOB reads a path (as Latin-1 text): an ASCII byte, a lead
# byte with every continuation byte after it, or a stray continuation byte on its own.
_ONE_CHAR = "(?:[\x01-\x7f]|[\xc0-\xff][\x80-\xbf]*(?![\x80-\xbf])|[\x80-\xbf])"
_CLASS_SPECIAL = set("\\^-[]")


def _latin1(text: str) -> str:
    """``text``'s UTF-8 bytes (raw bytes kept) as Latin-1 characters."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _lit(ch: str) -> str:
    """One pattern character, literally (a non-ASCII one as its whole byte sequence)."""
    if ord(ch) < 0x80:
        return ch if ch.isalnum() else "\\" + ch
    raw = _latin1(ch)
    return raw + ("(?![\x80-\xbf])" if ord(raw[0]) >= 0xC0 else "")  # its continuation bytes end here


def glob_regex(pattern: str) -> str:
    """A PostgreSQL regular expression, over a path's bytes read as Latin-1,
    that matches what SQLite's ``GLOB pattern`` matches: ``*`` any run of
    characters (``/`` included), ``?`` one character, ``[abc]``, ``[a-z]``,
    ``[^abc]`` one character of (or not of) a set; everything else literally."""
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            out.append(_ONE_CHAR + "*")  # whole characters, so a following ? or [..] starts on one
            i += 1
        elif ch == "?":
            out.append(_ONE_CHAR)
            i += 1
        elif ch == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            members: list[tuple[str, str]] = []
            if j < n and pattern[j] == "]":  # a leading ] is literal
                members.append(("]", "]"))
                j += 1
            while j < n and pattern[j] != "]":
                if j + 2 < n and pattern[j + 1] == "-" and pattern[j + 2] != "]":
                    members.append((pattern[j], pattern[j + 2]))
                    j += 3
                else:
                    members.append((pattern[j], pattern[j]))
                    j += 1
            if j >= n:  # no closing ]: SQLite's GLOB then matches nothing
                return "^(?!)"
            out.append(_char_class(members, negate))
            i = j + 1
        else:
            out.append(_lit(ch))
            i += 1
    out.append("$")
    return "".join(out)


def _char_class(members: list[tuple[str, str]], negate: bool) -> str:
    ascii_part = []
    wide = []
    for lo, hi in members:
        if ord(lo) < 0x80 and ord(hi) < 0x80:
            if ord(lo) > ord(hi):
                continue
            a = "\\" + lo if lo in _CLASS_SPECIAL else lo
            b = "\\" + hi if hi in _CLASS_SPECIAL else hi
            ascii_part.append(a if lo == hi else f"{a}-{b}")
        elif lo == hi:
            wide.append(re.escape(_latin1(lo)))
        else:  # a range over non-ASCII characters: every character in it
            wide.extend(re.escape(_latin1(chr(c))) for c in range(ord(lo), min(ord(hi), ord(lo) + 4096) + 1) if not 0xD800 <= c < 0xE000)
    alts = ([f"[{''.join(ascii_part)}]"] if ascii_part else []) + wide
    if not alts:
        return "(?!)" if not negate else _ONE_CHAR
    any_of = "(?:" + "|".join(alts) + ")"
    return f"(?!{any_of}){_ONE_CHAR}" if negate else any_of


# ---------------------------------------------------------- writer locking
def advisory_key(library_id: str) -> int:
    """The 64-bit advisory lock key of a library (signed, as PostgreSQL takes it)."""
    digest = hashlib.blake2b(f"crossfind-writer:{library_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock held on a connection of its own.

    PostgreSQL drops it when that connection ends, so a writer that crashes
    (or a machine that goes away, once its connection times out) never
    leaves it behind.
    """

    def __init__(self, engine: Any, library_id: str) -> None:
        self.engine = engine
        self.key = advisory_key(library_id)
        self._conn: Any = None

    def try_acquire(self) -> bool:
        from sqlalchemy import text

        if self._conn is None:
            self._conn = self.engine.connect()
        got = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
        self._conn.commit()  # the lock outlives the transaction; do not sit idle in one
        if not got:
            self._conn.close()  # holds nothing: back to the pool
            self._conn = None
        return got

    def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            from sqlalchemy import text

            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            conn.commit()
        finally:
            conn.invalidate()  # end the server session itself, so no pooled connection keeps the lock
            conn.close()
