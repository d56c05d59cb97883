#!/usr/bin/env python
"""What do a model's frozen tokens know? Diagnostics behind the reranker work.

Two measurements on generated minimal-pair scenes (``retrieval.shapes``):

1. **Patch probe.** A linear classifier per vision layer predicts, for every
   patch, the colour of the object covering its centre (or background), from
   that patch's token alone. High accuracy means the stored tokens carry local
   colour, so a reranker reading them has what it needs to bind colours to
   places.
2. **Minimal-pair confusion of the dual encoder.** In groups of four scenes
   (base B, colours swapped C, shapes swapped S, relation reversed R), the
   share of images whose own caption beats each other caption of the group,
   and the same for captions. This shows which compositions the dual encoder
   already gets right and which are at chance, i.e. what a reranker must add.
3. **Relation-word probe of the text tower.** A linear classifier predicts a
   two-object caption's relation word (left of / right of / above / below or
   under) from one token of the text tower's output: the relation word's own
   token, the last word (the object's noun, which comes after the relation
   word in a causal tower) and the end token (what the dual encoder embeds);
   and the cosine similarity of the relation words' input embeddings. Low
   accuracy means the frozen text tokens no longer say which way a relation
   points, whatever a reranker on top of them does.
4. **Object shape probe.** For each object, its shape (5 classes) from the
   3x3 window of patch tokens around its centre, by a linear classifier and
   by a small MLP (two hidden layers of 256), from the patch embedding and
   from the final layer. A shape the MLP reads and the linear probe does not
   is there for a reranker with a nonlinear local read of the patches
   (``RerankerConfig.image_local``), not for one that projects each token
   linearly.

Usage::

    python scripts/probe_tokens.py --model shapes-tiny
    python scripts/probe_tokens.py --model shapes-tiny --json

Generated data only (seeds 77/78 for the patch and shape probes, 8 for the
confusion, 79 for the relation-word probe, none used
in training); needs no files. A few minutes on 2 CPU cores for shapes-tiny.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from retrieval.encoders import Encoder, load_encoder  # noqa: E402
from retrieval.shapes import COLORS, samples  # noqa: E402

MEMBERS = ("B", "C", "S", "R")  # base, colours swapped, shapes swapped, relation reversed


def layer_tokens(
    encoder: Encoder, images: list, names: Sequence[str] | None = None, vectors: bool = False
) -> dict[str, torch.Tensor]:
    """Patch tokens of the vision tower's stages for ``images``.

    Stages: ``embed`` (the patch embedding), ``block0`` ... (the output of each
    transformer block, class token dropped) and ``final`` (what the token store
    keeps). ``names`` picks some; default all but ``embed``. ``vectors`` adds
    the key ``"vectors"``: the images' normalised embeddings, from the same
    forward pass.
    """
    blocks = getattr(getattr(encoder.model.visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise SystemExit(f"{encoder.name}: not an open_clip ViT; nothing to probe")
    wanted = list(names) if names is not None else [*(f"block{k}" for k in range(len(blocks))), "final"]
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in [*wanted, *(["vectors"] if vectors else [])]}
    try:
        if vectors:  # the tower's output: (pooled, tokens) while image_tokens asks for tokens
            hooks.append(encoder.model.visual.register_forward_hook(
                lambda _m, _i, out: seen.__setitem__("vectors", F.normalize(out[0].float(), dim=-1))))
        for name in wanted:
            if name != "final":  # the encoder knows where each layer's tokens are and how to cut them out
                module, cut = encoder.token_source(name)
                hooks.append(module.register_forward_hook(
                    lambda _m, _i, out, name=name, cut=cut: seen.__setitem__(name, cut(out))))
        for start in range(0, len(images), 256):
            final = encoder.image_tokens(encoder.image_batch(images[start : start + 256]))
            for name in parts:
                parts[name].append((final if name == "final" else seen[name]).float().cpu())
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def patch_labels(items: list, grid: int, size: int) -> torch.Tensor:
    """Colour index of the object covering each patch centre; ``len(COLORS)`` for background."""
    colors = list(COLORS)
    step = size / grid
    labels = np.full((len(items), grid * grid), len(colors))
    for i, item in enumerate(items):
        for obj, (x, y, r) in zip(item.scene.objects, item.boxes):
            for p in range(grid * grid):
                cy, cx = (p // grid + 0.5) * step, (p % grid + 0.5) * step
                if (cx - x) ** 2 + (cy - y) ** 2 <= (0.8 * r) ** 2:
                    labels[i, p] = colors.index(obj.color)
    return torch.from_numpy(labels)


def linear_probe(x: torch.Tensor, y: torch.Tensor, tx: torch.Tensor, classes: int) -> torch.Tensor:
    """Fit a standardised linear classifier on ``(x, y)``; its predictions for ``tx``."""
    mu, sd = x.mean(0), x.std(0) + 1e-5
    x, tx = (x - mu) / sd, (tx - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(lin(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return lin(tx).argmax(1)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> dict:
    x, y = train_x.reshape(-1, train_x.shape[-1]), train_y.reshape(-1)
    tx, ty = test_x.reshape(-1, x.shape[1]), test_y.reshape(-1)
    pred = linear_probe(x, y, tx, len(COLORS) + 1)
    on_object = ty < len(COLORS)
    return {
        "object_patch_accuracy": round(float((pred[on_object] == ty[on_object]).float().mean()), 3),
        "background_accuracy": round(float((pred[~on_object] == ty[~on_object]).float().mean()), 3),
        "object_patch_share": round(float(on_object.float().mean()), 3),
    }


RELATION_WORDS = {"left": 0, "right": 1, "above": 2, "below": 3, "under": 3}  # classes: left/right/above/below


def relation_probe(encoder: Encoder, n_train: int, n_test: int) -> dict:
    """How well the text tower's output tokens say which way a caption's relation points."""
    token = {w: int(encoder.tokenize([w])[0, 1]) for w in RELATION_WORDS}
    word_id = {token[w]: c for w, c in RELATION_WORDS.items()}
    captions = [s.caption for s in samples(n_train + n_test, 79, size=encoder.image_size, minimal_pairs=True)]
    tokens, mask = encoder.text_tokens(captions)
    ids = encoder.tokenize(captions)[:, : tokens.shape[1]]
    rows = torch.arange(len(captions))
    where = torch.tensor([next(j for j, t in enumerate(row.tolist()) if t in word_id) for row in ids])
    labels = torch.tensor([word_id[int(ids[i, j])] for i, j in enumerate(where.tolist())])
    end = mask.sum(1) - 1
    positions = {"relation word": where, "last word": end - 1, "end token": end}
    accuracy = {}
    for name, at in positions.items():
        x = tokens[rows, at].float()
        pred = linear_probe(x[:n_train], labels[:n_train], x[n_train:], 4)
        accuracy[name] = round(float((pred == labels[n_train:]).float().mean()), 3)
    majority = float(torch.bincount(labels[n_train:]).max()) / n_test
    words = list(token)
    emb = F.normalize(encoder.model.token_embedding.weight[list(token.values())].float(), dim=1)
    cos = (emb @ emb.T).detach()
    return {
        "captions": {"train": n_train, "test": n_test, "seed": 79},
        "accuracy_by_token": accuracy,
        "majority_class": round(majority, 3),
        "input_embedding_cosine": {a: {b: round(float(cos[i, j]), 2) for j, b in enumerate(words) if j != i}
                                   for i, a in enumerate(words)},
    }


def object_windows(items: list, tokens: torch.Tensor, size: int) -> torch.Tensor:
    """Per object of ``items``, the 3x3 window of ``tokens`` ``(n, P, d)`` around
    its centre (kept inside the grid), flattened: ``(objects, 9 d)``."""
    grid = int(round(tokens.shape[1] ** 0.5))
    step = size / grid
    rows = []
    for i, item in enumerate(items):
        for x, y, _ in item.boxes:
            cx, cy = (min(max(int(v // step), 1), grid - 2) for v in (x, y))
            rows.append(tokens[i, [(cy + dy) * grid + cx + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)]].reshape(-1))
    return torch.stack(rows).float()


def mlp_probe(x: torch.Tensor, y: torch.Tensor, tx: torch.Tensor, classes: int, epochs: int = 60) -> torch.Tensor:
    """Fit a standardised two-hidden-layer MLP (256 wide) on ``(x, y)``; its predictions for ``tx``."""
    mu, sd = x.mean(0), x.std(0) + 1e-4
    x, tx = (x - mu) / sd, (tx - mu) / sd
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                              torch.nn.GELU(), torch.nn.Linear(256, classes))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(256):
            loss = F.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return net(tx).argmax(1)


def shape_probe(encoder: Encoder, train: list, test: list, tr_tok: dict, te_tok: dict) -> dict:
    """Accuracy of reading each object's shape from its 3x3 window of tokens, per layer, linear and MLP;
    ``tr_tok``/``te_tok`` hold the final layer's tokens already (:func:`layer_tokens`), the patch embedding's are added."""
    from retrieval.shapes import SHAPES

    def labels(items: list) -> torch.Tensor:
        return torch.tensor([SHAPES.index(o.shape) for item in items for o in item.scene.objects])

    size = encoder.image_size
    tr_tok = {**tr_tok, **layer_tokens(encoder, [s.image for s in train], ["embed"])}
    te_tok = {**te_tok, **layer_tokens(encoder, [s.image for s in test], ["embed"])}
    y, ty = labels(train), labels(test)
    out: dict = {"objects": {"train": len(y), "test": len(ty)}, "chance": round(1 / len(SHAPES), 3)}
    for name in ("embed", "final"):
        x, tx = object_windows(train, tr_tok[name], size), object_windows(test, te_tok[name], size)
        out[name] = {
            "linear": round(float((linear_probe(x, y, tx, len(SHAPES)) == ty).float().mean()), 3),
            "mlp": round(float((mlp_probe(x, y, tx, len(SHAPES)) == ty).float().mean()), 3),
        }
    return out


def confusion(encoder: Encoder, n_groups: int, seed: int) -> dict:
    items = list(samples(4 * n_groups, seed, minimal_pairs=True))
    iv = torch.from_numpy(encoder.encode_images(encoder.image_batch([s.image for s in items]))[0])
    tv = torch.from_numpy(encoder.encode_texts([s.caption for s in items]))
    s = torch.einsum("bjd,bkd->bjk", iv.view(n_groups, 4, -1), tv.view(n_groups, 4, -1))  # [group, image, caption]
    own = s.diagonal(dim1=1, dim2=2)
    by_image = (own[:, :, None] > s).float().mean(0)
    by_caption = (own[:, :, None] > s.transpose(1, 2)).float().mean(0)

    def table(m: torch.Tensor) -> dict:
        return {a: {b: round(float(m[i, j]), 3) for j, b in enumerate(MEMBERS) if j != i} for i, a in enumerate(MEMBERS)}

    target = torch.arange(4)
    return {
        "groups": n_groups,
        "t2i_in_group_accuracy": round(float((s.argmax(1) == target).float().mean()), 3),
        "i2t_in_group_accuracy": round(float((s.argmax(2) == target).float().mean()), 3),
        "image_prefers_own_caption_over": table(by_image),
        "caption_prefers_own_image_over": table(by_caption),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-tiny", help="dual-encoder model spec (default: shapes-tiny)")
    p.add_argument("--train", type=int, default=4000, help="probe training images (default 4000)")
    p.add_argument("--test", type=int, default=1000, help="probe test images (default 1000)")
    p.add_argument("--groups", type=int, default=500, help="minimal-pair groups for the confusion (default 500)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    encoder = load_encoder(args.model, device="cpu")
    size = encoder.image_size
    train = list(samples(args.train, 77, size=size, minimal_pairs=True))
    test = list(samples(args.test, 78, size=size, minimal_pairs=True))
    tr_tok = layer_tokens(encoder, [s.image for s in train])
    te_tok = layer_tokens(encoder, [s.image for s in test])
    grid = int(round(tr_tok["final"].shape[1] ** 0.5))
    tr_y, te_y = patch_labels(train, grid, size), patch_labels(test, grid, size)
    result = {
        "model": args.model,
        "patch_colour_probe": {name: probe(tr_tok[name], tr_y, te_tok[name], te_y) for name in tr_tok},
        "minimal_pairs_dual": confusion(encoder, args.groups, 8),
        "relation_word_probe": relation_probe(encoder, args.train, args.test),
        "object_shape_probe": shape_probe(encoder, train, test, tr_tok, te_tok),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in result["patch_colour_probe"].items():
            print(f"{name:>8}: colour of object patches {r['object_patch_accuracy']:.3f}, "
                  f"background {r['background_accuracy']:.3f} ({r['object_patch_share']:.1%} of patches on objects)")
        c = result["minimal_pairs_dual"]
        print(f"dual encoder within groups of 4: t2i {c['t2i_in_group_accuracy']:.3f}, i2t {c['i2t_in_group_accuracy']:.3f}")
        for a, row in c["image_prefers_own_caption_over"].items():
            print(f"  image {a} prefers its caption over " + ", ".join(f"{b} {v:.3f}" for b, v in row.items()))
        r = result["relation_word_probe"]
        print("relation word (4 classes) read linearly from the text tower's output at: "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy_by_token"].items())
              + f" (majority class {r['majority_class']:.3f})")
        cos = r["input_embedding_cosine"]
        print("cosine of input embeddings: " + ", ".join(f"{a}/{b} {cos[a][b]:.2f}" for a, b in
                                                        (("left", "right"), ("above", "below"), ("left", "above"), ("below", "under"))))
        sp = result["object_shape_probe"]
        print(f"object shape (chance {sp['chance']:.2f}) from its 3x3 window of tokens: "
              + ", ".join(f"{k} linear {sp[k]['linear']:.3f} / MLP {sp[k]['mlp']:.3f}" for k in ("embed", "final")))
    return result


if __name__ == "__main__":
    main()
