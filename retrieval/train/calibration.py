"""Calibration of the match probability, and the residual reranker's dual-cosine weight.

The match probability is ``sigmoid((logit - shift) / temperature)``, shift and
temperature fitted (Platt scaling) on held-out pairs drawn like training's
negatives: hard ones mined by the dual encoder, minimally different scenes'
captions and images, a few random ones, against as many positives.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluate import recall_at_k
from ..rerank import CrossAttentionITM, Reranker
from .data import Pool

NEGATIVE_MIX = {"mined_t2i": 0.15, "mined_i2t": 0.15, "swap_caption": 0.325, "swap_image": 0.325, "random": 0.05}
PAIR_KINDS = ("positive", *NEGATIVE_MIX)
DUAL_GRID = (5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 130, 160, 200, 300)


def sample_pairs(pool: Pool, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` (caption, image, label, kind) pairs: half positives, half hard and random negatives.

    Every negative is anchored on a positive pair (the same caption with
    another image, or the same image with another caption), so an item's mere
    presence says nothing about the label. ``kind`` indexes
    :data:`PAIR_KINDS`; the label comes from the keys. The pool needs mined
    negatives (``mined_t2i``/``mined_i2t``).
    """
    assert pool.mined_t2i is not None and pool.mined_i2t is not None
    n_pos = n // 2
    with_partners = np.array([i for i, p in enumerate(pool.partners) if p])
    kinds = [k for k in NEGATIVE_MIX if len(with_partners) or not k.startswith("swap")]
    p = np.array([NEGATIVE_MIX[k] for k in kinds])
    caps, imgs, kind_ids = [], [], []
    for kind, m in zip(kinds, rng.multinomial(n_pos, p / p.sum())):
        if not m:
            continue
        t = rng.choice(with_partners, size=m) if kind.startswith("swap") else rng.integers(len(pool.texts), size=m)
        img = pool.txt_img[t]
        if kind == "mined_t2i":  # the caption with an image the dual encoder ranks high
            c, i = t, pool.mined_t2i[t, rng.integers(pool.mined_t2i.shape[1], size=m)]
        elif kind == "mined_i2t":  # the image with a caption the dual encoder ranks high
            c, i = pool.mined_i2t[img, rng.integers(pool.mined_i2t.shape[1], size=m)], img
        elif kind.startswith("swap"):  # a minimally different scene's caption or image
            other = np.array([pool.partners[x][rng.integers(len(pool.partners[x]))] for x in t])
            c, i = (other, img) if kind == "swap_caption" else (t, pool.txt_img[other])
        else:
            flip = rng.random(m) < 0.5
            c = np.where(flip, rng.integers(len(pool.texts), size=m), t)
            i = np.where(flip, img, rng.integers(len(pool.img_key), size=m))
        caps += [t, c]
        imgs += [img, i]
        kind_ids += [np.zeros(m, np.int64), np.full(m, PAIR_KINDS.index(kind))]
    c, i = np.concatenate(caps), np.concatenate(imgs)
    return c, i, (pool.txt_key[c] == pool.img_key[i]).astype(np.float32), np.concatenate(kind_ids)


