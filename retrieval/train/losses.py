"""Losses of reranker training.

The main one is listwise over groups: every image of a group against every
caption of it, softmax over the captions for each image and over the images for
each caption (:func:`group_loss`). In a minimal-pair group every negative
differs from the positive by one swap; in a group the dual encoder finds alike,
every negative is one search could rank first.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..rerank import CrossAttentionITM
from .data import Pool


def group_pairs(groups: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Caption and image positions of every (image j, caption k) pair of each
    group of ``size`` consecutive items, row-major: ``[group, image, caption]``."""
    base = np.arange(groups)[:, None, None] * size
    ii = (base + np.arange(size)[None, :, None]).repeat(size, 2).reshape(-1)
    ti = (base + np.arange(size)[None, None, :]).repeat(size, 1).reshape(-1)
    return ti, ii


def group_logits(
    module: CrossAttentionITM, pool: Pool, idx: np.ndarray, size: int = 4, canonical: np.ndarray | None = None,
) -> torch.Tensor:
    """Logits ``[group, image, caption]`` of consecutive groups of ``size``
    captions ``idx`` (each with its own image), every image against every
    caption; each image is encoded once. ``canonical`` (per caption) reads
    those captions as their canonical scene keys. A residual module gets the
    pairs' dual cosines."""
    groups = len(idx) // size
    ti, ii = group_pairs(groups, size)
    text, mask = pool.txt_tok[idx], pool.txt_mask[idx]
    if canonical is not None:
        assert pool.canon_tok is not None and pool.canon_mask is not None
        use = torch.from_numpy(canonical)
        text = torch.where(use[:, None, None], pool.canon_tok[idx], text)
        mask = torch.where(use[:, None], pool.canon_mask[idx], mask)
    imgs = pool.txt_img[idx]
    dual = None
    if module.config.residual:
        dual = torch.from_numpy(np.einsum("nd,nd->n", pool.txt_vec[idx[ti]], pool.img_vec[imgs[ii]]).astype(np.float32))
    logits = module(text[ti], mask[ti], pool.img_tok[imgs], dual, image_index=torch.from_numpy(ii))
    return logits.view(groups, size, size)


def group_loss(logits: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each row (an image's captions) and each column (a caption's images)."""
    size = logits.shape[-1]
    target = torch.arange(size).repeat(logits.shape[0])
    return F.cross_entropy(logits.reshape(-1, size), target) + F.cross_entropy(logits.transpose(1, 2).reshape(-1, size), target)


def text_negative_loss(module: CrossAttentionITM, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                       dual: torch.Tensor | None) -> torch.Tensor:
    """Each image against its caption (first) and that caption's perturbed
    variants: ``image`` ``(n, P, F)``, ``text`` ``(n, c, L, T)``, ``mask``
    ``(n, c, L)``, ``dual`` ``(n, c)``; softmax over the ``c`` captions."""
    n, c = text.shape[:2]
    index = torch.arange(n).repeat_interleave(c)
    logits = module(text.flatten(0, 1), mask.flatten(0, 1), image, None if dual is None else dual.flatten(),
                    image_index=index).view(n, c)
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))


def shape_loss(module: CrossAttentionITM, head: torch.nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The local stem taught to read shape: a linear ``head`` (not saved) reads
    the shape under each object's centre patch from the stem's output."""
    assert module.local_in is not None
    first = image.to(module.head.weight.dtype).chunk(module.config.image_layers, dim=-1)[0]
    logits = head(module.local_in(first))
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1)
