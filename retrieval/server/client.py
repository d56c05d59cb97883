"""Hand a search to a server running for the same library, over its unix socket.

Standard library only: a ``crossfind search`` that finds a server must start
and finish in a fraction of a second, so nothing here imports numpy, torch or
FAISS. A missing or stale socket means "no server": the caller searches in
process.
"""

from __future__ import annotations

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


def _exchange(path: str, method: str, url: str, data: bytes | None) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP/1.1 request on a fresh connection (``Connection: close``), read to EOF.

    A few lines of socket code instead of ``http.client``, whose imports (the
    email package) cost more than the whole answer of a warm server.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            return None  # stale socket: the server is gone
        sock.settimeout(ANSWER_TIMEOUT)
        head = [f"{method} {url} HTTP/1.1", "Host: localhost", "Connection: close"]
        if data is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (data or b""))
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    raw = b"".join(chunks)
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ServerError("the server's answer is not HTTP; is another program using the library's socket?")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _unchunk(body)
    return int(parts[1]), headers, body


def _unchunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


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
    data = None if body is None else json.dumps(body).encode()
    got = _exchange(str(path), method, url, data)
    if got is None:
        return None
    status, headers, raw = got
    return status, json.loads(raw) if raw else None, headers


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
