#!/usr/bin/env python
"""Train reranker designs on minimal-pair groups, with every token held in memory.

This is how the reranker bundled with ``shapes-tiny`` is trained
(``scripts/train_shapes_reranker.sh`` runs it three times, then
``scripts/train_reranker.py --steps 0 --tune-dual`` calibrates). It encodes
generated minimal-pair groups once (base B, colours swapped C, shapes swapped
S, relation reversed R), then trains on the 4x4 scores of each group (softmax
over every row and column, so every negative is a minimal one) and reports,
every ``--every`` steps, the within-group accuracy on held-out groups (seed 8)
and the B-vs-R rate, the part the dual encoder gets at chance. Why each option
exists, and the designs that were tried and dropped (their code is in git
history): docs/reranker.md.

The model: text tokens attend to patch tokens (projected, with learned and
fixed 2-D positions), after ``--image-depth`` image self-attention blocks;
``--depth`` blocks of text self-attention, cross-attention and MLP; a learned
[ITM] token scored by a linear head. ``--save`` writes it as a
``retrieval.rerank`` reranker (the same computation, checked on held-out
pairs); ``--init`` starts from one.

Options:

* ``--layer`` the vision layer(s) read: ``final``, ``embed`` (the patch
  embedding), ``blockK``, or two joined by ``+`` (``embed+final``), each with
  its own input projection; a projection added by ``--init`` from a one-layer
  model starts at zero, so training starts where the saved model was.
* ``--words``: the text tower's input word embeddings beside its output
  tokens (the output has all but lost which relation word a caption used).
* ``--canonical-captions`` / ``--curriculum N``: captions read as canonical
  scene keys (always, or for the first N steps, then fading to natural ones
  over N more).
* ``--residual A``: logit plus a learned multiple (from ``A``) of the pair's
  dual cosine, as search scores it; ``--ordinary N`` adds ordinary scenes in
  groups of four the dual encoder finds alike; ``--mined-groups G`` adds
  groups of alike minimal-pair items from different groups.
* ``--local H``: a local stem over each patch's 3x3 neighbourhood of
  first-layer tokens (``retrieval.rerank._LocalStem``), last layer at zero;
  ``--shape-aux W`` trains it to read the shape under each object's centre
  patch through a linear head that is not saved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from retrieval.encoders import Encoder, load_encoder  # noqa: E402
from retrieval.rerank import _Attention as Attention  # noqa: E402  (keys/values once per image)
from retrieval.rerank import _LocalStem as LocalStem  # noqa: E402
from retrieval.rerank import grid_features  # noqa: E402
from retrieval.rerank import _with_centred as with_centred  # noqa: E402  (as the reranker centres patches)
from retrieval.shapes import SHAPES, samples  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_tokens import layer_tokens  # noqa: E402
from train_reranker import _mine  # noqa: E402
from train_reranker import group_pairs as _group_pairs  # noqa: E402


# ------------------------------------------------------------------- models
def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


class SelfBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(width), Attention(width, heads), nn.LayerNorm(width), _mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, *self.attn.keys(h))
        return x + self.mlp(self.ln2(x))


class CrossBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_self, self.self_attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln_cross, self.cross_attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln_mlp, self.mlp = nn.LayerNorm(width), _mlp(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self.ln_self(x)
        x = x + self.self_attn(h, *self.self_attn.keys(h), mask)
        x = x + self.cross_attn(self.ln_cross(x), *kv)
        return x + self.mlp(self.ln_mlp(x))


class LabITM(nn.Module):
    """The cross-attention reranker, as :class:`retrieval.rerank.CrossAttentionITM` computes it."""

    def __init__(self, text_width: int, image_width: int, patches: int, context: int, args: argparse.Namespace) -> None:
        super().__init__()
        self.layers = len(args.layer.split("+"))
        w, iw = args.width, 2 * image_width // self.layers
        self.register_buffer("grid", grid_features(patches))
        self.text_in = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, w))
        self.image_in = nn.Sequential(nn.LayerNorm(iw), nn.Linear(iw, w))
        # Further layers (--layer embed+final): one projection each, added; zero
        # at the start, so a model started from a one-layer reranker (--init)
        # computes what it did until training gives the new layer a say.
        self.extra_in = nn.ModuleList(nn.Sequential(nn.LayerNorm(iw), nn.Linear(iw, w)) for _ in range(self.layers - 1))
        for proj in self.extra_in:
            nn.init.zeros_(proj[1].weight)
            nn.init.zeros_(proj[1].bias)
        # --local H: an MLP over each patch's 3x3 neighbourhood of first-layer
        # tokens, last layer at zero (an --init model scores as it did at first).
        self.local_in = LocalStem(image_width // self.layers, args.local, w, patches) if args.local else None
        # --shape-aux W: a linear head reads each object's shape from the stem at the patch under
        # its centre (lab only; not saved), so the stem learns shape before the text asks for it.
        self.shape_head = nn.Linear(w, len(SHAPES)) if args.shape_aux else None
        self.pos_in = nn.Linear(self.grid.shape[1], w)
        self.image_pos = nn.Parameter(torch.randn(patches, w) * 0.02)
        self.image_blocks = nn.ModuleList(SelfBlock(w, args.heads) for _ in range(args.image_depth))
        self.ln_image = nn.LayerNorm(w)
        self.itm = nn.Parameter(torch.randn(w) * 0.02)
        self.text_pos = nn.Parameter(torch.randn(context + 1, w) * 0.02)
        self.blocks = nn.ModuleList(CrossBlock(w, args.heads) for _ in range(args.depth))
        self.ln_out, self.head = nn.LayerNorm(w), nn.Linear(w, 1)
        self.residual = args.residual is not None
        if self.residual:
            self.dual_scale = nn.Parameter(torch.tensor(float(args.residual)))
            self.dual_bias = nn.Parameter(torch.tensor(0.0))

    def shape_logits(self, image: torch.Tensor) -> torch.Tensor:
        """``--shape-aux``: logits of the shape under each patch, ``(n, P, shapes)``, from the local stem."""
        assert self.local_in is not None and self.shape_head is not None
        return self.shape_head(self.local_in(image.chunk(self.layers, dim=-1)[0]))

    def image_stream(self, image: torch.Tensor) -> torch.Tensor:
        """Each patch's layers (centred, projected and summed), learned position and grid place."""
        parts = image.chunk(self.layers, dim=-1)
        y = self.image_in(with_centred(parts[0])) + self.image_pos + self.pos_in(self.grid)
        for proj, part in zip(self.extra_in, parts[1:]):
            y = y + proj(with_centred(part))
        if self.local_in is not None:
            y = y + self.local_in(parts[0])
        return y

    def forward(self, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, ti: torch.Tensor, ii: torch.Tensor,
                dual: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of pairs (text ``ti[j]``, image ``ii[j]``); a residual model
        adds ``dual_scale * dual + dual_bias`` (``dual``: the pairs' dual cosines)."""
        length = int(mask.sum(1).max())  # causal text tokens: padding after the last real one is inert
        text, mask = text[:, :length], mask[:, :length]
        y = self.image_stream(image)
        for block in self.image_blocks:
            y = block(y)
        y = self.ln_image(y)
        kvs = [b.cross_attn.keys(y) for b in self.blocks]  # once per unique image
        h = self.text_in(text)[ti]
        x = torch.cat([self.itm.expand(h.shape[0], 1, -1), h], 1) + self.text_pos[: h.shape[1] + 1]
        keep = torch.cat([mask.new_ones(mask.shape[0], 1), mask], 1)[ti][:, None, None, :]
        for block, (k, v) in zip(self.blocks, kvs):
            x = block(x, keep, (k[ii], v[ii]))
        logit = self.head(self.ln_out(x[:, 0])).squeeze(-1)
        if self.residual:
            assert dual is not None, "a residual model needs the pairs' dual cosines"
            logit = logit + self.dual_scale * dual + self.dual_bias
        return logit


# --------------------------------------------------------------------- data
WORDS = False  # set from --words


def shape_targets(items: list, patches: int, size: int) -> torch.Tensor:
    """``(n, P)``: the shape index of the object whose centre lies in each patch, -1 elsewhere (--shape-aux)."""
    grid = int(round(patches**0.5))
    step = size / grid
    out = torch.full((len(items), patches), -1, dtype=torch.long)
    for i, item in enumerate(items):
        for obj, (x, y, _) in zip(item.scene.objects, item.boxes):
            out[i, min(int(y // step), grid - 1) * grid + min(int(x // step), grid - 1)] = SHAPES.index(obj.shape)
    return out


def encode_texts(encoder: Encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    texts, masks = [], []
    for s in range(0, len(captions), 512):
        t, m = encoder.text_tokens(captions[s : s + 512])
        if WORDS:  # the tower's input word embeddings beside its output tokens
            ids = encoder.tokenize(captions[s : s + 512])[:, : t.shape[1]]
            with torch.no_grad():
                t = torch.cat([t, encoder.model.token_embedding(ids).to(t.dtype)], -1)
        texts.append(t.float())
        masks.append(m)
    length = encoder.model.positional_embedding.shape[0]  # pad to the full context: any two sets stack
    return (torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in texts]),
            torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks]))


def patch_tokens(encoder: Encoder, images: list, layer: str, vectors: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch tokens of ``layer`` (``A+B``: both layers side by side, as the
    token store keeps them) and, with ``vectors``, the images' dual vectors
    from the same forward pass."""
    parts = layer.split("+")
    features = layer_tokens(encoder, images, parts, vectors=vectors)
    return torch.cat([features[part] for part in parts], -1), features.get("vectors")


def encode(encoder: Encoder, n: int, seed: int, layer: str, canonical: bool = False, both: bool = False,
           vectors: list | None = None, shapes: list | None = None) -> tuple:
    """Patch tokens of ``layer``, text tokens and text mask of ``n`` minimal-pair items.

    ``canonical`` captions each scene by its key ("small red circle left-of
    large blue square": subject first, only "left-of"/"above"), which takes
    parsing varied phrasings out of the task. ``both`` appends the canonical
    captions' tokens and mask to the natural ones. A ``vectors`` list gets the
    dual encoder's image and caption vectors and the scene keys appended; a
    ``shapes`` list gets the items' :func:`shape_targets`.
    """
    items = list(samples(n, seed, size=encoder.image_size, minimal_pairs=True))
    captions = [x.scene.key() if canonical else x.caption for x in items]
    images, image_vectors = patch_tokens(encoder, [x.image for x in items], layer, vectors=vectors is not None)
    text, mask = encode_texts(encoder, captions)
    if vectors is not None:
        vectors.extend([image_vectors, torch.from_numpy(encoder.encode_texts(captions)), [x.scene.key() for x in items]])
    if shapes is not None:
        shapes.append(shape_targets(items, images.shape[1], encoder.image_size))
    if both:
        return (images, text, mask, *encode_texts(encoder, [x.scene.key() for x in items]))
    return images, text, mask


class Alike:
    """Per item, the items with other keys the dual encoder ranks highest
    against it (caption to image and image to caption, ``k`` each), from which
    groups of alike scenes are drawn."""

    def __init__(self, img_vec: torch.Tensor, txt_vec: torch.Tensor, keys: list[str], k: int = 12) -> None:
        self.img_vec, self.txt_vec = img_vec, txt_vec
        self.key = np.unique(keys, return_inverse=True)[1]
        img, txt = img_vec.numpy(), txt_vec.numpy()
        self.near = np.concatenate([_mine(txt, img, self.key, self.key, k), _mine(img, txt, self.key, self.key, k)], 1)

    def groups(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Item indices of one group of four per anchor (anchor first), all keys distinct."""
        out = np.empty((len(anchors), 4), np.int64)
        for row, a in enumerate(anchors):
            chosen, keys = [int(a)], {self.key[a]}
            for c in self.near[a, rng.permutation(self.near.shape[1])]:
                if self.key[c] not in keys:
                    chosen.append(int(c))
                    keys.add(self.key[c])
                    if len(chosen) == 4:
                        break
            while len(chosen) < 4:  # too few alike items: fill with random ones of other keys
                c = int(rng.integers(len(self.key)))
                if self.key[c] not in keys:
                    chosen.append(c)
                    keys.add(self.key[c])
            out[row] = chosen
        return out

    def dual_accuracy(self, groups: np.ndarray) -> dict:
        """Within-group t2i and i2t accuracy of the dual encoder on ``groups``."""
        s = np.einsum("gid,gjd->gij", self.img_vec.numpy()[groups], self.txt_vec.numpy()[groups])  # [group, image, caption]
        target = np.arange(4)
        return {"t2i": float((s.argmax(1) == target).mean()), "i2t": float((s.argmax(2) == target).mean())}


class Ordinary(Alike):
    """Ordinary scenes (one to three objects, any sizes) with their tokens."""

    def __init__(self, encoder: Encoder, n: int, seed: int, layer: str, k: int = 12) -> None:
        items = list(samples(n, seed, size=encoder.image_size, minimal_pairs=False))
        captions = [x.caption for x in items]
        self.image, image_vectors = patch_tokens(encoder, [x.image for x in items], layer, vectors=True)
        self.text, self.mask = encode_texts(encoder, captions)
        self.shapes = shape_targets(items, self.image.shape[1], encoder.image_size)
        super().__init__(image_vectors, torch.from_numpy(encoder.encode_texts(captions)), [x.scene.key() for x in items], k)


def group_pairs(groups: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and image positions of every (image j, caption k) pair of each group, row-major."""
    ti, ii = _group_pairs(groups, size)
    return torch.from_numpy(ti), torch.from_numpy(ii)


def pair_cosines(vectors: tuple, idx: np.ndarray | slice, ti: torch.Tensor, ii: torch.Tensor) -> torch.Tensor:
    """Dual cosines of the pairs (caption ``idx[ti[j]]``, image ``idx[ii[j]]``);
    ``vectors`` are the items' dual image and caption vectors."""
    return (vectors[1][idx][ti] * vectors[0][idx][ii]).sum(-1)


def scores(model: LabITM, data: tuple, idx: np.ndarray, size: int, vectors: tuple | None = None) -> torch.Tensor:
    """Logits ``[group, image, caption]`` of each group of ``size`` items
    ``idx``; ``vectors`` (the items' dual image and caption vectors) for a
    residual model."""
    image, text, mask = data
    ti, ii = group_pairs(len(idx) // size, size)
    dual = None if vectors is None else pair_cosines(vectors, idx, ti, ii)
    return model(text[idx], mask[idx], image[idx], ti, ii, dual).view(-1, size, size)  # [group, image, caption]


def evaluate(model: LabITM, data: tuple, ordinary: tuple | None = None, vectors: tuple | None = None,
             mined: np.ndarray | None = None) -> dict:
    """Within-group accuracy on held-out minimal groups and, given ``ordinary``
    (an :class:`Ordinary` and its fixed groups), on held-out ordinary groups;
    ``vectors`` are the held-out minimal items' dual vectors (residual models),
    ``mined`` groups of alike held-out minimal items across groups."""
    model.eval()
    with torch.no_grad():
        s = scores(model, data, np.arange(len(data[0])), 4, vectors)
        if ordinary is not None:
            pool, groups = ordinary
            o = scores(model, (pool.image, pool.text, pool.mask), groups.reshape(-1), 4,
                          (pool.img_vec, pool.txt_vec) if model.residual else None)
        if mined is not None:
            m = scores(model, data, mined.reshape(-1), 4, vectors)
    model.train()
    own, target = s.diagonal(dim1=1, dim2=2), torch.arange(4)
    extra = {} if ordinary is None else {
        "ordinary_t2i": float((o.argmax(1) == target).float().mean()),
        "ordinary_i2t": float((o.argmax(2) == target).float().mean()),
    }
    if mined is not None:
        extra.update(mined_t2i=float((m.argmax(1) == target).float().mean()), mined_i2t=float((m.argmax(2) == target).float().mean()))
    return {**extra,
        "t2i": float((s.argmax(1) == target).float().mean()),
        "i2t": float((s.argmax(2) == target).float().mean()),
        "B_vs_R": float(((own[:, 0] > s[:, 0, 3]).float().mean() + (own[:, 3] > s[:, 3, 0]).float().mean()) / 2),
        "image_prefers_own_caption": (own[:, :, None] > s).float().mean(0).numpy().round(3).tolist(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-tiny")
    p.add_argument("--variant", choices=("cross",), default="cross", help="the model design (one is kept: cross-attention)")
    p.add_argument("--layer", default="final",
                   help="final, embed (patch embedding), blockK (output of vision block K), or two joined by + (embed+final)")
    p.add_argument("--n", type=int, default=24000, help="training items (groups of four; seed 1234)")
    p.add_argument("--val", type=int, default=2000, help="held-out items (seed 8)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--groups", type=int, default=32, help="groups per step (16 pairs each)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--local", type=int, default=0, metavar="H",
                   help="add a local stem of hidden width H over each patch's 3x3 neighbourhood of first-layer tokens")
    p.add_argument("--shape-aux", type=float, default=0.0, metavar="W",
                   help="with --local: weight of an auxiliary loss reading the shape under each object's centre patch "
                        "from the stem (generated scenes know it; the head is not saved)")
    p.add_argument("--image-depth", type=int, default=0)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--canonical-captions", action="store_true", help="caption scenes by their canonical key (no phrasing variety)")
    p.add_argument("--curriculum", type=int, default=0,
                   help="train the first N steps on canonical captions, then fade to natural ones over N more")
    p.add_argument("--canonical-floor", type=float, default=0.0,
                   help="with --curriculum: share of canonical captions kept after the fade (default 0)")
    p.add_argument("--words", action="store_true",
                   help="give the reranker the text tower's input word embeddings beside its output tokens")
    p.add_argument("--save", type=Path,
                   help="save the trained model as a retrieval.rerank reranker in this folder, "
                        "uncalibrated; scripts/train_reranker.py --init DIR continues, calibrates and evaluates it")
    p.add_argument("--ordinary", type=int, default=0,
                   help="ordinary scenes (seed 4321) to train on beside the minimal groups, in groups of four alike scenes")
    p.add_argument("--ordinary-groups", type=int, default=16, help="with --ordinary: ordinary groups per step")
    p.add_argument("--mined-groups", type=int, default=0,
                   help="(with --residual) groups of four alike minimal-pair items from different groups, mined by the "
                        "dual encoder, per step: what search puts beside the true image")
    p.add_argument("--init", type=Path, help="start from the weights of a reranker --save wrote (same shape options)")
    p.add_argument("--residual", type=float, metavar="A",
                   help="train residual on the dual encoder: logit + learned scale (from A) times the pair's dual cosine")
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.ordinary and args.curriculum:
        p.error("--ordinary goes without --curriculum")
    if args.residual is not None and args.curriculum:
        p.error("--residual goes without --curriculum")
    if args.mined_groups and args.residual is None:
        p.error("--mined-groups needs --residual (it mines with the dual vectors)")
    if args.shape_aux and not args.local:
        p.error("--shape-aux trains the local stem: give --local")
    torch.manual_seed(0)
    global WORDS
    WORDS = args.words
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = load_encoder(args.model, device="cpu")
    t0 = time.time()
    train_vecs: list | None = [] if args.residual is not None else None
    val_vecs: list | None = [] if args.residual is not None else None
    train_shapes: list = []
    val_shapes: list = []
    train = encode(encoder, args.n, 1234, args.layer, args.canonical_captions, both=args.curriculum > 0, vectors=train_vecs,
                   shapes=train_shapes)
    val = encode(encoder, args.val, 8, args.layer, args.canonical_captions, vectors=val_vecs, shapes=val_shapes)
    ordinary = held_ordinary = mined = held_mined = None
    if args.mined_groups:
        assert train_vecs is not None and val_vecs is not None
        mined = Alike(train_vecs[0], train_vecs[1], train_vecs[2])
        held = Alike(val_vecs[0], val_vecs[1], val_vecs[2])
        held_mined = held.groups(np.arange(min(500, args.val)), np.random.default_rng(8))
        base = held.dual_accuracy(held_mined)
        print(f"held-out mined minimal groups, dual encoder: t2i {base['t2i']:.3f} i2t {base['i2t']:.3f}", flush=True)
    if args.ordinary:
        ordinary = Ordinary(encoder, args.ordinary, 4321, args.layer)
        held = Ordinary(encoder, args.val, 9, args.layer)  # as many as held-out minimal items
        held_ordinary = (held, held.groups(np.arange(min(500, args.val)), np.random.default_rng(9)))
        base = held.dual_accuracy(held_ordinary[1])
        print(f"held-out ordinary groups, dual encoder: t2i {base['t2i']:.3f} i2t {base['i2t']:.3f}", flush=True)
        train = tuple(torch.cat([a, b]) for a, b in zip(train, (ordinary.image, ordinary.text, ordinary.mask)))
        train_shapes.append(ordinary.shapes)
        if train_vecs is not None:
            train_vecs = [torch.cat([train_vecs[0], ordinary.img_vec]), torch.cat([train_vecs[1], ordinary.txt_vec])]
    print(f"encoded {args.n} + {args.val} items{f' + {args.ordinary} ordinary' if args.ordinary else ''} "
          f"in {time.time() - t0:.0f}s", flush=True)
    shape_target = torch.cat(train_shapes)  # minimal items, then ordinary ones, as in train
    image, text = train[0], train[1]
    model = LabITM(text.shape[-1], image.shape[-1], image.shape[1], text.shape[1], args)
    if args.init:
        load_saved(model, args.init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(0)
    members, size = np.arange(4), 4
    target = torch.arange(size)
    t0 = time.time()
    result: dict = {}
    for step in range(1, args.steps + 1):
        g = rng.integers(0, args.n // 4, args.groups)
        idx = (g[:, None] * 4 + members).reshape(-1)
        if mined is not None:
            idx = np.concatenate([idx, mined.groups(rng.integers(0, args.n, args.mined_groups), rng).reshape(-1)])
        if ordinary is not None:  # ordinary groups after the minimal ones, indices past the minimal items
            anchors = rng.integers(0, args.ordinary, args.ordinary_groups)
            idx = np.concatenate([idx, args.n + ordinary.groups(anchors, rng).reshape(-1)])
        data = train[:3]
        if args.curriculum:
            share = min(1.0, max(args.canonical_floor, 2.0 - step / args.curriculum))  # 1 for N steps, then down over N
            canon = torch.from_numpy(np.repeat(rng.random(len(g)) < share, len(members)))[:, None]
            text = torch.where(canon[..., None], train[3][idx], train[1][idx])
            mask = torch.where(canon, train[4][idx], train[2][idx])
            data = (train[0][idx], text, mask)
            s = scores(model, data, np.arange(len(idx)), size)
        else:
            s = scores(model, data, idx, size, train_vecs)
        rows = target.repeat(len(idx) // size)
        loss = F.cross_entropy(s.reshape(-1, size), rows) + F.cross_entropy(s.transpose(1, 2).reshape(-1, size), rows)
        if args.shape_aux:
            shape_loss = F.cross_entropy(model.shape_logits(train[0][idx]).flatten(0, 1), shape_target[idx].flatten(),
                                         ignore_index=-1)
            loss = loss + args.shape_aux * shape_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            result = evaluate(model, val, held_ordinary, val_vecs, held_mined)
            if args.shape_aux:
                with torch.no_grad():
                    want = val_shapes[0]
                    got = model.shape_logits(val[0]).argmax(-1)
                    result["stem_shape_accuracy"] = float((got[want >= 0] == want[want >= 0]).float().mean())
            print(f"step {step} loss {loss.item():.3f} held-out t2i {result['t2i']:.3f} i2t {result['i2t']:.3f} "
                  f"B-vs-R {result['B_vs_R']:.3f}"
                  + ("" if ordinary is None else f" ordinary t2i {result['ordinary_t2i']:.3f} i2t {result['ordinary_i2t']:.3f}")
                  + ("" if mined is None else f" mined t2i {result['mined_t2i']:.3f} i2t {result['mined_i2t']:.3f}")
                  + ("" if not args.shape_aux else f" stem shape {result['stem_shape_accuracy']:.3f}")
                  + f" ({time.time() - t0:.0f}s)", flush=True)
    print("image B/C/S/R prefers its own caption over B/C/S/R:", result.get("image_prefers_own_caption"))
    if args.save:
        print(f"saved {save_reranker(model, encoder, args, val, val_vecs)}")
    return result


RENAMES = {"pos_in.": "place_in.", "itm": "itm_token", ".ln1.": ".ln_attn.", ".ln2.": ".ln_mlp.", ".mlp.2.": ".mlp.3."}


def renamed(name: str) -> str:
    """The name of a lab parameter in :class:`retrieval.rerank.CrossAttentionITM`."""
    for old, new in RENAMES.items():
        name = new if name == old else name.replace(old, new)
    return name


def load_saved(model: LabITM, folder: Path) -> None:
    """Load the weights of a reranker :func:`save_reranker` wrote (renamed back)."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / "reranker.safetensors"))
    own = model.state_dict()  # the grid, and a residual model's dual weights when the saved one has none
    kept = ("grid", "dual_scale", "dual_bias")  # and new parts: a layer's projection (--layer embed+final from embed), --local
    new = ("extra_in.", "local_in.", "shape_head.")
    state = {name: saved.get(renamed(name), own[name]) if name in kept or name.startswith(new) else saved[renamed(name)]
             for name in own}
    model.load_state_dict(state)
    print(f"started from {folder}", flush=True)


def save_reranker(model: LabITM, encoder: Encoder, args: argparse.Namespace, check: tuple,
                  check_vectors: list | None = None) -> Path:
    """Write the lab model as a :class:`retrieval.rerank.Reranker`
    (same computation; parameters renamed: the lab's MLPs have no dropout slot)."""
    from retrieval.rerank import CrossAttentionITM, Reranker, RerankerConfig

    cfg = RerankerConfig.for_encoder(
        encoder, width=args.width, depth=args.depth, heads=args.heads, residual=model.residual,
        image_layer=args.layer, text_words=args.words, image_depth=args.image_depth, image_local=args.local,
    )
    module = CrossAttentionITM(cfg)
    state = {renamed(name): value for name, value in model.state_dict().items()
             if name != "grid" and not name.startswith("shape_head.")}
    module.load_state_dict(state)
    model.eval()
    with torch.no_grad():  # the same logits on held-out groups
        s = scores(model, check, np.arange(64), 4, check_vectors)
        image, text, mask = check
        ti, ii = group_pairs(16, 4)
        dual = None if check_vectors is None else pair_cosines(check_vectors, slice(0, 64), ti, ii)
        mine = module(text[:64][ti], mask[:64][ti], image[:64], dual, image_index=ii).view(-1, 4, 4)
    diff = float((s - mine).abs().max())
    print(f"saved reranker vs lab model on 256 held-out pairs: max logit difference {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("the saved reranker does not compute what the lab model does")
    return Reranker(module, encoder).save(args.save)


if __name__ == "__main__":
    main()