def pair_logits(module: CrossAttentionITM, pool: Pool, caps: np.ndarray, imgs: np.ndarray, batch: int = 512) -> np.ndarray:
    """Raw logits of (caption ``caps[j]``, image ``imgs[j]``) pairs, with their dual cosines."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(caps), batch):
            c, i = caps[s : s + batch], imgs[s : s + batch]
            dual = torch.from_numpy(np.einsum("nd,nd->n", pool.txt_vec[c], pool.img_vec[i]).astype(np.float32))
            out.append(module(pool.txt_tok[c], pool.txt_mask[c], pool.img_tok[i], dual).float().numpy())
    return np.concatenate(out) if out else np.empty(0, np.float32)


def accuracy_by_kind(logits: np.ndarray, labels: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """Share of pairs on the right side of probability 0.5, per kind of pair."""
    right = (logits > 0) == (labels > 0.5)
    return {name: float(right[kinds == k].mean()) for k, name in enumerate(PAIR_KINDS) if (kinds == k).any()}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the binary NLL of ``sigmoid(logit / T)``."""
    x, y = torch.from_numpy(logits).double(), torch.from_numpy(labels).double()

    def nll(t: float) -> float:
        return float(F.binary_cross_entropy_with_logits(x / t, y))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400))
    best = min(grid, key=nll)
    lo, hi = best / 1.02, best * 1.02
    for _ in range(60):  # golden-section refinement
        a, b = hi - (hi - lo) / 1.618, lo + (hi - lo) / 1.618
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return float((lo + hi) / 2)


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Shift c and temperature T minimising the binary NLL of ``sigmoid((logit - c) / T)``."""
    x, y = torch.from_numpy(logits).double(), torch.from_numpy(labels).double()
    scale = float(x.std()) or 1.0
    x = x / scale  # a well-conditioned problem for LBFGS
    w = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(w[0] * x + w[1], y)
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    a, b = float(w[0].detach()) / scale, float(w[1].detach())
    if a <= 0:  # logits carry no (or inverted) signal: fall back to the temperature alone
        return 0.0, fit_temperature(logits, labels)
    return -b / a, 1.0 / a


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large negative ``x``."""
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64))))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: bin by probability, compare mean probability with the positive rate."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(probs[sel].mean() - labels[sel].mean())
    return float(total)


def tune_dual(reranker: Reranker, pools: dict[str, Pool], log: Callable[[str], None], candidates: int = 50) -> dict:
    """Choose a residual reranker's dual-cosine weight by R@1 the way search uses it.

    In each validation pool (``"ordinary"`` and ``"minimal"``) every caption
    ranks the dual encoder's top ``candidates`` images by ``cross-attention
    logit + s * dual cosine`` for each ``s`` of :data:`DUAL_GRID`. The weight
    kept has the best mean of the two R@1s among those whose ordinary R@1 is
    at least the dual encoder's; when none is, the best ordinary R@1. The
    cross-attention logit does not depend on ``s``: it is computed once per query.
    Sets ``dual_scale`` and returns the table.
    """
    module = reranker.module
    grid = np.array(DUAL_GRID, np.float32)
    recall: dict[str, tuple[float, np.ndarray]] = {}
    for name, pool in pools.items():
        sims = pool.txt_vec @ pool.img_vec.T
        tok = pool.img_tok.numpy()
        firsts: list[list[list[int]]] = [[] for _ in grid]  # per weight, per caption: the key ranked first
        for t in range(len(pool.texts)):
            top = np.argsort(-sims[t], kind="stable")[:candidates]
            own = reranker.logits_images(pool.texts[t], tok[top], dual_scores=np.zeros(len(top), np.float32))
            best = np.argmax(own[None] + grid[:, None] * sims[t, top][None], axis=1)
            for g, b in enumerate(best):
                firsts[g].append([pool.img_key[top[b]]])
        own = pool.txt_key.tolist()
        dual = recall_at_k([[k] for k in pool.img_key[np.argmax(sims, 1)]], own, (1,))[1]
        recall[name] = (dual, np.array([recall_at_k(f, own, (1,))[1] for f in firsts]))
    ord_dual, ordinary = recall["ordinary"]
    mp_dual, minimal = recall["minimal"]
    ok = ordinary >= ord_dual
    pick = int(np.argmax(np.where(ok, ordinary + minimal, -1))) if ok.any() else int(np.argmax(ordinary))
    for s_, o, m in zip(grid, ordinary, minimal):
        log(f"dual weight {s_:5.0f}: ordinary t2i R@1 {o:.3f} (dual {ord_dual:.3f}), minimal pairs {m:.3f} "
            f"(dual {mp_dual:.3f})" + ("  <- kept" if s_ == grid[pick] else ""))
    with torch.no_grad():
        module.dual_scale.fill_(float(grid[pick]))
    return {"dual_scale": float(grid[pick]), "grid": grid.tolist(), "ordinary_r1": ordinary.tolist(),
            "minimal_r1": minimal.tolist(), "ordinary_dual_r1": ord_dual, "minimal_dual_r1": mp_dual,
            "n": len(pools["ordinary"].texts)}
