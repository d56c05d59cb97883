"""``crossfind train-reranker``: train, calibrate, evaluate and describe a reranker.

:func:`train_reranker` builds the training data (:mod:`.data`), the module
(fresh, or continued from a saved reranker with ``init``), runs the
:class:`.trainer.Trainer`, then finishes: the residual reranker's dual-cosine
weight (``tune_dual``, generated scenes), Platt calibration on held-out pairs,
the float16 reranker folder that :meth:`retrieval.rerank.Reranker.load` reads,
the held-out evaluation (``train_metrics.json``) and the model card's
"Reranker" section (``README.md``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..encoders import Encoder, load_encoder
from ..errors import CrossfindError
from ..rerank import CrossAttentionITM, Reranker, RerankerConfig
from . import data as D
from .calibration import accuracy_by_kind, ece, fit_platt, pair_logits, sample_pairs, sigmoid, tune_dual
from .card import card_section, write_card
from .evaluation import group_accuracy, latency_ms, pairwise_eval, retrieval_eval
from .mining import Alike, mine
from .perturb import caption_negatives
from .trainer import CHECKPOINT, LoopOptions, Trainer, TrainSet

Log = Callable[[str], None]


class TrainingError(CrossfindError):
    """Training cannot run as asked (bad option combination, a checkpoint in the way)."""


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``crossfind train-reranker`` takes; see its ``--help``."""

    data: str
    model: str
    out: Path
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    init: Path | None = None
    residual: str = "auto"  # a starting dual-cosine weight, "auto" (the model's logit scale) or "off"
    curriculum: int = 0
    mined_groups: int = 0
    alike_groups: int = 16
    text_groups: int = 16
    width: int = 128
    depth: int = 2
    heads: int = 4
    image_layer: str = "final"
    words: bool = False
    image_depth: int = 0
    image_local: int = 0
    shape_aux: float = 0.0
    tune_dual: bool = False
    evaluate: bool = True
    eval_n: int = 1000
    val_n: int = 2000
    tune_n: int = 600
    calib_n: int = 6000
    candidates: int = 50
    checkpoint_every: int = 100
    report_every: int = 100
    resume: bool = False
    seed: int = 0
    command: str = ""


@dataclass(frozen=True)
class TrainReport:
    """What a run did: the reranker folder, steps, minutes and held-out metrics."""

    out: Path
    steps: int
    resumed_from: int | None
    minutes: float
    metrics: dict[str, Any]


def train_reranker(options: TrainOptions, log: Log = lambda _: None, progress: Any = None) -> TrainReport:
    """Train a reranker as ``options`` say; see the module docstring.

    ``progress(total, initial)`` returns a tqdm-like bar for the steps."""
    start = time.monotonic()
    spec = D.DataSpec.parse(options.data)
    _check(options, spec)
    if (options.out / CHECKPOINT).is_file() and not options.resume:
        raise TrainingError(f"{options.out / CHECKPOINT} holds a checkpoint of an earlier run: pass --resume to "
                            "continue it, or remove it to start again")
    torch.manual_seed(options.seed)
    encoder = load_encoder(options.model, device="cpu")
    module = _module(options, encoder, log)
    cfg = module.config
    if options.steps:
        trainset, held = _training_data(options, spec, encoder, cfg, log)
        log(f"features ready after {time.monotonic() - start:.0f}s")
    else:  # only tune, calibrate and evaluate
        trainset, held = TrainSet(D.Pool.empty(), 0), Held({})
    loop = LoopOptions(
        steps=options.steps, batch_size=options.batch_size, mined_groups=options.mined_groups,
        alike_groups=options.alike_groups, text_groups=options.text_groups if trainset.negatives is not None else 0,
        curriculum=options.curriculum, lr=options.lr, shape_aux=options.shape_aux, seed=options.seed,
        checkpoint_every=options.checkpoint_every, report_every=options.report_every,
    )
    trainer = Trainer(module, trainset, loop, options.out)
    if trainer.path.is_file():
        log(f"resumed from step {trainer.resume()} ({trainer.path})")
    if trainer.step < options.steps:
        bar = progress(options.steps, trainer.step) if progress is not None else None
        try:
            trainer.run(bar, lambda step, loss: log(_report(step, loss, module, held)))
        finally:
            if bar is not None:
                bar.close()
    del trainset
    metrics = _finish(options, spec, encoder, module, trainer, log)
    trainer.path.unlink(missing_ok=True)
    minutes = (time.monotonic() - start) / 60
    log(f"done in {minutes:.1f} min")
    return TrainReport(options.out, trainer.step, trainer.resumed_from, minutes, metrics)


