#!/usr/bin/env python
"""Train the cross-attention reranker for one dual-encoder model.

The dual encoder stays frozen: image patch tokens, pooled vectors and text
tokens are computed once and kept in memory, then the reranker learns image-text
matching listwise (softmax over a positive and its hard negatives, both
directions, plus a group loss over minimal-pair groups of four):

* near misses mined with the dual encoder in both directions (highest-scoring
  items whose canonical ``scene`` key differs, or whose image differs when the
  data has no keys);
* for generated scenes (``scene`` parses with ``Scene.from_key``), the scene with
  swapped colours, swapped shapes and reversed relation, both as a caption
  against the true image and rendered as an image against the true caption.

A held-out split (by key) fits the temperature so the match probability is
calibrated. Weights are saved as float16 ``reranker.safetensors`` with
``reranker.json``. Unless ``--no-eval``, held-out shapes sets are then
evaluated (minimal-pairs retrieval, pairwise preference, ECE, latency) and, for
a bundled model, written into the "Reranker" section of its README.md.

Seeds: shapes-tiny trains on seeds >= 1000 and holds out 7, 8 and 9 (see
``retrieval/shapes.py``). The reranker trains on seeds 300 (ordinary) and 301
(minimal pairs) and is evaluated on the fresh seeds 11 (ordinary) and 12
(minimal pairs).

Example::

    python scripts/train_reranker.py --model shapes-tiny --minutes 20
    python scripts/train_reranker.py --model local-dir:/models/my-vit --data /data/captions-folder --steps 3000
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.encoders import Encoder, load_encoder  # noqa: E402
from retrieval.evaluate import hits_at_k, recall_at_k  # noqa: E402
from retrieval.rerank import CrossAttentionITM, Reranker, RerankerConfig, reranker_dirs  # noqa: E402

TRAIN_SEEDS = (300, 301)  # ordinary, minimal pairs
EVAL_SEEDS = (11, 12)  # ordinary, minimal pairs; never used for training
TUNE_SEEDS = (21, 22)  # ordinary, minimal pairs; only for choosing the dual-cosine weight (--tune-dual)
NEGATIVE_MIX = {"mined_t2i": 0.15, "mined_i2t": 0.15, "swap_caption": 0.325, "swap_image": 0.325, "random": 0.05}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------- data
@dataclass
class Pool:
    """Frozen-encoder features of a set of images and captions, with keys."""

    img_tok: torch.Tensor  # (Ni, P, Wi) float16 patch tokens
    img_vec: np.ndarray  # (Ni, D) float32 normalised
    img_key: np.ndarray  # (Ni,) int key id
    txt_tok: torch.Tensor  # (Nt, L, Wt) float16 text tokens
    txt_mask: torch.Tensor  # (Nt, L) bool
    txt_vec: np.ndarray  # (Nt, D)
    txt_key: np.ndarray  # (Nt,) int key id
    txt_img: np.ndarray  # (Nt,) the caption's own image
    texts: list[str]  # caption strings
    scenes: list[str | None]  # scene key per caption (None when not a generated scene)
    partners: list[list[int]] = field(default_factory=list)  # per caption: captions of minimally different scenes
    mined_t2i: np.ndarray | None = None  # (Nt, k) hardest wrong images per caption
    mined_i2t: np.ndarray | None = None  # (Ni, k) hardest wrong captions per image
    canon_tok: torch.Tensor | None = None  # (Nt, L, Wt) tokens of each caption's canonical scene key (--curriculum)
    canon_mask: torch.Tensor | None = None  # (Nt, L)


def read_records(data_dir: Path) -> list[dict]:
    with open(data_dir / "captions.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _parse_scene(key: str | None):
    if not key:
        return None
    try:
        from retrieval.shapes import Scene
    except ImportError:
        return None
    try:
        return Scene.from_key(key)
    except (ValueError, TypeError):
        return None


def build_pool(
    encoder: Encoder, root: Path, records: list[dict], perturb: bool, seed: int, hard_k: int,
    layer: str = "final", words: bool = False, canonical: bool = False,
) -> Pool:
    """Load images, add perturbed scenes, encode everything once, mine negatives.

    Patch tokens are taken at ``layer`` and text tokens carry word embeddings
    when ``words`` (the reranker's ``image_layer`` and ``text_words``);
    ``canonical`` also keeps the tokens of each generated scene's canonical key."""
    images: list = []
    path_index: dict[str, int] = {}
    texts: list[str] = []
    txt_img: list[int] = []
    keys: list[str] = []  # per caption
    scenes: list[str | None] = []
    img_keys: list[str] = []
    for rec in records:
        path = rec["image"]
        if path not in path_index:
            with Image.open(root / path) as im:
                images.append(im.convert("RGB"))
            path_index[path] = len(images) - 1
            img_keys.append(rec.get("scene") or path)
        texts.append(rec["caption"])
        txt_img.append(path_index[path])
        keys.append(rec.get("scene") or path)
        scenes.append(rec.get("scene"))
    partners: list[list[int]] = [[] for _ in texts]
    n_orig = len(texts)
    if perturb:
        from retrieval.shapes import reverse_relation, swap_colors, swap_shapes

        size = images[0].size[0] if images else 64
        for t in range(n_orig):
            scene = _parse_scene(scenes[t])
            if scene is None:
                continue
            group = [t]
            for j, fn in enumerate((swap_colors, swap_shapes, reverse_relation)):
                other = fn(scene)
                if other is None:
                    continue
                g = np.random.default_rng([seed, t, j])
                texts.append(other.caption(g))
                images.append(other.render(size, g))
                img_keys.append(other.key())
                txt_img.append(len(images) - 1)
                keys.append(other.key())
                scenes.append(other.key())
                partners.append([])
                group.append(len(texts) - 1)
            for a in group:
                partners[a].extend(b for b in group if b != a)
    log(f"pool: {len(images)} images, {len(texts)} captions ({len(texts) - n_orig} perturbed)")
    key_ids: dict[str, int] = {}
    txt_key = np.array([key_ids.setdefault(k, len(key_ids)) for k in keys])
    img_key = np.array([key_ids.setdefault(k, len(key_ids)) for k in img_keys])

    vecs, toks = [], []
    for start in range(0, len(images), 256):
        v, tok = encoder.encode_images(
            encoder.image_batch(images[start : start + 256]), with_tokens=True, token_layer=layer
        )
        vecs.append(v)
        toks.append(torch.from_numpy(tok))
    img_vec, img_tok = np.concatenate(vecs), torch.cat(toks)
    txt_vec = encoder.encode_texts(texts)
    txt_tok, mask = _text_features(encoder, texts, words)
    canon = None
    if canonical:  # each generated scene's caption as its canonical key, for --curriculum
        keyed = [k if _parse_scene(k) is not None else t for k, t in zip(scenes, texts)]
        canon = _text_features(encoder, keyed, words)
        length = max(txt_tok.shape[1], canon[0].shape[1])
        txt_tok, mask = _pad_to(txt_tok, mask, length)
        canon = _pad_to(*canon, length)
    pool = Pool(img_tok, img_vec, img_key, txt_tok, mask, txt_vec, txt_key, np.array(txt_img), texts, scenes, partners)
    if canon is not None:
        pool.canon_tok, pool.canon_mask = canon
    pool.mined_t2i = _mine(txt_vec, img_vec, txt_key, img_key, hard_k)
    pool.mined_i2t = _mine(img_vec, txt_vec, img_key, txt_key, hard_k)
    return pool


def _text_features(encoder: Encoder, texts: list[str], words: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 text tokens and masks of ``texts``, padded to the longest of them."""
    ttoks, masks = [], []
    with torch.inference_mode():
        for start in range(0, len(texts), 512):
            tok, mask = encoder.text_tokens(texts[start : start + 512], words=words)
            ttoks.append(tok.to("cpu", torch.float16))
            masks.append(mask.cpu())
    # Batches come cut to their own longest text; pad them to the longest of all.
    length = max(int(m.sum(1).max()) for m in masks) if masks else 1
    padded = [_pad_to(t, m, length) for t, m in zip(ttoks, masks)]
    if not padded:
        return torch.zeros(0, 1, 1, dtype=torch.float16), torch.zeros(0, 1, dtype=torch.bool)
    return torch.cat([t for t, _ in padded]).clone(), torch.cat([m for _, m in padded]).clone()


def _pad_to(tok: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok, mask = tok[:, :length], mask[:, :length]
    return F.pad(tok, (0, 0, 0, length - tok.shape[1])), F.pad(mask, (0, length - mask.shape[1]))


def _mine(q: np.ndarray, c: np.ndarray, q_key: np.ndarray, c_key: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest-scoring candidates with a different key, per query."""
    k = min(k, len(c) - 1)
    out = np.zeros((len(q), max(k, 1)), np.int64)
    if k < 1:
        return out
    cv, ck = torch.from_numpy(c), torch.from_numpy(c_key)
    for start in range(0, len(q), 1024):
        s = torch.from_numpy(q[start : start + 1024]) @ cv.T
        s[torch.from_numpy(q_key[start : start + 1024])[:, None] == ck[None]] = -math.inf
        out[start : start + len(s)] = s.topk(k, dim=1).indices.numpy()
    return out


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split by key (scene, else image), so no calibration key is seen in training."""
    keys = sorted({r.get("scene") or r["image"] for r in records})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(len(keys), size=max(1, int(len(keys) * fraction)), replace=False).tolist())
    held_keys = {keys[i] for i in held}
    train = [r for r in records if (r.get("scene") or r["image"]) not in held_keys]
    calib = [r for r in records if (r.get("scene") or r["image"]) in held_keys]
    return train, calib


PAIR_KINDS = ("positive", *NEGATIVE_MIX)


def sample_pairs(pool: Pool, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` (caption, image, label, kind) pairs: half positives, half hard and random negatives.

    Every negative is anchored on a positive pair of the batch (the same
    caption with another image, or the same image with another caption), so
    an item's mere presence says nothing about the label: only the match does.
    ``kind`` indexes :data:`PAIR_KINDS`; the label comes from the keys, so a
    random "negative" that happens to match is labelled positive.
    """
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


def dual_cosine(pool: Pool, caps: np.ndarray, imgs: np.ndarray) -> torch.Tensor:
    """The dual encoder's cosine of each (caption, image) pair."""
    return torch.from_numpy(np.einsum("nd,nd->n", pool.txt_vec[caps], pool.img_vec[imgs]).astype(np.float32))


def pair_logits(module: CrossAttentionITM, pool: Pool, caps: np.ndarray, imgs: np.ndarray, batch: int = 512) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for s in range(0, len(caps), batch):
            c, i = caps[s : s + batch], imgs[s : s + batch]
            out.append(module(pool.txt_tok[c], pool.txt_mask[c], pool.img_tok[i], dual_cosine(pool, c, i)).numpy())
    return np.concatenate(out) if out else np.empty(0, np.float32)


def sample_groups(pool: Pool, n: int, group: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Listwise groups in both directions: ``n`` captions each with ``group``
    candidate images, then ``n`` images each with ``group`` candidate captions.

    Candidate 0 is the positive; the others are the minimal-pair variants of its
    scene (colours swapped, shapes swapped, relation reversed) and dual-encoder
    near misses filling the group. Returns flat caption and image indices
    ``(2 * n * group,)``, the valid-candidate mask ``(2 * n, group)`` (False on
    a "negative" that matches the query's key) and the number of groups.
    """
    with_partners = np.array([i for i, p in enumerate(pool.partners) if p], np.int64)
    k_t2i, k_i2t = pool.mined_t2i.shape[1], pool.mined_i2t.shape[1]

    def anchors() -> np.ndarray:
        # Half the queries from scenes with rendered minimal pairs, half from anywhere.
        if not len(with_partners):
            return rng.integers(len(pool.texts), size=n)
        half = n // 2
        return np.concatenate([rng.choice(with_partners, size=half), rng.integers(len(pool.texts), size=n - half)])

    caps, imgs, valid = [], [], []
    for t in anchors():  # text -> images
        cands = [int(pool.txt_img[t])] + [int(pool.txt_img[p]) for p in pool.partners[t]][: group - 1]
        mined = pool.mined_t2i[t, rng.permutation(k_t2i)]
        cands += [int(x) for x in mined[: group - len(cands)]]
        cands += list(rng.integers(len(pool.img_key), size=group - len(cands)))
        cands = np.array(cands)
        caps.append(np.full(group, t))
        imgs.append(cands)
        valid.append(np.r_[True, pool.img_key[cands[1:]] != pool.txt_key[t]])
    for t in anchors():  # image -> texts
        i = int(pool.txt_img[t])
        cands = [int(t)] + list(pool.partners[t])[: group - 1]
        mined = pool.mined_i2t[i, rng.permutation(k_i2t)]
        cands += [int(x) for x in mined[: group - len(cands)]]
        cands += list(rng.integers(len(pool.texts), size=group - len(cands)))
        cands = np.array(cands)
        caps.append(cands)
        imgs.append(np.full(group, i))
        valid.append(np.r_[True, pool.txt_key[cands[1:]] != pool.img_key[i]])
    return np.concatenate(caps), np.concatenate(imgs), np.stack(valid), 2 * n


# ------------------------------------------------------------------ training
def minimal_groups(pool: Pool) -> np.ndarray:
    """``(G, 4)`` caption indices: each generated scene with its three minimal
    variants (colours swapped, shapes swapped, relation reversed), once per
    group and only where all four keys differ."""
    seen: set[tuple[int, ...]] = set()
    for t, partners in enumerate(pool.partners):
        group = tuple(sorted([t, *partners]))
        if len(group) == 4 and len(set(pool.txt_key[list(group)].tolist())) == 4:
            seen.add(group)
    return np.array(sorted(seen), np.int64).reshape(-1, 4)


def group_pairs(groups: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Caption and image positions of every (image j, caption k) pair of each
    group of ``size`` consecutive items, row-major: ``[group, image, caption]``."""
    base = np.arange(groups)[:, None, None] * size
    ii = (base + np.arange(size)[None, :, None]).repeat(size, 2).reshape(-1)
    ti = (base + np.arange(size)[None, None, :]).repeat(size, 1).reshape(-1)
    return ti, ii


def group_loss(
    module: CrossAttentionITM, pool: Pool, groups: np.ndarray, canonical: np.ndarray | None = None
) -> torch.Tensor:
    """Every image of each minimal group against every caption of it: softmax
    over the captions for each image and over the images for each caption, so
    every negative differs from the positive by one swap. Each image is encoded
    once. ``canonical`` (per group) reads those captions as their canonical
    scene keys."""
    g, size = groups.shape
    caps = groups.reshape(-1)
    imgs = pool.txt_img[caps]
    text, mask = pool.txt_tok[caps], pool.txt_mask[caps]
    if canonical is not None and canonical.any():
        assert pool.canon_tok is not None and pool.canon_mask is not None
        use = torch.from_numpy(np.repeat(canonical, size))
        text = torch.where(use[:, None, None], pool.canon_tok[caps], text)
        mask = torch.where(use[:, None], pool.canon_mask[caps], mask)
    ti, ii = group_pairs(g, size)
    dual = dual_cosine(pool, caps[ti], imgs[ii])
    logits = module(text[ti], mask[ti], pool.img_tok[imgs], dual, image_index=torch.from_numpy(ii)).view(g, size, size)
    target = torch.arange(size).repeat(g)
    return F.cross_entropy(logits.reshape(-1, size), target) + F.cross_entropy(logits.transpose(1, 2).reshape(-1, size), target)


def train_module(module: CrossAttentionITM, pool: Pool, args: argparse.Namespace) -> dict:
    """Listwise matching on mined groups, plus the group loss on minimal-pair
    groups; warm-up and cosine decay over steps or wall time, whichever ends first."""
    minimal = minimal_groups(pool) if args.minimal_groups else np.zeros((0, 4), np.int64)
    log(f"{len(minimal)} minimal-pair groups of four for the group loss")
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    budget = args.minutes * 60 if args.minutes else math.inf
    steps = args.steps or 10**9
    warmup = max(1, min(args.warmup, steps // 10))
    start, step, ema, window = time.monotonic(), 0, None, []
    group_window: list[float] = []
    module.train()
    while True:
        progress = max(step / steps, (time.monotonic() - start) / budget)
        if progress >= 1:
            break
        # Warm-up ends after --warmup steps or 5% of the run, whichever comes first.
        ramp = min(1.0, max((step + 1) / warmup, progress / 0.05))
        lr = args.lr * ramp * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        c, i, valid, groups = sample_groups(pool, args.groups, args.group_size, rng)
        logits = module(pool.txt_tok[c], pool.txt_mask[c], pool.img_tok[i], dual_cosine(pool, c, i))
        logits = logits.view(groups, args.group_size).masked_fill(~torch.from_numpy(valid), -1e4)
        loss = F.cross_entropy(logits, torch.zeros(groups, dtype=torch.long))
        if len(minimal):
            picked = minimal[rng.integers(len(minimal), size=args.minimal_groups)]
            canonical = None
            if args.curriculum:  # canonical captions only for N steps, then fading out over N more
                share = min(1.0, max(0.0, 2.0 - step / args.curriculum))
                canonical = rng.random(len(picked)) < share
            grouped = group_loss(module, pool, picked, canonical)
            loss = loss + grouped
            group_window.append(grouped.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        window.append(loss.item())
        if step == 1 or step % 50 == 0:
            parts = f" (minimal groups {np.mean(group_window):.4f})" if group_window else ""
            log(f"step {step} loss {np.mean(window):.4f}{parts} (last {len(window)}) lr {lr:.2e} "
                f"elapsed {time.monotonic() - start:.0f}s")
            window, group_window = [], []
    module.eval()
    return {"steps": step, "seconds": time.monotonic() - start, "final_loss": ema}


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


def tune_dual_scale(module: CrossAttentionITM, encoder: Encoder, args: argparse.Namespace, work: Path) -> dict:
    """Choose a residual reranker's dual-cosine weight by R@1 the way search uses it.

    On fresh validation scenes (seeds :data:`TUNE_SEEDS`, ``--tune-n`` each,
    ordinary and minimal pairs) every caption ranks the dual encoder's top 50
    images by ``cross-attention logit + s * dual cosine`` for each ``s`` of a
    grid. The weight kept is the one with the best mean of the two R@1s among
    those whose ordinary-scene R@1 is at least the dual encoder's; when none
    is, the one with the best ordinary R@1. The cross-attention logit does not
    depend on ``s``, so it is computed once per query.
    """
    reranker = Reranker(module, encoder)
    recall: dict[str, tuple[float, np.ndarray]] = {}
    grid = np.array([5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 130, 160, 200, 300], np.float32)
    for name, seed, minimal in (("ordinary", TUNE_SEEDS[0], False), ("minimal", TUNE_SEEDS[1], True)):
        pool = eval_pool(encoder, module.config, seed, args.tune_n, minimal, work, perturb=False, hard_k=1)
        sims = pool.txt_vec @ pool.img_vec.T
        tok = pool.img_tok.numpy()
        firsts: list[list[list[int]]] = [[] for _ in grid]  # per weight, per caption: the key ranked first
        for t in range(len(pool.texts)):
            top = np.argsort(-sims[t], kind="stable")[:50]
            own = reranker.logits_images(pool.texts[t], tok[top], dual_scores=np.zeros(len(top), np.float32))
            best = np.argmax(own[None] + grid[:, None] * sims[t, top][None], axis=1)
            for g, b in enumerate(best):
                firsts[g].append([pool.img_key[top[b]]])
        dual = recall_at_k([[k] for k in pool.img_key[np.argmax(sims, 1)]], pool.txt_key, (1,))[1]
        recall[name] = (dual, np.array([recall_at_k(f, pool.txt_key, (1,))[1] for f in firsts]))
    ord_dual, ordinary = recall["ordinary"]
    mp_dual, minimal = recall["minimal"]
    ok = ordinary >= ord_dual
    pick = int(np.argmax(np.where(ok, ordinary + minimal, -1))) if ok.any() else int(np.argmax(ordinary))
    for s_, o, m in zip(grid, ordinary, minimal):
        log(f"dual weight {s_:5.0f}: ordinary t2i R@1 {o:.3f} (dual {ord_dual:.3f}), minimal pairs {m:.3f} (dual {mp_dual:.3f})"
            + ("  <- kept" if s_ == grid[pick] else ""))
    with torch.no_grad():
        module.dual_scale.fill_(float(grid[pick]))
    return {"dual_scale": float(grid[pick]), "grid": grid.tolist(), "ordinary_r1": ordinary.tolist(),
            "minimal_r1": minimal.tolist(), "ordinary_dual_r1": ord_dual, "minimal_dual_r1": mp_dual, "n": args.tune_n}


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

    opt.step(closure)
    a, b = float(w[0].detach()) / scale, float(w[1].detach())
    if a <= 0:  # logits carry no (or inverted) signal: fall back to the temperature alone
        return 0.0, fit_temperature(logits, labels)
    return -b / a, 1.0 / a


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large negative ``x``."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of a match probability: bin by p, compare mean p with the positive rate."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(probs[sel].mean() - labels[sel].mean())
    return float(total)


# ---------------------------------------------------------------- evaluation
def retrieval_eval(reranker: Reranker, pool: Pool, candidates: int = 50) -> dict:
    """t2i and i2t R@1 of the dual encoder and after re-ranking its top candidates (relevance by key)."""
    sims = pool.txt_vec @ pool.img_vec.T  # (Nt, Ni)
    tok = pool.img_tok.numpy()
    res: dict[str, float] = {}
    # text -> image: every caption a query, the whole image set the gallery
    dual_first, rr_first = [], []
    for t in range(len(pool.texts)):
        top = np.argsort(-sims[t], kind="stable")[:candidates]
        best = reranker.rank(pool.texts[t], tok[top], top_k=1, dual_scores=sims[t, top])[0].index
        dual_first.append([pool.img_key[top[0]]])
        rr_first.append([pool.img_key[top[best]]])
    d, r = hits_at_k(dual_first, pool.txt_key, 1), hits_at_k(rr_first, pool.txt_key, 1)
    res["t2i_r1_dual"], res["t2i_r1_rerank"] = recall_at_k(dual_first, pool.txt_key, (1,))[1], recall_at_k(rr_first, pool.txt_key, (1,))[1]
    res["t2i_misses_dual"] = int((~d).sum())
    res["t2i_misses_fixed"] = float((r & ~d).sum() / max(1, (~d).sum()))
    res["t2i_new_misses"] = int((d & ~r).sum())
    # image -> text: every image a query, the captions the gallery
    dual_first, rr_first = [], []
    for i in range(len(pool.img_key)):
        top = np.argsort(-sims[:, i], kind="stable")[:candidates]
        best = reranker.rank(tok[i], [pool.texts[c] for c in top], top_k=1, dual_scores=sims[top, i])[0].index
        dual_first.append([pool.txt_key[top[0]]])
        rr_first.append([pool.txt_key[top[best]]])
    d, r = hits_at_k(dual_first, pool.img_key, 1), hits_at_k(rr_first, pool.img_key, 1)
    res["i2t_r1_dual"], res["i2t_r1_rerank"] = recall_at_k(dual_first, pool.img_key, (1,))[1], recall_at_k(rr_first, pool.img_key, (1,))[1]
    res["i2t_misses_fixed"] = float((r & ~d).sum() / max(1, (~d).sum()))
    return res


def pairwise_eval(reranker: Reranker, encoder: Encoder, pool: Pool, seed: int) -> dict:
    """True caption vs the same phrasing of a perturbed scene, on held-out images."""
    from retrieval.shapes import reverse_relation, swap_colors, swap_shapes

    tok = pool.img_tok.numpy()
    out: dict[str, float] = {}
    all_rr, all_dual = [], []
    for name, fn in (("colors", swap_colors), ("shapes", swap_shapes), ("relation", reverse_relation)):
        rr, dual = [], []
        for t in range(len(pool.texts)):
            scene = _parse_scene(pool.scenes[t])
            other = fn(scene) if scene is not None else None
            if other is None:
                continue
            true_cap = scene.caption(np.random.default_rng([seed, t]))
            false_cap = other.caption(np.random.default_rng([seed, t]))
            i = pool.txt_img[t]
            v = encoder.encode_texts([true_cap, false_cap]) @ pool.img_vec[i]
            p = reranker.logits_texts(tok[i], [true_cap, false_cap], dual_scores=v)
            rr.append(p[0] > p[1])
            dual.append(v[0] > v[1])
        out[f"pairwise_{name}_rerank"], out[f"pairwise_{name}_dual"] = float(np.mean(rr)), float(np.mean(dual))
        out[f"pairwise_{name}_n"] = len(rr)
        all_rr += rr
        all_dual += dual
    out["pairwise_rerank"], out["pairwise_dual"], out["pairwise_n"] = float(np.mean(all_rr)), float(np.mean(all_dual)), len(all_rr)
    return out


def eval_pool(
    encoder: Encoder, cfg: RerankerConfig, seed: int, n: int, minimal_pairs: bool, work: Path, perturb: bool, hard_k: int
) -> Pool:
    from retrieval.shapes import generate

    where = work / f"eval-{seed}{'-minimal' if minimal_pairs else ''}"
    records = generate(where, n, seed, minimal_pairs=minimal_pairs)
    return build_pool(encoder, where, records, perturb=perturb, seed=seed + 50_000, hard_k=hard_k,
                      layer=cfg.image_layer, words=cfg.text_words)


def write_card(card: Path, text: str) -> None:
    """Replace or append the "## Reranker" section of a model card, leaving the rest as it is."""
    old = card.read_text(encoding="utf-8") if card.exists() else ""
    section = re.compile(r"^## Reranker\n.*?(?=^## |\Z)", re.S | re.M)
    if section.search(old):
        new = section.sub(lambda _: text.rstrip("\n") + "\n\n", old).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text.rstrip("\n") + "\n"
    card.write_text(new, encoding="utf-8")


def card_section(args: argparse.Namespace, cfg: RerankerConfig, info: dict, m: dict, out: Path) -> str:
    size_mb = (out / "reranker.safetensors").stat().st_size / 1e6

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    lines = [
        "## Reranker",
        "",
        "A cross-attention image-text matching model (ALBEF/BLIP style) over this model's frozen",
        f"tokens: width {cfg.width}, {cfg.image_depth} image self-attention block(s) over the {cfg.image_tokens} patch tokens "
        f"of layer `{cfg.image_layer}`"
        + (f" (plus a local stem, hidden width {cfg.image_local}, over each patch's 3x3 neighbourhood)" if cfg.image_local else ""),
        f"(each with its fixed 2-D place), then {cfg.depth} blocks of [text self-attention, cross-attention to the patches,",
        f"MLP], {cfg.heads} heads, a learned [ITM] token and a logit head; text tokens are the tower's outputs"
        + (" beside its input word embeddings" if cfg.text_words else "") + (";" if not cfg.residual else ","),
        f"match probability = sigmoid((logit - {cfg.shift:.3f}) / {cfg.temperature:.3f}), shift and temperature fitted on a held-out",
        f"calibration split of balanced pairs. Files: `reranker.safetensors` (float16, {size_mb:.1f} MB), `reranker.json`.",
        "",
        *([f"Started from the reranker in `{args.init}`; for the bundled shapes-tiny that is the lab stages of",
           "`scripts/train_shapes_reranker.sh` (see docs/reranker.md)."] if args.init else []),
        *([f"The dual-cosine weight, {info['tune_dual']['dual_scale']:.0f}, was chosen by top-50 re-ranked t2i R@1 on fresh validation",
           f"scenes (seeds {TUNE_SEEDS[0]} and {TUNE_SEEDS[1]}, {info['tune_dual']['n']} each): the best mean of minimal-pairs and",
           "ordinary-scene R@1 that keeps ordinary R@1 at least the dual encoder's (`--tune-dual`)."] if "tune_dual" in info else []),
        *([f"Calibrated by `{info['command']}` (no further training; {info['total_minutes']:.1f} min) on a split of seeds",
           f"{args.seed} (ordinary) and {args.seed + 1} (minimal pairs) with their swapped-colour, swapped-shape and",
           "reversed-relation scenes and dual-encoder-mined near misses. Evaluated on fresh seeds "
           + f"{EVAL_SEEDS[0]}"] if info["steps"] == 0 else [
        f"Trained by `{info['command']}` on CPU: {info['steps']} steps of "
        + (f"{args.minimal_groups} minimal-pair groups of four (each image against each caption, softmax both ways) and "
           if args.minimal_groups else "")
        + f"{2 * args.groups} listwise groups of {args.group_size} candidates (softmax cross-entropy, both directions) in",
        f"{info['seconds'] / 60:.1f} min (whole run {info['total_minutes']:.1f} min), on seeds {args.seed} (ordinary, "
        f"{info['n_ordinary']} scenes) and {args.seed + 1} (minimal pairs, {info['n_minimal']} scenes) with their swapped-colour,",
        "swapped-shape and reversed-relation scenes rendered as hard negatives, plus dual-encoder-mined",
        "near misses in both directions. Evaluated on fresh seeds "
        + f"{EVAL_SEEDS[0]}"]),
        f"(ordinary) and {EVAL_SEEDS[1]} (minimal pairs), used neither here nor for the dual encoder.",
        "",
        "| measure (held out) | dual encoder | re-ranked | target |",
        "| --- | --- | --- | --- |",
        f"| minimal pairs, t2i R@1 (1000 images, top-50 re-ranked) | {m['mp_t2i_r1_dual']:.3f} | {m['mp_t2i_r1_rerank']:.3f} | >= 0.90 |",
        f"| minimal pairs, dual-encoder t2i R@1 misses fixed | ({m['mp_t2i_misses_dual']} misses) | {pct(m['mp_t2i_misses_fixed'])} | >= 70% |",
        f"| minimal pairs, i2t R@1 (top-50 of 1000 captions) | {m['mp_i2t_r1_dual']:.3f} | {m['mp_i2t_r1_rerank']:.3f} | >= 0.85 |",
        f"| ordinary scenes, t2i R@1 (1000 images) | {m['ord_t2i_r1_dual']:.3f} | {m['ord_t2i_r1_rerank']:.3f} | |",
        f"| ordinary scenes, i2t R@1 | {m['ord_i2t_r1_dual']:.3f} | {m['ord_i2t_r1_rerank']:.3f} | |",
        f"| pairwise: true caption preferred, colours swapped (n={m['pairwise_colors_n']}) | {pct(m['pairwise_colors_dual'])} | {pct(m['pairwise_colors_rerank'])} | |",
        f"| pairwise: shapes swapped (n={m['pairwise_shapes_n']}) | {pct(m['pairwise_shapes_dual'])} | {pct(m['pairwise_shapes_rerank'])} | |",
        f"| pairwise: relation reversed (n={m['pairwise_relation_n']}) | {pct(m['pairwise_relation_dual'])} | {pct(m['pairwise_relation_rerank'])} | |",
        f"| pairwise: all (n={m['pairwise_n']}) | {pct(m['pairwise_dual'])} | {pct(m['pairwise_rerank'])} | >= 95% |",
        f"| ECE, 15 bins, {m['ece_pairs']} balanced pairs with hard negatives | | {m['ece']:.3f} (before calibration {m['ece_uncalibrated']:.3f}) | <= 0.05 |",
        f"| latency, 50 candidates for one text query (median of 50) | | {m['latency_ms']:.1f} ms | <= 100 ms |",
    ]
    if "latency_b32_ms" in m:
        lines.append(f"| latency, same with a random-weight ViT-B-32 and a reranker of this shape | | {m['latency_b32_ms']:.1f} ms | |")
    lines += [
        "",
        "R@1 counts a hit when the top item has the query's canonical scene key. The pairwise test",
        "phrases the true and the perturbed caption identically (same random choices); the dual",
        "encoder's rate compares cosines. Latency is `Reranker.score_images` with stored float16",
        f"tokens in memory, text tokens computed once per query, {torch.get_num_threads()} CPU threads;",
        "`python scripts/bench_reranker.py` measures it again.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-tiny", help="dual-encoder model spec (default: shapes-tiny)")
    p.add_argument("--data", type=Path, help="folder with captions.jsonl; default: generate shapes scenes")
    p.add_argument("--generate", type=int, default=6000, help="scenes to generate when --data is not given")
    p.add_argument("--minimal-fraction", type=float, default=0.4, help="share of generated scenes drawn as minimal-pair groups")
    p.add_argument("--seed", type=int, default=TRAIN_SEEDS[0], help="training seed (generated data uses SEED and SEED+1)")
    p.add_argument("--work", type=Path, help="folder for generated data (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="output folder (default: the model's folder, else the reranker cache)")
    p.add_argument("--minutes", type=float, default=16.0, help="wall-clock cap on the training loop")
    p.add_argument("--steps", type=int, help="cap on training steps (0 with --init: only calibrate and evaluate)")
    p.add_argument("--groups", type=int, default=12, help="query groups per direction per step")
    p.add_argument("--group-size", type=int, default=8, help="candidates per group (1 positive)")
    p.add_argument("--no-residual", dest="residual", action="store_false",
                   help="score from the cross-attention alone, not as a correction of the dual encoder's cosine")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=1.0, help="clip the gradient norm at this value (0: no clipping)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--image-layer", default="final",
                   help="vision-tower layer whose patch tokens the reranker reads: final, embed, blockK, or two joined by + (embed+final: each patch's tokens of both; default: final)")
    p.add_argument("--words", action="store_true",
                   help="give the reranker the text tower's input word embeddings beside its output tokens")
    p.add_argument("--image-depth", type=int, default=0, help="image self-attention blocks before cross-attention")
    p.add_argument("--image-local", type=int, default=0, metavar="H",
                   help="hidden width of a local stem over each patch's 3x3 neighbourhood of first-layer tokens "
                        "(the outline of small objects; 0: none)")
    p.add_argument("--minimal-groups", type=int, default=32,
                   help="minimal-pair groups of four (a scene, colours swapped, shapes swapped, relation "
                        "reversed) per step, each image against each caption; 0 to skip")
    p.add_argument("--curriculum", type=int, default=0,
                   help="read the minimal groups' captions as their canonical scene keys for the first N steps, "
                        "then fade to the real captions over N more (generated scenes only)")
    p.add_argument("--init", type=Path, help="continue training the reranker saved in this folder")
    p.add_argument("--tune-dual", action="store_true",
                   help="(residual rerankers, generated scenes) after training, choose the dual-cosine weight by top-50 "
                        f"re-ranked R@1 on fresh validation scenes (seeds {TUNE_SEEDS[0]} and {TUNE_SEEDS[1]}): the best "
                        "mean of ordinary and minimal-pairs R@1 that keeps ordinary R@1 at least the dual encoder's")
    p.add_argument("--tune-n", type=int, default=600, help="with --tune-dual: scenes in each validation set")
    p.add_argument("--hard-k", type=int, default=10, help="mined negatives kept per query")
    p.add_argument("--calib-fraction", type=float, default=0.1, help="share of keys held out to fit the temperature")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the held-out evaluation and model card")
    p.add_argument("--eval-n", type=int, default=1000, help="images in each held-out evaluation set")
    p.add_argument("--no-bench-b32", dest="bench_b32", action="store_false", help="skip the random ViT-B-32 latency check")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--card", type=Path, help="model card to update (default: README.md in --out when it is the model folder)")
    args = p.parse_args(argv)
    if args.tune_dual and args.data is not None:
        p.error("--tune-dual chooses the weight on generated shapes scenes; it goes without --data")
    if args.steps == 0 and not args.init:
        p.error("--steps 0 calibrates and evaluates a saved reranker; give it with --init")
    return args


def main(argv: list[str] | None = None) -> Reranker:
    args = parse_args(argv)
    t_start = time.monotonic()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = load_encoder(args.model, device="cpu")
    out = args.out or reranker_dirs(encoder.spec)[0]
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="crossfind-reranker-")
        work = Path(tmp.name)
    info: dict = {"command": "python scripts/train_reranker.py " + " ".join(argv if argv is not None else sys.argv[1:])}

    if args.data is not None:
        root, records = args.data, read_records(args.data)
        info["n_ordinary"], info["n_minimal"] = len(records), 0
    else:
        from retrieval.shapes import generate

        n_min = int(args.generate * args.minimal_fraction) // 4 * 4
        log(f"generating {args.generate - n_min} ordinary (seed {args.seed}) and {n_min} minimal-pair scenes (seed {args.seed + 1})")
        root = work / "train"
        records = generate(root / "ordinary", args.generate - n_min, args.seed)
        records = [{**r, "image": f"ordinary/{r['image']}"} for r in records]
        minimal = generate(root / "minimal", n_min, args.seed + 1, minimal_pairs=True) if n_min else []
        records += [{**r, "image": f"minimal/{r['image']}"} for r in minimal]
        info["n_ordinary"], info["n_minimal"] = args.generate - n_min, n_min
    if args.init is not None:  # continue from a saved reranker (its shape wins over --width/--depth/--heads)
        module = Reranker.load(args.init, encoder).module.float()
        cfg = module.config
        log(f"continuing from {args.init}")
    else:
        cfg = RerankerConfig.for_encoder(
            encoder, width=args.width, depth=args.depth, heads=args.heads, dropout=args.dropout,
            residual=args.residual, image_layer=args.image_layer, text_words=args.words, image_depth=args.image_depth,
            image_local=args.image_local,
        )
        try:
            encoder.image_tokens(encoder.image_batch([Image.new("RGB", (8, 8))]), layer=cfg.image_layer)
        except ValueError as exc:
            raise SystemExit(f"--image-layer: {exc}") from None
        module = CrossAttentionITM(cfg)
        if cfg.residual:  # start as the dual encoder: its own logit scale on the cosine
            scale = float(encoder.model.logit_scale.detach().exp()) if hasattr(encoder.model, "logit_scale") else 1.0
            with torch.no_grad():
                module.dual_scale.fill_(scale)
            log(f"residual reranker: dual_scale initialised to {scale:.2f}")
    if args.tune_dual and not cfg.residual:
        raise SystemExit("--tune-dual: this reranker does not build on the dual encoder (trained with --no-residual)")
    train_recs, calib_recs = split_records(records, args.calib_fraction, args.seed)
    log(f"{len(train_recs)} training and {len(calib_recs)} calibration records")
    features = {"layer": cfg.image_layer, "words": cfg.text_words}
    pool = build_pool(encoder, root, train_recs, perturb=True, seed=args.seed, hard_k=args.hard_k,
                      canonical=args.curriculum > 0, **features)
    calib = build_pool(encoder, root, calib_recs, perturb=True, seed=args.seed + 7, hard_k=args.hard_k, **features)
    log(f"features ready after {time.monotonic() - t_start:.0f}s")
    if args.steps == 0:
        info.update(steps=0, seconds=0.0, final_loss=None)
    else:
        info.update(train_module(module, pool, args))
    if args.tune_dual:
        info["tune_dual"] = tune_dual_scale(module, encoder, args, work)
        log(f"dual-cosine weight {info['tune_dual']['dual_scale']:.0f}")
    log(f"trained {info['steps']} steps in {info['seconds']:.0f}s")
    # Round to the float16 that gets saved, so this reranker scores exactly like the loaded one.
    module.load_state_dict({k: v.half().float() for k, v in module.state_dict().items()})
    c, i, y, kinds = sample_pairs(calib, max(2000, 2 * len(calib.texts)), np.random.default_rng(args.seed + 8))
    cal_logits = pair_logits(module, calib, c, i)
    cfg.shift, cfg.temperature = fit_platt(cal_logits, y)
    cal_probs = sigmoid((cal_logits - cfg.shift) / cfg.temperature)
    log(f"shift {cfg.shift:.4f} temperature {cfg.temperature:.4f}; calibration-split ECE {ece(cal_probs, y):.4f}")
    log(f"calibration-split accuracy by pair kind: {json.dumps(accuracy_by_kind(cal_logits - cfg.shift, y, kinds))}")
    reranker = Reranker(module, encoder)
    reranker.save(out)
    log(f"saved {out}")
    del pool
    if args.eval:
        metrics = evaluate(reranker, encoder, args, work)
        info["total_minutes"] = (time.monotonic() - t_start) / 60
        for k, v in metrics.items():
            print(f"{k} = {v:.4f}" if isinstance(v, float) else f"{k} = {v}", flush=True)
        (Path(out) / "train_metrics.json").write_text(json.dumps({"info": info, "metrics": metrics}, indent=2) + "\n")
        if metrics["ord_t2i_r1_rerank"] < metrics["ord_t2i_r1_dual"] or metrics["mp_t2i_r1_rerank"] < metrics["mp_t2i_r1_dual"]:
            log(f"WARNING: re-ranking lowers held-out R@1; {out} holds a reranker that makes search worse, do not ship it")
        card = args.card or (out / "README.md" if encoder.spec.local_dir is not None and Path(out).resolve() == encoder.spec.local_dir else None)
        if card is not None:
            write_card(card, card_section(args, cfg, info, metrics, Path(out)))
            log(f"wrote the Reranker section of {card}")
    if tmp is not None:
        tmp.cleanup()
    log(f"done in {(time.monotonic() - t_start) / 60:.1f} min")
    return reranker


def evaluate(reranker: Reranker, encoder: Encoder, args: argparse.Namespace, work: Path) -> dict:
    m: dict = {}
    log(f"evaluating on minimal pairs (seed {EVAL_SEEDS[1]})")
    mp = eval_pool(encoder, reranker.config, EVAL_SEEDS[1], args.eval_n, True, work, perturb=False, hard_k=args.hard_k)
    m.update({f"mp_{k}": v for k, v in retrieval_eval(reranker, mp).items()})
    log(f"evaluating on ordinary scenes (seed {EVAL_SEEDS[0]})")
    ordinary = eval_pool(encoder, reranker.config, EVAL_SEEDS[0], args.eval_n, False, work, perturb=True, hard_k=args.hard_k)
    n_orig = args.eval_n
    # Retrieval on the generated items only; the perturbed ones serve the pairwise and ECE checks.
    plain = Pool(ordinary.img_tok[:n_orig], ordinary.img_vec[:n_orig], ordinary.img_key[:n_orig], ordinary.txt_tok[:n_orig],
                 ordinary.txt_mask[:n_orig], ordinary.txt_vec[:n_orig], ordinary.txt_key[:n_orig], ordinary.txt_img[:n_orig],
                 ordinary.texts[:n_orig], ordinary.scenes[:n_orig])
    m.update({f"ord_{k}": v for k, v in retrieval_eval(reranker, plain).items()})
    m.update(pairwise_eval(reranker, encoder, plain, seed=EVAL_SEEDS[0]))
    c, i, y, kinds = sample_pairs(ordinary, 4000, np.random.default_rng(EVAL_SEEDS[0]))
    logits = pair_logits(reranker.module, ordinary, c, i)
    m["ece"] = ece(reranker.module.probability(torch.from_numpy(logits)).numpy(), y)
    m["ece_uncalibrated"] = ece(sigmoid(logits), y)
    m["ece_pairs"] = len(y)
    m["ece_positive_share"] = float(y.mean())
    m.update({f"pair_accuracy_{k}": v for k, v in accuracy_by_kind(logits - reranker.config.shift, y, kinds).items()})
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_reranker import latency_ms, random_vit_reranker

    m["latency_ms"] = latency_ms(reranker)
    if args.bench_b32:
        with tempfile.TemporaryDirectory(prefix="crossfind-b32-") as d:
            m["latency_b32_ms"] = latency_ms(random_vit_reranker("ViT-B-32", Path(d), reranker.config))
    return m


if __name__ == "__main__":
    main()
