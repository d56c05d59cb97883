"""Hand a search to a server running for the same library, over its unix socket.

Standard library only: a ``crossfind search`` that finds a server must start
and finish in a fraction of a second, so nothing here imports numpy, torch or
FAISS. A missing or stale socket means "no server": the caller searches in
process.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import CrossfindError
from . import SOCKET_NAME

#: Seconds to wait for a running server to accept; a server that does not is treated as absent.
CONNECT_TIMEOUT = 1.0
#: Seconds to wait for an answer (a first query with another model loads it).
ANSWER_TIMEOUT = 600.0
#: Set to 1 to never hand searches to a server.
NO_SERVER_ENV = "CROSSFIND_NO_SERVER"


class ServerError(CrossfindError):
    """The server refused the request; the message is the server's own."""


def socket_path(library_dir: str | os.PathLike[str]) -> Path:
    """Where a server for ``library_dir`` (an absolute, resolved folder) listens."""
    return Path(library_dir) / SOCKET_NAME


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=CONNECT_TIMEOUT)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self._path)
            sock.settimeout(ANSWER_TIMEOUT)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(library_dir: str | os.PathLike[str], method: str, url: str, body: Any = None) -> tuple[int, Any, dict[str, str]] | None:
    """One JSON request to the library's server: ``(status, json, headers)``,
    or None when no server answers on the socket (none running, or a stale socket)."""
    if os.environ.get(NO_SERVER_ENV) == "1":
        return None
    path = socket_path(library_dir)
    try:
        if not path.is_socket():
            return None
    except OSError:
        return None
    conn = _UnixConnection(str(path))
    try:
        try:
            conn.connect()
        except OSError:
            return None  # stale socket: the server is gone
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, url, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def search(library_dir: str | os.PathLike[str], body: dict[str, Any]) -> tuple[dict[str, Any], list[str]] | None:
    """``POST /api/search`` on the library's server: ``(search --json object, notes)``,
    or None without a server. A refused search raises :class:`ServerError` with
    the server's message (the same message the search would raise in process)."""
    got = request(library_dir, "POST", "/api/search", body)
    if got is None:
        return None
    status, obj, headers = got
    if status != 200:
        msg = obj.get("error") if isinstance(obj, dict) else None
        raise ServerError(msg or f"the server answered HTTP {status}")
    notes = json.loads(headers.get("x-crossfind-notes", "[]"))
    return obj, notes