def _check(o: TrainOptions, spec: D.DataSpec) -> None:
    if o.curriculum and not spec.shapes:
        raise TrainingError("--curriculum reads generated scenes' canonical keys: it needs DATA shapes:...")
    if o.curriculum and (spec.ordinary or o.mined_groups):
        raise TrainingError("--curriculum trains on minimal-pair groups alone (no ordinary=, no --mined-groups)")
    if o.curriculum and o.residual not in ("off",) and o.init is None:
        raise TrainingError("--curriculum trains the cross-attention alone: give --residual off")
    if o.shape_aux and not (spec.shapes and (o.image_local or o.init)):
        raise TrainingError("--shape-aux teaches the local stem shapes of generated scenes: DATA shapes:... and --local")
    if o.tune_dual and not spec.shapes:
        raise TrainingError("--tune-dual chooses the weight on generated scenes: it needs DATA shapes:...")
    if o.steps and spec.shapes and not (spec.minimal or spec.ordinary):
        raise TrainingError("shapes: trains on generated scenes: give minimal=N and/or ordinary=M")
    if o.steps == 0 and o.init is None:
        raise TrainingError("--steps 0 only calibrates and evaluates: give the reranker with --init")


# ------------------------------------------------------------------ the module
def _module(o: TrainOptions, encoder: Encoder, log: Log) -> CrossAttentionITM:
    """A fresh module, or the one saved in ``init`` (made residual when asked),
    or (``resume``) one shaped like the checkpoint's."""
    saved = Trainer.saved_config(o.out) if o.resume else None
    if saved is not None:
        return CrossAttentionITM(saved)
    residual = o.residual != "off"
    start = None if o.residual in ("off", "auto") else float(o.residual)
    if o.init is not None:
        module = Reranker.load(o.init, encoder).module.float()
        log(f"started from {o.init}")
        if not residual or module.config.residual:
            return module
        grown = CrossAttentionITM(replace(module.config, residual=True))  # the head is loaded, not zeroed
        grown.load_state_dict(module.state_dict(), strict=False)
        with torch.no_grad():
            grown.dual_scale.fill_(start if start is not None else _logit_scale(encoder))
            grown.dual_bias.zero_()
        return grown
    cfg = RerankerConfig.for_encoder(
        encoder, width=o.width, depth=o.depth, heads=o.heads, residual=residual, image_layer=o.image_layer,
        text_words=o.words, image_depth=o.image_depth, image_local=o.image_local,
    )
    module = CrossAttentionITM(cfg)
    if residual:  # start as the dual encoder: its own logit scale on the cosine
        with torch.no_grad():
            module.dual_scale.fill_(start if start is not None else _logit_scale(encoder))
    return module


