"""Removing images and corpora from a library: their rows, and their vectors
from every model's index (each index saved before the rows' commit, as for
every change: see :mod:`retrieval.durability`)."""

from __future__ import annotations

from typing import Sequence

from .errors import LibraryError
from .slot import ModelSlot
from .store import Store


def remove_images(store: Store, slots: Sequence[ModelSlot], roots: Sequence[str]) -> int:
    """Remove the images that are ``roots`` (normalised paths) or lie under them; how many."""
    if not roots:
        raise LibraryError("no path to remove")
    ids = [r.id for r in store.images_under(roots)]
    if ids:
        _remove_vectors(slots, ids, "images")
        store.delete_images(ids)
        store.commit()
    return len(ids)


def remove_corpus(store: Store, slots: Sequence[ModelSlot], corpus: str) -> int:
    """Remove every text of ``corpus``; how many."""
    ids = store.text_ids(corpus)
    if not ids:
        raise LibraryError(f"no corpus named {corpus!r}; corpora: {', '.join(store.corpora()) or 'none'}")
    _remove_vectors(slots, ids, "texts")
    store.delete_texts(ids)
    store.commit()
    return len(ids)


def _remove_vectors(slots: Sequence[ModelSlot], ids: list[int], kind: str) -> None:
    for slot in slots:
        if (slot.images if kind == "images" else slot.texts).remove(ids):
            slot.save(kind)
