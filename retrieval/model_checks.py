"""Sanity checks of model folders before anything is built from them.

A model folder is input like any other: a crafted or damaged
``open_clip_config.json`` or ``reranker.json`` must not make crossfind
allocate gigabytes or open files outside the folder, and must be reported
as one line naming the folder and the field. The bounds are generous (the
largest open_clip models fit with room to spare) and only stop absurd values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelNotAvailable

#: Upper bound on the parameters a config may describe (ViT-bigG/14 has about 2.5e9).
MAX_PARAMS = 6e9
#: Bounds of integer fields: (low, high).
INT_BOUNDS = {
    "embed_dim": (1, 16384),
    "width": (1, 16384),
    "layers": (0, 128),
    "heads": (1, 256),
    "image_size": (1, 4096),
    "patch_size": (1, 1024),
    "context_length": (1, 8192),
    "vocab_size": (1, 2_000_000),
    "head_width": (1, 4096),
    "mlp_ratio": (0, 64),
}
#: reranker.json integer fields: (low, high).
RERANKER_BOUNDS = {
    "text_width": (1, 16384),
    "image_width": (1, 16384),
    "image_tokens": (1, 65536),
    "max_text_tokens": (1, 8192),
    "width": (1, 8192),
    "depth": (0, 64),
    "heads": (1, 256),
    "image_depth": (0, 64),
    "image_local": (0, 8192),
}
#: Largest reranker (parameters) a reranker.json may describe.
MAX_RERANKER_PARAMS = 1e9


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object, or one clear error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelNotAvailable(f"cannot read {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelNotAvailable(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ModelNotAvailable(f"{what} {path} must hold a JSON object")
    return data


def _check_number(where: str, key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelNotAvailable(f"{where}: {key} must be a number, not {value!r}")
    if not low <= value <= high:
        raise ModelNotAvailable(f"{where}: {key} = {value!r} is outside the sane range {low:g}..{high:g}")
    return float(value)


def _check_tower(where: str, cfg: Mapping[str, Any]) -> float:
    """Check a tower's integer fields; returns its rough parameter count."""
    for key, (low, high) in INT_BOUNDS.items():
        if key in cfg and cfg[key] is not None:
            _check_number(where, key, cfg[key], low, high)
    width = float(cfg.get("width") or 0)
    layers = float(cfg.get("layers") or 0)
    if isinstance(cfg.get("layers"), (list, tuple)):  # ResNet stages
        layers = float(sum(int(x) for x in cfg["layers"] if isinstance(x, int)))
    vocab = float(cfg.get("vocab_size") or 0)
    return 12.0 * layers * width * width + vocab * width


def check_open_clip_config(folder: Path) -> None:
    """Validate ``folder/open_clip_config.json`` before open_clip builds from it."""
    path = folder / "open_clip_config.json"
    data = read_json_object(path, "model config")
    where = f"model config {path}"
    model_cfg = data.get("model_cfg", data)
    if not isinstance(model_cfg, dict):
        raise ModelNotAvailable(f"{where}: model_cfg must be an object")
    params = 0.0
    if "embed_dim" in model_cfg:
        _check_number(where, "embed_dim", model_cfg["embed_dim"], *INT_BOUNDS["embed_dim"])
    for tower in ("vision_cfg", "text_cfg"):
        cfg = model_cfg.get(tower)
        if cfg is None:
            continue
        if not isinstance(cfg, dict):
            raise ModelNotAvailable(f"{where}: {tower} must be an object")
        params += _check_tower(f"{where} ({tower})", cfg)
        kwargs = cfg.get("tokenizer_kwargs")
        if isinstance(kwargs, dict) and any("path" in k or "file" in k for k in kwargs):
            raise ModelNotAvailable(
                f"{where}: {tower}.tokenizer_kwargs names a file ({', '.join(k for k in kwargs if 'path' in k or 'file' in k)}); "
                "crossfind does not open files named by a model config"
            )
    if params > MAX_PARAMS:
        raise ModelNotAvailable(f"{where}: describes about {params:.2g} parameters, more than the {MAX_PARAMS:.0g} allowed")


def check_reranker_config(data: Mapping[str, Any], where: str) -> None:
    """Validate a parsed ``reranker.json`` (types, bounds, size) before a module is built."""
    if not isinstance(data.get("model"), str):
        raise ModelNotAvailable(f"{where}: model must be a string")
    for key, (low, high) in RERANKER_BOUNDS.items():
        if key in data:
            _check_number(where, key, data[key], low, high)
            if not float(data[key]).is_integer():
                raise ModelNotAvailable(f"{where}: {key} must be a whole number, not {data[key]!r}")
    for key in ("text_width", "image_width", "image_tokens", "max_text_tokens"):
        if key not in data:
            raise ModelNotAvailable(f"{where}: {key} is missing")
    ratio = _check_number(where, "mlp_ratio", data.get("mlp_ratio", 4.0), 0.0, 64.0)
    _check_number(where, "dropout", data.get("dropout", 0.0), 0.0, 1.0)
    temp = _check_number(where, "temperature", data.get("temperature", 1.0), 0.0, 1e6)
    if temp <= 0:
        raise ModelNotAvailable(f"{where}: temperature must be positive")
    _check_number(where, "shift", data.get("shift", 0.0), -1e6, 1e6)
    width, heads = int(data.get("width", 128)), int(data.get("heads", 4))
    if width % heads:
        raise ModelNotAvailable(f"{where}: width {width} is not divisible by heads {heads}")
    layer = data.get("image_layer", "final")
    if not isinstance(layer, str) or not layer or len(layer.split("+")) > 8:
        raise ModelNotAvailable(f"{where}: image_layer must name one to eight layers joined by +")
    depth = int(data.get("depth", 3)) + int(data.get("image_depth", 0))
    inputs = 2 * (int(data["text_width"]) + int(data["image_width"]) * len(layer.split("+"))) * width
    params = depth * (8 + 2 * ratio) * width * width + inputs + int(data["image_tokens"]) * width
    if params > MAX_RERANKER_PARAMS:
        raise ModelNotAvailable(f"{where}: describes about {params:.2g} parameters, more than the {MAX_RERANKER_PARAMS:.0g} allowed")
