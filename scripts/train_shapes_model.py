#!/usr/bin/env python
"""Train ``shapes-tiny``, the project's own small CLIP, on generated shape scenes.

The model is an open_clip ``CLIP`` built from a custom config (ViT 64px/8,
width 128, 4 layers; text width 64, 3 layers, context 32; embed 128) through
``open_clip.create_model("local-dir:...")``, the default SimpleTokenizer from
``open_clip.get_tokenizer`` and open_clip's ``ClipLoss``, trained on the CPU.

Seeds: the training pool is ``retrieval.shapes.samples(pool, seed)`` with
``--seed`` (default 1000; use 1000 and up for training). Held-out evaluation:
seed 7 (ordinary scenes) and seed 8 (minimal pairs); seed 9 monitors training.
None of these may be used for training.

At the end the weights are saved as float16 safetensors with
``open_clip_config.json`` and a model card, loaded back through
``retrieval.encoders.load_encoder`` and evaluated with the encoder's own
``encode_texts`` / ``encode_pil`` on PNG files written by
``retrieval.shapes.generate``, so the numbers are what users get.

Example::

    python scripts/train_shapes_model.py --minutes 25 --steps 4000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from retrieval import shapes  # noqa: E402
from retrieval.evaluate import recall_at_k  # noqa: E402

LOG = logging.getLogger("train_shapes_model")
DEFAULT_OUT = ROOT / "retrieval" / "models" / "shapes-tiny"
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    out: Path = DEFAULT_OUT  # folder that receives config, weights and model card
    steps: int = 4000  # optimiser steps at most
    batch_size: int = 256  # scenes per step (duplicate keys removed within a batch)
    minutes: float | None = None  # wall-clock cap on training; the lr schedule follows whichever of steps/time ends first
    seed: int = 1000  # training pool seed (1000 and up; never 7, 8 or 9)
    pool: int = 80000  # scenes pre-rendered for training
    lr: float = 1e-3  # peak AdamW learning rate
    warmup: int = 100  # linear warmup steps, then cosine decay
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    threads: int = 2  # torch CPU threads
    eval_n: int = 1000  # held-out images for the final evaluation (both sets)
    eval_seed: int = 7  # held-out ordinary scenes
    pairs_seed: int = 8  # held-out minimal pairs
    monitor_seed: int = 9  # small set checked during training
    monitor_n: int = 500  # images in the monitoring set
    monitor_every: int = 250  # steps between monitoring evaluations (0: never)
    log_every: int = 25  # steps between loss lines
    image_size: int = 64  # input resolution
    patch_size: int = 8  # ViT patch size
    vision_width: int = 128  # ViT width
    vision_layers: int = 4  # ViT depth
    vision_head_width: int = 32  # ViT width per attention head
    context_length: int = 32  # text tokens
    text_width: int = 64  # text transformer width (token table is 49408 x width)
    text_heads: int = 4  # text attention heads
    text_layers: int = 3  # text transformer depth
    embed_dim: int = 128  # joint embedding size
    init: Path | None = None  # folder of a saved model (same config) to continue training from
    command: str = ""  # the command line, recorded in the model card
    notes: list[str] = field(default_factory=list)  # free-form lines for the model card

    def open_clip_config(self) -> dict:
        """The ``open_clip_config.json`` content for this model."""
        return {
            "model_cfg": {
                "embed_dim": self.embed_dim,
                "vision_cfg": {
                    "image_size": self.image_size,
                    "patch_size": self.patch_size,
                    "width": self.vision_width,
                    "layers": self.vision_layers,
                    "head_width": self.vision_head_width,
                    "mlp_ratio": 4.0,
                },
                "text_cfg": {
                    "context_length": self.context_length,
                    "vocab_size": 49408,
                    "width": self.text_width,
                    "heads": self.text_heads,
                    "layers": self.text_layers,
                },
            },
            "preprocess_cfg": {
                "mean": list(MEAN),
                "std": list(STD),
                "interpolation": "bicubic",
                "resize_mode": "shortest",
            },
        }


# ---------------------------------------------------------------------------- data
def render_pool(n: int, seed: int, size: int) -> tuple[np.ndarray, list[shapes.Scene]]:
    """Pre-render ``n`` training scenes as a uint8 (n, size, size, 3) array."""
    images = np.empty((n, size, size, 3), np.uint8)
    scenes = []
    for i, s in enumerate(shapes.samples(n, seed, size)):
        images[i] = np.asarray(s.image)
        scenes.append(s.scene)
    return images, scenes


def to_pixels(batch: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """uint8 NHWC -> normalised float NCHW, as open_clip's eval transform does."""
    import torch

    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------- evaluation
