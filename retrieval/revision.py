"""The schema revision a library must be at, known without importing
SQLAlchemy or Alembic (a search process checks it with one query)."""

from __future__ import annotations


def head_revision() -> str | None:
    """The newest revision in ``migrations/versions``, read from the revision
    files' ``revision``/``down_revision`` lines without loading Alembic: the one
    revision no other revises. None when that is not a single one (Alembic decides)."""
    import re
    from importlib.resources import files

    revisions: set[str] = set()
    parents: set[str] = set()
    for entry in files("retrieval.migrations").joinpath("versions").iterdir():
        if not entry.name.endswith(".py"):
            continue
        text = entry.read_text()
        rev = re.search(r"""^revision\s*(?::[^=]*)?=\s*["']([^"']+)["']""", text, re.M)
        down = re.search(r"""^down_revision\s*(?::[^=]*)?=\s*(.+)$""", text, re.M)
        if rev is None or down is None:
            return None
        revisions.add(rev.group(1))
        parents.update(re.findall(r"""["']([^"']+)["']""", down.group(1)))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None
