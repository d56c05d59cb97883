"""Text ingest: a corpus file into the store and a model's text index.

New records become rows, changed ones are updated (and re-encoded), with
``replace`` records no longer in the file are removed; then every row of the
corpus that lacks a current vector for the model is encoded, with a
checkpoint (index save, then the vector rows' commit) every
:data:`CHECKPOINT_SECONDS`. :meth:`retrieval.Engine.add_texts` is the entry point.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .corpus import read_corpus
from .durability import Pending
from .errors import CorpusError
from .paths import is_utf8
from .slot import ModelSlot
from .store import Store, TextItem
from .types import TextsReport

#: Seconds between checkpoints while encoding texts.
CHECKPOINT_SECONDS = 30.0

Progress = Callable[[int, str, str], Any]  # (total, desc, unit) -> a tqdm-like bar


def add_texts(store: Store, slot: ModelSlot, path: Path, corpus: str | None, replace: bool, progress: Progress) -> TextsReport:
    """Read the corpus file ``path``, merge it into ``corpus`` (default: the
    file's stem) and encode what lacks a vector; returns counts."""
    parsed = read_corpus(path)
    corpus = corpus or path.stem
    if not corpus.strip() or not is_utf8(corpus):
        raise CorpusError(f"corpus name {corpus!r} is empty or not valid UTF-8; give one with --corpus NAME")
    report = TextsReport(scanned=parsed.read, failed=len(parsed.errors), errors=list(parsed.errors))
    rows = {r.ext_id: r for r in store.corpus_rows(corpus)}
    for rec in parsed.records:
        row = rows.get(rec.ext_id)
        if row is None:
            store.session.add(TextItem(corpus=corpus, ext_id=rec.ext_id, text=rec.text, meta=rec.meta, content_hash=rec.content_hash))
            report.added += 1
        elif row.content_hash != rec.content_hash or row.meta != rec.meta:
            if row.content_hash != rec.content_hash:
                report.updated += 1
            else:
                report.unchanged += 1
            row.text, row.meta, row.content_hash = rec.text, rec.meta, rec.content_hash
        else:
            report.unchanged += 1
    if replace:
        keep = {rec.ext_id for rec in parsed.records}
        drop = [r.id for k, r in rows.items() if k not in keep]
        if drop:
            slot.texts.remove(drop)
            store.delete_texts(drop)
            slot.save_texts()
            report.removed = len(drop)
    store.commit()
    encode_texts(store, slot, store.corpus_rows(corpus), progress)
    return report


def encode_texts(store: Store, slot: ModelSlot, rows: list[TextItem], progress: Progress, batch_size: int = 256) -> int:
    """Encode the ``rows`` without a current vector for ``slot``'s model; returns how many."""
    model_id = slot.row.id
    vec_map = store.text_vector_map(model_id)
    todo = [r for r in rows if vec_map.get(r.id) != r.content_hash]
    if not todo:
        return 0
    enc = slot.runtime("text")
    bar = progress(len(todo), "encoding texts", "text")
    last = time.monotonic()
    pending = Pending()
    try:
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            vecs = enc.encode_texts([r.text for r in part], batch_size=batch_size)
            slot.texts.add([r.id for r in part], vecs)
            pending.add([(r.id, r.content_hash) for r in part], vecs)
            bar.update(len(part))
            if time.monotonic() - last >= CHECKPOINT_SECONDS:
                _checkpoint(store, slot, pending)
                pending, last = Pending(), time.monotonic()
    finally:
        bar.close()
    _checkpoint(store, slot, pending)
    return len(todo)


def _checkpoint(store: Store, slot: ModelSlot, pending: Pending) -> None:
    slot.save_texts()
    slot.record_texts(pending.rows, pending.vectors())
    store.commit()