def recall_at(sim: np.ndarray, query_keys: Sequence[str], gallery_keys: Sequence[str], ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of a query x gallery similarity matrix, counted by :func:`retrieval.evaluate.recall_at_k`."""
    order = np.argsort(-sim, axis=1, kind="stable")[:, : max(ks)]
    return recall_at_k(np.asarray(gallery_keys, dtype=object)[order], query_keys, ks)


def evaluate_encoder(encoder: Any, work: Path, cfg: TrainConfig) -> dict[str, float]:
    """Held-out retrieval numbers through the public ``Encoder`` API."""
    from PIL import Image

    out: dict[str, float] = {}
    for name, seed, pairs in (("heldout", cfg.eval_seed, False), ("pairs", cfg.pairs_seed, True)):
        root = work / name
        records = shapes.generate(root, cfg.eval_n, seed, size=cfg.image_size, minimal_pairs=pairs)
        images = []
        for rec in records:
            with Image.open(root / rec["image"]) as im:
                images.append(im.convert("RGB"))
        img = np.concatenate([encoder.encode_pil(images[i : i + 256]) for i in range(0, len(images), 256)])
        txt = encoder.encode_texts([r["caption"] for r in records])
        keys = [r["scene"] for r in records]
        sim = txt @ img.T
        ks = (1, 5, 10) if not pairs else (1,)
        for k, v in recall_at(sim, keys, keys, ks).items():
            out[f"{name}_t2i_R@{k}"] = v
        for k, v in recall_at(sim.T, keys, keys, ks).items():
            out[f"{name}_i2t_R@{k}"] = v
        if pairs:
            # Winoground-style: within each group of four, is the right one on top?
            g = len(records) // 4 * 4
            blocks = sim[:g].reshape(-1, 4, g)
            text_ok, image_ok = [], []
            for b in range(blocks.shape[0]):
                local = blocks[b][:, 4 * b : 4 * b + 4]  # captions x images of group b
                text_ok.append(np.mean(local.argmax(axis=1) == np.arange(4)))
                image_ok.append(np.mean(local.argmax(axis=0) == np.arange(4)))
            out["pairs_group_t2i_acc"] = float(np.mean(text_ok))
            out["pairs_group_i2t_acc"] = float(np.mean(image_ok))
    return out


def _monitor(model: Any, tokenizer: Any, images: np.ndarray, scenes: list[shapes.Scene], seed: int) -> dict[str, float]:
    import torch

    rng = np.random.default_rng([seed, 1])
    keys = [s.key() for s in scenes]
    caps = [s.caption(rng) for s in scenes]
    model.eval()
    with torch.inference_mode():
        iv = torch.cat([model.encode_image(to_pixels(images[i : i + 256]), normalize=True) for i in range(0, len(images), 256)])
        tv = model.encode_text(tokenizer(caps), normalize=True)
    model.train()
    sim = (tv @ iv.T).numpy()
    t2i = recall_at(sim, keys, keys, (1, 5))
    i2t = recall_at(sim.T, keys, keys, (1, 5))
    return {"t2i_R@1": t2i[1], "t2i_R@5": t2i[5], "i2t_R@1": i2t[1], "i2t_R@5": i2t[5]}


# ------------------------------------------------------------------------ training
def save_model(model: Any, cfg: TrainConfig, out: Path) -> None:
    """Write ``open_clip_config.json`` and float16 ``open_clip_model.safetensors`` into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").half().contiguous() for k, v in model.state_dict().items()}
    tmp = out / "open_clip_model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "model": "shapes-tiny"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "open_clip_model.safetensors")
    with open(out / "open_clip_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg.open_clip_config(), f, indent=2)
        f.write("\n")


def _decays(name: str, param: Any) -> bool:
    """Weight decay on matrices and the token table, as open_clip does; not on gains, biases, positions."""
    return bool(param.ndim >= 2 and ("embedding" not in name or name == "token_embedding.weight"))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, save into ``cfg.out``, evaluate through ``load_encoder``; return the run summary."""
    import open_clip
    import torch

    from retrieval.encoders import load_encoder

    if cfg.seed in (cfg.eval_seed, cfg.pairs_seed, cfg.monitor_seed):
        raise ValueError(f"training seed {cfg.seed} is reserved for evaluation")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2**31 - 1])
    start = time.time()

    with tempfile.TemporaryDirectory(prefix="shapes-train-") as work_str:
        work = Path(work_str)
        stage = work / "stage"
        stage.mkdir()
        (stage / "open_clip_config.json").write_text(json.dumps(cfg.open_clip_config()))
        model = open_clip.create_model(f"local-dir:{stage}", output_dict=True)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{stage}")
        if cfg.init is not None:
            open_clip.load_checkpoint(model, str(Path(cfg.init) / "open_clip_model.safetensors"))
            model.float()
            LOG.info("continuing from the weights in %s", cfg.init)
        loss_fn = open_clip.ClipLoss()
        n_params = sum(p.numel() for p in model.parameters())

        t0 = time.time()
        pool, scenes = render_pool(cfg.pool, cfg.seed, cfg.image_size)
        keys = [s.key() for s in scenes]
        mon_images, mon_scenes = render_pool(cfg.monitor_n, cfg.monitor_seed, cfg.image_size)
        LOG.info("rendered %d training scenes in %.1fs; model has %.2fM parameters", len(scenes), time.time() - t0, n_params / 1e6)

        named = list(model.named_parameters())
        decay = [p for n, p in named if _decays(n, p)]
        no_decay = [p for n, p in named if not _decays(n, p)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        budget = cfg.minutes * 60.0 if cfg.minutes else math.inf
        train_start = time.time()
        step, seen, last_loss = 0, 0, float("nan")
        history: list[dict[str, float]] = []
        model.train()
        while True:
            elapsed = time.time() - train_start
            progress = max(step / cfg.steps, elapsed / budget)
            if progress >= 1.0:
                break
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1.0 + math.cos(math.pi * progress))
            for group in opt.param_groups:
                group["lr"] = lr

            # a batch of distinct scene keys: equal keys would be false negatives
            cand = rng.choice(len(scenes), size=min(len(scenes), cfg.batch_size + cfg.batch_size // 4), replace=False)
            batch, used = [], set()
            for i in cand:
                if keys[i] not in used:
                    used.add(keys[i])
                    batch.append(int(i))
                if len(batch) == cfg.batch_size:
                    break
            images = to_pixels(pool[batch])
            texts = tokenizer([scenes[i].caption(rng) for i in batch])

            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            seen += len(batch)
            last_loss = loss.item()
            if cfg.log_every and step % cfg.log_every == 0:
                LOG.info(
                    "step %d loss %.4f lr %.2e scale %.1f %.2fs/step elapsed %.0fs",
                    step, last_loss, lr, model.logit_scale.exp().item(), (time.time() - train_start) / step, time.time() - train_start,
                )
            if cfg.monitor_every and step % cfg.monitor_every == 0:
                m = _monitor(model, tokenizer, mon_images, mon_scenes, cfg.monitor_seed)
                history.append({"step": step, **m})
                LOG.info("step %d monitor (seed %d, %d images): %s", step, cfg.monitor_seed, cfg.monitor_n, json.dumps(m))
        train_seconds = time.time() - train_start
        LOG.info("trained %d steps (%d samples) in %.0fs, final loss %.4f", step, seen, train_seconds, last_loss)

        model.eval()
        save_model(model, cfg, cfg.out)
        del pool
        encoder = load_encoder(f"local-dir:{Path(cfg.out).resolve()}", device="cpu")
        t0 = time.time()
        metrics = evaluate_encoder(encoder, work / "eval", cfg)
        LOG.info("held-out evaluation in %.0fs: %s", time.time() - t0, json.dumps(metrics))

    summary = {
        "steps": step,
        "samples": seen,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - start,
        "final_loss": last_loss,
        "parameters": n_params,
        "weights_bytes": (Path(cfg.out) / "open_clip_model.safetensors").stat().st_size,
        "metrics": metrics,
        "history": history,
    }
    write_model_card(cfg, summary)
    return summary


def write_model_card(cfg: TrainConfig, summary: dict[str, Any]) -> None:
    """Write ``README.md`` into ``cfg.out`` describing data, seeds, run and held-out recall."""
    m = summary["metrics"]
    machine = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs visible, torch threads {cfg.threads}, no GPU"
    hist = "\n".join(
        f"| {h['step']} | {h['t2i_R@1']:.3f} | {h['t2i_R@5']:.3f} | {h['i2t_R@1']:.3f} | {h['i2t_R@5']:.3f} |" for h in summary["history"]
    )
    mc = cfg.open_clip_config()["model_cfg"]
    init_line = f"- initialised from the weights in `{cfg.init}` (continued training), not from scratch\n" if cfg.init else ""
    notes = "".join(f"- {line}\n" for line in cfg.notes)
    text = f"""# shapes-tiny

A small CLIP-style dual encoder (open_clip `CLIP`) trained from scratch by
crossfind on the generated *shapes* dataset (`retrieval/shapes.py`): scenes of
one to three coloured shapes ({len(shapes.COLORS)} colours, {len(shapes.SHAPES)} shapes, 2 sizes) with
left/right/above/below relations, captions such as "a small red circle left of
a large blue square". It makes crossfind's demo, tests and reranker
experiments run offline. **It knows nothing about real photos**; use a real
CLIP model for those.

Load it with `retrieval.encoders.load_encoder("shapes-tiny")`, or with
open_clip directly: `open_clip.create_model_and_transforms("local-dir:PATH")`
and `open_clip.get_tokenizer("local-dir:PATH")` (default SimpleTokenizer,
context {cfg.context_length}).

## Architecture

- vision: ViT, {cfg.image_size}px input, patch {cfg.patch_size}, width {cfg.vision_width}, {cfg.vision_layers} layers
- text: transformer, context {cfg.context_length}, width {cfg.text_width}, {cfg.text_heads} heads, {cfg.text_layers} layers
- joint embedding: {cfg.embed_dim}; learnable logit scale
- {summary['parameters'] / 1e6:.2f}M parameters, stored as float16 safetensors ({summary['weights_bytes'] / 1e6:.1f} MB)
- preprocessing: mean {list(MEAN)}, std {list(STD)}, bicubic resize of the shortest side, centre crop

Config: `{json.dumps(mc)}`

## Training

- data: {cfg.pool} scenes pre-rendered at {cfg.image_size}px from `retrieval.shapes.samples(n, seed={cfg.seed})`;
  each step draws a batch of distinct scene keys and a fresh caption phrasing per scene; no image augmentation
- seeds: training pool {cfg.seed} (training seeds are 1000 and up); held-out evaluation {cfg.eval_seed};
  minimal pairs {cfg.pairs_seed}; monitoring during training {cfg.monitor_seed}
- objective: open_clip `ClipLoss` (symmetric InfoNCE)
- optimiser: AdamW, peak lr {cfg.lr}, betas (0.9, 0.98), weight decay {cfg.weight_decay}, {cfg.warmup} warmup steps then cosine
  (the schedule runs on whichever of the step count {cfg.steps} and the wall-clock cap {cfg.minutes} min ends first)
- batch size {cfg.batch_size}; {summary['steps']} steps, {summary['samples']} samples, final loss {summary['final_loss']:.4f}
- wall time: {summary['train_seconds'] / 60:.1f} min training, {summary['total_seconds'] / 60:.1f} min in all (rendering, evaluation)
- machine: {machine}; the CPU was shared with other work
- command: `{cfg.command or 'train(TrainConfig(...))'}`
{init_line}{notes}
## Held-out evaluation

Measured after saving, through `retrieval.encoders.load_encoder` (`Encoder.encode_texts`,
`Encoder.encode_pil`) on PNG files written by `retrieval.shapes.generate`.

Ordinary scenes: {cfg.eval_n} images from seed {cfg.eval_seed}, one caption each; gallery = the {cfg.eval_n}
images (text->image) or the {cfg.eval_n} captions (image->text). A hit is a
retrieved item with the query's canonical scene key.

| direction | R@1 | R@5 | R@10 |
| --- | --- | --- | --- |
| text -> image | {m['heldout_t2i_R@1']:.3f} | {m['heldout_t2i_R@5']:.3f} | {m['heldout_t2i_R@10']:.3f} |
| image -> text | {m['heldout_i2t_R@1']:.3f} | {m['heldout_i2t_R@5']:.3f} | {m['heldout_i2t_R@10']:.3f} |

Minimal pairs (compositional test): {cfg.eval_n} images from seed {cfg.pairs_seed} with
`minimal_pairs=True`, groups of four two-object scenes (a scene, its colours
swapped, its shapes swapped, its relation reversed).

| measure | value |
| --- | --- |
| text -> image R@1 over all {cfg.eval_n} images | {m['pairs_t2i_R@1']:.3f} |
| image -> text R@1 over all {cfg.eval_n} captions | {m['pairs_i2t_R@1']:.3f} |
| within-group text -> image accuracy (chance 0.25) | {m['pairs_group_t2i_acc']:.3f} |
| within-group image -> text accuracy (chance 0.25) | {m['pairs_group_i2t_acc']:.3f} |

Monitoring during training ({cfg.monitor_n} images, seed {cfg.monitor_seed}, model in memory):

| step | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 |
| --- | --- | --- | --- | --- |
{hist}
"""
    (Path(cfg.out) / "README.md").write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python scripts/train_shapes_model.py --minutes 25")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the bundled retrieval/models/shapes-tiny)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimiser steps at most")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap on training")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="training pool seed (1000 and up)")
    p.add_argument("--pool", type=int, default=TrainConfig.pool, help="training scenes to pre-render")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="linear warmup steps")
    p.add_argument("--vision-width", type=int, default=TrainConfig.vision_width)
    p.add_argument("--vision-layers", type=int, default=TrainConfig.vision_layers)
    p.add_argument("--text-width", type=int, default=TrainConfig.text_width, help="at most 64 keeps the token table small")
    p.add_argument("--text-layers", type=int, default=TrainConfig.text_layers)
    p.add_argument("--eval-n", type=int, default=TrainConfig.eval_n, help="held-out images per evaluation set")
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch CPU threads (1 is faster on a busy machine)")
    p.add_argument("--init", type=Path, default=None, help="continue training from the model in this folder (same config)")
    p.add_argument("--note", action="append", default=[], help="a line for the model card (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    LOG.setLevel(logging.INFO)
    cfg = TrainConfig(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        minutes=args.minutes,
        seed=args.seed,
        pool=args.pool,
        lr=args.lr,
        warmup=args.warmup,
        vision_width=args.vision_width,
        vision_layers=args.vision_layers,
        text_width=args.text_width,
        text_layers=args.text_layers,
        eval_n=args.eval_n,
        threads=args.threads,
        init=args.init,
        notes=args.note,
        command="python scripts/train_shapes_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