def _logit_scale(encoder: Encoder) -> float:
    scale = getattr(encoder.model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else 1.0


# ------------------------------------------------------------------- the data
@dataclass
class Held:
    """Held-out groups watched during training: name -> (pool, groups of four)."""

    sets: dict[str, tuple[D.Pool, np.ndarray]]


def _training_data(o: TrainOptions, spec: D.DataSpec, encoder: Encoder, cfg: RerankerConfig,
                   log: Log) -> tuple[TrainSet, Held]:
    layer, words = cfg.image_layer, cfg.text_words
    if spec.shapes:
        t0 = time.monotonic()
        held: dict[str, tuple[D.Pool, np.ndarray]] = {}
        mined = minimal = None
        if spec.minimal:
            minimal = D.shapes_pool(encoder, spec.minimal, D.MINIMAL_SEED, True, layer, words, canonical=o.curriculum > 0)
            val = D.shapes_pool(encoder, o.val_n, D.HELD_MINIMAL_SEED, True, layer, words)
            held["held-out minimal groups"] = (val, np.arange(len(val) // 4 * 4).reshape(-1, 4))
        if o.mined_groups and minimal is not None:
            mined = Alike(minimal.img_vec, minimal.txt_vec, minimal.txt_key)
            near = Alike(val.img_vec, val.txt_vec, val.txt_key)
            held["mined"] = (val, near.groups(np.arange(min(500, o.val_n)), np.random.default_rng(8)))
            log(f"held-out mined minimal groups, dual encoder: {_fmt(near.dual_accuracy(held['mined'][1]))}")
        pool, alike = minimal, None
        if spec.ordinary:
            ordinary = D.shapes_pool(encoder, spec.ordinary, D.ORDINARY_SEED, False, layer, words)
            alike = Alike(ordinary.img_vec, ordinary.txt_vec, ordinary.txt_key)
            val_o = D.shapes_pool(encoder, o.val_n, D.HELD_ORDINARY_SEED, False, layer, words)
            near = Alike(val_o.img_vec, val_o.txt_vec, val_o.txt_key)
            held["ordinary"] = (val_o, near.groups(np.arange(min(500, o.val_n)), np.random.default_rng(9)))
            log(f"held-out ordinary groups, dual encoder: {_fmt(near.dual_accuracy(held['ordinary'][1]))}")
            pool = ordinary if minimal is None else D.Pool.join(minimal, ordinary)
        log(f"encoded {spec.minimal} minimal-pair + {spec.ordinary} ordinary + held-out items "
            f"in {time.monotonic() - t0:.0f}s")
        assert pool is not None
        return TrainSet(pool, spec.minimal, mined=mined, alike=alike), Held(held)
    train, _, evalset = _folder_split(spec, o.seed)
    pool = D.records_pool(encoder, train, layer, words)
    log(f"{len(pool)} training captions of {len(pool.img_key)} images")
    alike = Alike(pool.img_vec[pool.txt_img], pool.txt_vec, pool.txt_key)
    negatives, negative_vec = caption_negatives(encoder, pool.texts, words, seed=o.seed)
    held_pool = D.records_pool(encoder, evalset, layer, words)
    held_groups = Alike(held_pool.img_vec[held_pool.txt_img], held_pool.txt_vec, held_pool.txt_key)
    groups = held_groups.groups(np.arange(min(500, len(held_pool))), np.random.default_rng(9))
    return (TrainSet(pool, 0, alike=alike, negatives=negatives, negative_vec=negative_vec),
            Held({"held-out alike groups": (held_pool, groups)}))


def _folder_split(spec: D.DataSpec, seed: int) -> tuple[list, list, list]:
    """Training, calibration and evaluation records of a captioned folder,
    split by key (scene, else image): 10% of the keys each held out."""
    records = [(image, caption, scene or image) for image, caption, scene in D.folder_records(spec)]
    keys = [r[2] for r in records]
    held_eval = D.split_keys(keys, 0.1, seed + 1)
    rest = [k for k in keys if k not in held_eval]
    held_calib = D.split_keys(rest, 0.1 / 0.9, seed) if len(set(rest)) > 1 else set()
    train = [r for r in records if r[2] not in held_eval and r[2] not in held_calib]
    if not train:
        raise TrainingError(f"{spec.folder}: too few images to hold some out for calibration and evaluation")
    return train, [r for r in records if r[2] in held_calib], [r for r in records if r[2] in held_eval]


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in acc.items())


def _report(step: int, loss: float, module: CrossAttentionITM, held: Held) -> str:
    parts = [f"{name} {_fmt(group_accuracy(module, pool, groups))}" for name, (pool, groups) in held.sets.items()]
    return f"step {step} loss {loss:.3f} " + "; ".join(parts)


# ------------------------------------------------------------------ finishing
def _finish(o: TrainOptions, spec: D.DataSpec, encoder: Encoder, module: CrossAttentionITM, trainer: Trainer,
            log: Log) -> dict[str, Any]:
    """Dual weight, calibration, the saved folder, evaluation and the card."""
    info: dict[str, Any] = {"command": o.command, "steps": trainer.step, "resumed_from": trainer.resumed_from,
                            "options": {k: str(v) for k, v in asdict(o).items()}}
    module.eval()
    cfg = module.config
    if o.tune_dual:
        if not cfg.residual:
            raise TrainingError("--tune-dual: this reranker does not build on the dual encoder (--residual off)")
        pools = {name: D.shapes_pool(encoder, o.tune_n, seed, minimal, cfg.image_layer, cfg.text_words)
                 for name, seed, minimal in (("ordinary", D.TUNE_SEEDS[0], False), ("minimal", D.TUNE_SEEDS[1], True))}
        info["tune_dual"] = tune_dual(Reranker(module, encoder), pools, log, o.candidates)
        log(f"dual-cosine weight {info['tune_dual']['dual_scale']:.0f}")
    # Round to the float16 that gets saved, so this reranker scores exactly like the loaded one.
    module.load_state_dict({k: v.half().float() for k, v in module.state_dict().items()})
    calib = _calibration_pool(o, spec, encoder, cfg)
    c, i, y, kinds = sample_pairs(calib, max(2000, 2 * len(calib.texts)), np.random.default_rng(D.CALIB_SEED + 8))
    logits = pair_logits(module, calib, c, i)
    cfg.shift, cfg.temperature = fit_platt(logits, y)
    log(f"shift {cfg.shift:.4f} temperature {cfg.temperature:.4f}; calibration-split ECE "
        f"{ece(sigmoid((logits - cfg.shift) / cfg.temperature), y):.4f} ({len(y)} pairs)")
    log(f"calibration-split accuracy by pair kind: {json.dumps(accuracy_by_kind(logits - cfg.shift, y, kinds))}")
    reranker = Reranker(module, encoder)
    reranker.save(o.out)
    log(f"saved {o.out}")
    metrics: dict[str, Any] = {}
    if o.evaluate:
        metrics = _evaluate(o, spec, encoder, reranker, log)
        for k, v in metrics.items():
            log(f"{k} = {v:.4f}" if isinstance(v, float) else f"{k} = {v}")
        t2i = "mp_t2i" if spec.shapes else "t2i"
        log(f"held-out {'minimal-pairs ' if spec.shapes else ''}t2i R@1: dual encoder {metrics[f'{t2i}_r1_dual']:.3f}, "
            f"re-ranked {metrics[f'{t2i}_r1_rerank']:.3f}")
        write_card(o.out / "README.md", card_section(cfg, info, metrics, o.out, spec.shapes))
    (o.out / "train_metrics.json").write_text(json.dumps({"info": info, "metrics": metrics}, indent=2) + "\n")
    return metrics


def _calibration_pool(o: TrainOptions, spec: D.DataSpec, encoder: Encoder, cfg: RerankerConfig) -> D.Pool:
    """Held-out pairs to fit the calibration on, with mined negatives: for
    generated scenes a split of fresh scenes (seeds 300, 301) and their
    minimally different variants; for a folder, its calibration split."""
    layer, words = cfg.image_layer, cfg.text_words
    if spec.shapes:
        generated = D.generated_records(o.calib_n, D.CALIB_SEED)
        held = D.split_keys([s.scene.key() for s, _ in generated], 0.1, D.CALIB_SEED)
        records = [(s.image, s.caption, s.scene.key()) for s, _ in generated if s.scene.key() in held]
        pool = D.records_pool(encoder, records, layer, words, perturb_seed=D.CALIB_SEED + 7)
    else:
        _, records, _ = _folder_split(spec, o.seed)
        if not records:
            raise TrainingError(f"{spec.folder}: too few images to hold some out for calibration")
        pool = D.records_pool(encoder, records, layer, words)
    pool.mined_t2i = mine(pool.txt_vec, pool.img_vec, pool.txt_key, pool.img_key, 10)
    pool.mined_i2t = mine(pool.img_vec, pool.txt_vec, pool.img_key, pool.txt_key, 10)
    return pool


def _evaluate(o: TrainOptions, spec: D.DataSpec, encoder: Encoder, reranker: Reranker, log: Log) -> dict[str, Any]:
    """Held-out metrics: retrieval R@1/5/10 (dual and re-ranked), ECE, and for
    generated scenes minimal pairs, ordinary scenes and pairwise preference."""
    cfg = reranker.config
    layer, words = cfg.image_layer, cfg.text_words
    m: dict[str, Any] = {}
    if spec.shapes:
        log(f"evaluating on minimal pairs (seed {D.EVAL_SEEDS[1]})")
        mp = D.shapes_pool(encoder, o.eval_n, D.EVAL_SEEDS[1], True, layer, words)
        m.update({f"mp_{k}": v for k, v in retrieval_eval(reranker, mp, o.candidates).items()})
        log(f"evaluating on ordinary scenes (seed {D.EVAL_SEEDS[0]})")
        from ..shapes import samples

        items = list(samples(o.eval_n, D.EVAL_SEEDS[0], size=encoder.image_size))
        ordinary = D.records_pool(encoder, [(x.image, x.caption, x.scene.key()) for x in items], layer, words,
                                  perturb_seed=D.EVAL_SEEDS[0] + 50_000)
        plain = ordinary.take(o.eval_n)  # retrieval on the generated items; the variants serve pairwise and ECE
        m.update({f"ord_{k}": v for k, v in retrieval_eval(reranker, plain, o.candidates).items()})
        m.update(pairwise_eval(reranker, encoder, plain, seed=D.EVAL_SEEDS[0]))
        pool, rng = ordinary, np.random.default_rng(D.EVAL_SEEDS[0])
    else:
        _, _, records = _folder_split(spec, o.seed)
        pool, rng = D.records_pool(encoder, records, layer, words), np.random.default_rng(o.seed + 11)
        m.update(retrieval_eval(reranker, pool, o.candidates))
    pool.mined_t2i = mine(pool.txt_vec, pool.img_vec, pool.txt_key, pool.img_key, 10)
    pool.mined_i2t = mine(pool.img_vec, pool.txt_vec, pool.img_key, pool.txt_key, 10)
    c, i, y, kinds = sample_pairs(pool, 4000, rng)
    logits = pair_logits(reranker.module, pool, c, i)
    m["ece"] = ece(reranker.probability(logits), y)
    m["ece_uncalibrated"] = ece(sigmoid(logits), y)
    m["ece_pairs"] = len(y)
    m["ece_positive_share"] = float(y.mean())
    m.update({f"pair_accuracy_{k}": v for k, v in accuracy_by_kind(logits - cfg.shift, y, kinds).items()})
    m["latency_ms"] = latency_ms(reranker)
    return m
