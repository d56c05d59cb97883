"""Caption negatives for captioned folders: the same words, another meaning.

A dual encoder reads a caption almost as a bag of words, so "a dog chasing a
cat" and "a cat chasing a dog" land together; a reranker must tell them
apart. Each caption gets :data:`VARIANTS` perturbed versions: its relation
reversed (left/right, above/below, on/under...) where it has one, and two of
its content words swapped; a perturbation that leaves the caption unchanged
falls back to another caption of the set.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .data import text_features

if TYPE_CHECKING:  # pragma: no cover
    from ..encoders import Encoder

VARIANTS = 3
_OPPOSITES = {"left": "right", "above": "below", "over": "under", "on": "under", "top": "bottom", "front": "behind",
              "before": "after", "inside": "outside", "big": "small", "large": "small", "tall": "short"}
_OPPOSITES.update({v: k for k, v in list(_OPPOSITES.items())})
_STOP = {"a", "an", "the", "of", "to", "in", "on", "at", "and", "with", "is", "are", "its", "his", "her", "their",
         "some", "two", "three", "for", "by", "from", "this", "that", "there", "it"}


def reverse_relation(caption: str) -> str:
    """The caption with every relation word turned into its opposite."""
    return re.sub(r"[A-Za-z]+", lambda m: _match_case(m.group(0), _OPPOSITES.get(m.group(0).lower())), caption)


def _match_case(word: str, new: str | None) -> str:
    if new is None:
        return word
    return new.capitalize() if word[:1].isupper() else new


def swap_words(caption: str, rng: np.random.Generator) -> str:
    """The caption with two distinct content words (not articles or prepositions) trading places."""
    words = re.findall(r"[A-Za-z]+|[^A-Za-z]+", caption)
    content = [i for i, w in enumerate(words) if w[:1].isalpha() and w.lower() not in _STOP and len(w) > 2]
    pairs = [(a, b) for n, a in enumerate(content) for b in content[n + 1:] if words[a].lower() != words[b].lower()]
    if not pairs:
        return caption
    a, b = pairs[int(rng.integers(len(pairs)))]
    words[a], words[b] = words[b], words[a]
    return "".join(words)


def perturbed(captions: Sequence[str], seed: int) -> list[list[str]]:
    """:data:`VARIANTS` negatives per caption (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out = []
    for n, cap in enumerate(captions):
        variants = [reverse_relation(cap), swap_words(cap, rng), swap_words(cap, rng)]
        fixed = []
        for v in variants:
            if v.lower() == cap.lower() and len(captions) > 1:  # nothing to perturb: another caption instead
                other = int(rng.integers(len(captions) - 1))
                v = captions[other + (other >= n)]
            fixed.append(v)
        out.append(fixed)
    return out


def caption_negatives(encoder: Encoder, captions: Sequence[str], words: bool, seed: int = 0,
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], np.ndarray]:
    """Tokens ``(n, VARIANTS, L, T)``, masks and dual vectors ``(n, VARIANTS, D)``
    of every caption's perturbed versions."""
    flat = [v for vs in perturbed(captions, seed) for v in vs]
    tok, mask = text_features(encoder, flat, words)
    vec = encoder.encode_texts(flat)
    n = len(captions)
    return (tok.view(n, VARIANTS, *tok.shape[1:]), mask.view(n, VARIANTS, -1)), vec.reshape(n, VARIANTS, -1)
