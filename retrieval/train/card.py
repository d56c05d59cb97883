"""The model card's "Reranker" section: what was trained, how, and what it scores held out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..rerank import RerankerConfig
from .data import CALIB_SEED, EVAL_SEEDS, TUNE_SEEDS


def write_card(card: Path, text: str) -> None:
    """Replace or append the "## Reranker" section of a model card, leaving the rest as it is."""
    old = card.read_text(encoding="utf-8") if card.exists() else ""
    section = re.compile(r"^## Reranker\n.*?(?=^## |\Z)", re.S | re.M)
    if section.search(old):
        new = section.sub(lambda _: text.rstrip("\n") + "\n\n", old).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text.rstrip("\n") + "\n"
    card.write_text(new, encoding="utf-8")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def card_section(cfg: RerankerConfig, info: dict[str, Any], m: dict[str, Any], out: Path, shapes: bool) -> str:
    """Markdown of the section (architecture, training, calibration, held-out table)."""
    size_mb = (out / "reranker.safetensors").stat().st_size / 1e6
    lines = [
        "## Reranker",
        "",
        "A cross-attention image-text matching model (ALBEF/BLIP style) over this model's frozen tokens: "
        f"width {cfg.width}, {cfg.image_depth} image self-attention block(s) over the {cfg.image_tokens} patch tokens "
        f"of layer `{cfg.image_layer}`"
        + (f" (plus a local stem, hidden width {cfg.image_local}, over each patch's 3x3 neighbourhood)" if cfg.image_local else "")
        + f", then {cfg.depth} blocks of [text self-attention, cross-attention to the patches, MLP], {cfg.heads} heads, "
        "a learned [ITM] token and a logit head" + (" plus a weight on the dual-encoder cosine" if cfg.residual else "")
        + "; text tokens are the tower's outputs" + (" beside its input word embeddings" if cfg.text_words else "") + ".",
        f"Match probability = sigmoid((logit - {cfg.shift:.3f}) / {cfg.temperature:.3f}), shift and temperature "
        "fitted on held-out pairs. Files: "
        f"`reranker.safetensors` (float16, {size_mb:.1f} MB), `reranker.json`.",
        "",
        f"Trained by `{info['command']}` ({info['steps']} steps in this run"
        + (f", resumed at step {info['resumed_from']}" if info.get("resumed_from") else "") + ").",
    ]
    if "tune_dual" in info:
        lines.append(f"The dual-cosine weight, {info['tune_dual']['dual_scale']:.0f}, was chosen by top-50 re-ranked t2i "
                     f"R@1 on fresh validation scenes (seeds {TUNE_SEEDS[0]} and {TUNE_SEEDS[1]}, {info['tune_dual']['n']} "
                     "each): the best mean of minimal-pairs and ordinary R@1 that keeps ordinary R@1 at least the "
                     "dual encoder's.")
    if not m:
        return "\n".join(lines) + "\n"
    if shapes:
        lines += [
            f"Calibrated on seeds {CALIB_SEED} and {CALIB_SEED + 1} with minimally different variants and mined near "
            f"misses; evaluated on fresh seeds {EVAL_SEEDS[0]} (ordinary) and {EVAL_SEEDS[1]} (minimal pairs), "
            "used neither here nor for the dual encoder.",
            "",
            "| measure (held out) | dual encoder | re-ranked |",
            "| --- | --- | --- |",
        ]
        for name, key in (("minimal pairs, t2i", "mp_t2i"), ("minimal pairs, i2t", "mp_i2t"),
                          ("ordinary scenes, t2i", "ord_t2i"), ("ordinary scenes, i2t", "ord_i2t")):
            for k in (1, 5, 10):
                lines.append(f"| {name} R@{k} (top-50 re-ranked) | {m[f'{key}_r{k}_dual']:.3f} | {m[f'{key}_r{k}_rerank']:.3f} |")
        lines.append(f"| minimal pairs, dual-encoder t2i R@1 misses fixed | ({m['mp_t2i_misses_dual']} misses) | "
                     f"{_pct(m['mp_t2i_misses_fixed'])} |")
        for name in ("colors", "shapes", "relation"):
            lines.append(f"| pairwise: true caption preferred, {name} swapped (n={m[f'pairwise_{name}_n']}) | "
                         f"{_pct(m[f'pairwise_{name}_dual'])} | {_pct(m[f'pairwise_{name}_rerank'])} |")
        lines.append(f"| pairwise: all (n={m['pairwise_n']}) | {_pct(m['pairwise_dual'])} | {_pct(m['pairwise_rerank'])} |")
    else:
        lines += ["Calibrated and evaluated on disjoint held-out splits of the data (10% of its images each).", "",
                  "| measure (held out) | dual encoder | re-ranked |", "| --- | --- | --- |"]
        for d in ("t2i", "i2t"):
            for k in (1, 5, 10):
                lines.append(f"| {d} R@{k} (top-50 re-ranked) | {m[f'{d}_r{k}_dual']:.3f} | {m[f'{d}_r{k}_rerank']:.3f} |")
    lines += [
        f"| ECE, 15 bins, {m['ece_pairs']} balanced pairs with hard negatives | | {m['ece']:.3f} "
        f"(before calibration {m['ece_uncalibrated']:.3f}) |",
        f"| latency, 50 candidates for one text query (median of 50) | | {m['latency_ms']:.1f} ms |",
        "",
        "Recall@K counts a hit when one of the first K items has the query's key (the scene key for generated "
        "scenes, else the image).",
    ]
    return "\n".join(lines) + "\n"
