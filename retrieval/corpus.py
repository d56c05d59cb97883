"""Reading text corpora: ``.txt`` (a text per line), ``.jsonl`` and ``.csv``.

Malformed records are reported with their line number and skipped; the rest
load. Empty texts are skipped silently; a repeated id keeps its last text.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorpusError

FORMATS = (".txt", ".jsonl", ".csv")


@dataclass(frozen=True)
class TextRecord:
    """One text of a corpus file."""

    ext_id: str  # the record's own id, else its line number
    text: str
    meta: dict[str, Any] | None  # other fields of a jsonl/csv record
    line: int  # 1-based line in the file

    @property
    def content_hash(self) -> str:
        return hashlib.blake2b(self.text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class ParsedCorpus:
    records: list[TextRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "line N: reason"
    read: int = 0  # records seen, malformed ones included


def _norm(text: Any) -> str:
    return " ".join(str(text).split())


def _encodable(obj: Any) -> bool:
    """Whether a parsed JSON value can be stored as UTF-8 (JSON allows lone surrogates)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_corpus(path: str | Path) -> ParsedCorpus:
    """Parse a corpus file by its extension; raises :class:`CorpusError` if unreadable."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise CorpusError(f"{path}: unsupported corpus format {ext or '(none)'}; use one of {', '.join(FORMATS)}")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    out = ParsedCorpus()
    by_id: dict[str, TextRecord] = {}

    def keep(rec: TextRecord) -> None:
        if "\x00" in rec.text or "\x00" in rec.ext_id:
            # PostgreSQL text cannot hold NUL; refused on every store alike
            out.errors.append(f"line {rec.line}: contains a NUL character")
            return
        if rec.text:
            by_id.pop(rec.ext_id, None)  # a repeated id keeps its last text, in its last place
            by_id[rec.ext_id] = rec

    if ext == ".txt":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                out.read += 1
                keep(TextRecord(str(n), _norm(line), None, n))
    elif ext == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            out.read += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                out.errors.append(f"line {n}: invalid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                out.errors.append(f'line {n}: expected an object with a "text" string')
                continue
            ext_id = str(obj["id"]) if obj.get("id") is not None else str(n)
            meta = {k: v for k, v in obj.items() if k not in ("text", "id")} or None
            if not _encodable(obj):
                out.errors.append(f"line {n}: not valid Unicode (a lone surrogate escape such as \\ud800)")
                continue
            keep(TextRecord(ext_id, _norm(obj["text"]), meta, n))
    else:
        reader = csv.DictReader(raw.splitlines())
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise CorpusError(f"{path}: a CSV corpus needs a header with a 'text' column")
        for row in reader:
            n = reader.line_num
            out.read += 1
            if None in row or any(v is None for v in row.values()):
                out.errors.append(f"line {n}: expected {len(reader.fieldnames)} fields")
                continue
            ext_id = row.get("id") or str(n)
            meta = {k: v for k, v in row.items() if k not in ("text", "id")} or None
            keep(TextRecord(str(ext_id), _norm(row["text"]), meta, n))
    out.records = list(by_id.values())
    return out
