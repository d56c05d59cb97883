"""The training loop: groups of four per step, AdamW, resumable checkpoints.

Each step draws (in this order, from one seeded generator, so a run resumed
from a checkpoint continues exactly where it stopped):

* ``batch_size`` minimal-pair groups (a generated scene and its three
  minimally different variants), optionally read as canonical scene keys
  early on (the curriculum);
* ``mined_groups`` groups of minimal-pair items from *different* groups that
  the dual encoder finds alike;
* ``alike_groups`` groups of ordinary items (scenes, or a folder's captioned
  images) the dual encoder finds alike;
* for captioned folders, ``text_groups`` images against their caption and its
  perturbed variants (words swapped, relation reversed).

The loss is :func:`losses.group_loss` over every group (softmax both ways),
plus the text-negative loss and, with ``shape_aux``, the local stem's shape loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..rerank import CrossAttentionITM, RerankerConfig
from .data import Pool
from .losses import group_logits, group_loss, shape_loss, text_negative_loss
from .mining import Alike

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSet:
    """What the loop draws from: ``pool`` holds ``n_minimal`` minimal-pair
    items first (groups of four consecutive ones), then the ordinary items."""

    pool: Pool
    n_minimal: int
    mined: Alike | None = None  # alike minimal-pair items (indices into the first n_minimal)
    alike: Alike | None = None  # alike ordinary items (indices past n_minimal)
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None  # (Nt, c, L, T) perturbed captions, their masks
    negative_vec: np.ndarray | None = None  # (Nt, c, D) their dual vectors


@dataclass(frozen=True)
class LoopOptions:
    steps: int
    batch_size: int = 32  # minimal-pair (or, without them, alike) groups of four per step
    mined_groups: int = 0
    alike_groups: int = 16
    text_groups: int = 0
    curriculum: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    shape_aux: float = 0.0
    seed: int = 0
    checkpoint_every: int = 100
    report_every: int = 100


class Trainer:
    """Trains ``module`` on ``data``; :meth:`run` returns when ``steps`` are
    done, saving a checkpoint in ``folder`` every ``checkpoint_every`` steps
    and when interrupted (Ctrl-C), from which :meth:`resume` continues."""

    def __init__(self, module: CrossAttentionITM, data: TrainSet, options: LoopOptions, folder: Path) -> None:
        from ..shapes import SHAPES

        self.module, self.data, self.options, self.folder = module, data, options, folder
        self.shape_head = nn.Linear(module.config.width, len(SHAPES)) if options.shape_aux else None
        params = list(module.parameters()) + (list(self.shape_head.parameters()) if self.shape_head else [])
        self.opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        self.rng = np.random.default_rng(options.seed)
        self.step = 0
        self.resumed_from: int | None = None

    # ------------------------------------------------------------- the step
    def draw(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One step's caption indices (groups of four, consecutive), the
        curriculum's canonical flags and the text-negative anchors."""
        o, d, rng = self.options, self.data, self.rng
        parts = []
        g = None
        if d.n_minimal:
            g = rng.integers(0, d.n_minimal // 4, o.batch_size)
            parts.append((g[:, None] * 4 + np.arange(4)).reshape(-1))
        if d.mined is not None and o.mined_groups:
            parts.append(d.mined.groups(rng.integers(0, d.n_minimal, o.mined_groups), rng).reshape(-1))
        if d.alike is not None:
            ordinary = len(d.pool) - d.n_minimal
            anchors = rng.integers(0, ordinary, o.alike_groups if d.n_minimal else o.batch_size)
            parts.append(d.n_minimal + d.alike.groups(anchors, rng).reshape(-1))
        canonical = None
        if o.curriculum and g is not None:  # canonical captions for N steps, then fading out over N more
            share = min(1.0, max(0.0, 2.0 - (self.step + 1) / o.curriculum))
            canonical = np.repeat(rng.random(len(g)) < share, 4)
        anchors_t = None
        if d.negatives is not None and o.text_groups:
            anchors_t = rng.integers(d.n_minimal, len(d.pool), o.text_groups)
        return np.concatenate(parts), canonical, anchors_t

    def loss(self, idx: np.ndarray, canonical: np.ndarray | None, anchors: np.ndarray | None) -> torch.Tensor:
        pool = self.data.pool
        loss = group_loss(group_logits(self.module, pool, idx, 4, canonical))
        if anchors is not None:
            assert self.data.negatives is not None and self.data.negative_vec is not None
            neg_tok, neg_mask = self.data.negatives
            text = torch.cat([pool.txt_tok[anchors][:, None], neg_tok[anchors]], 1)
            mask = torch.cat([pool.txt_mask[anchors][:, None], neg_mask[anchors]], 1)
            imgs = pool.txt_img[anchors]
            dual = None
            if self.module.config.residual:
                vec = np.concatenate([pool.txt_vec[anchors][:, None], self.data.negative_vec[anchors]], 1)
                dual = torch.from_numpy(np.einsum("ncd,nd->nc", vec, pool.img_vec[imgs]).astype(np.float32))
            loss = loss + text_negative_loss(self.module, pool.img_tok[imgs], text, mask, dual)
        if self.shape_head is not None:
            assert pool.shapes is not None
            imgs = pool.txt_img[idx]
            loss = loss + self.options.shape_aux * shape_loss(self.module, self.shape_head, pool.img_tok[imgs],
                                                              pool.shapes[imgs])
        return loss

    def run(self, progress: Any = None, report: Callable[[int, float], None] | None = None) -> float:
        """Train to ``steps``; ``progress`` a tqdm-like bar (``update``,
        ``set_postfix``), ``report(step, loss)`` called every ``report_every``
        steps and at the last. Returns the last step's loss."""
        o = self.options
        loss_value = float("nan")
        self.module.train()
        try:
            while self.step < o.steps:
                loss = self.loss(*self.draw())
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.step += 1
                loss_value = float(loss.item())
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                if o.checkpoint_every and self.step % o.checkpoint_every == 0 and self.step < o.steps:
                    self.save()
                if report is not None and (self.step % o.report_every == 0 or self.step == o.steps):
                    report(self.step, loss_value)
        except KeyboardInterrupt:
            self.save()
            raise
        self.module.eval()
        self.save()
        return loss_value

    # -------------------------------------------------------- checkpoints
    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT

    def save(self) -> Path:
        """Write the whole training state atomically (model, optimizer, generators, step)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "config": self.module.config.to_json(),
            "module": self.module.state_dict(),
            "shape_head": None if self.shape_head is None else self.shape_head.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return self.path

    def resume(self) -> int:
        """Continue from :meth:`save`'s checkpoint; returns the step it holds."""
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["module"])
        if self.shape_head is not None and state["shape_head"] is not None:
            self.shape_head.load_state_dict(state["shape_head"])
        self.opt.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.step = self.resumed_from = int(state["step"])
        return self.step

    @staticmethod
    def saved_config(folder: Path) -> RerankerConfig | None:
        """The module config of the checkpoint in ``folder``, if there is one."""
        path = folder / CHECKPOINT
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        return RerankerConfig.from_json(state["config"], where=str(path))
