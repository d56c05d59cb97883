"""Reranker specs: which reranker a search uses, answerable without importing torch.

A reranker spec names one of two kinds of reranker:

* ``local-dir:PATH`` -- a folder holding either crossfind's own
  :class:`~retrieval.rerank.CrossAttentionITM` (``reranker.json`` and
  ``reranker.safetensors``), or a BLIP image-text-matching model written by
  ``transformers``' ``save_pretrained`` (``config.json`` of a ``blip`` model,
  its weights and its processor files);
* ``hf-hub:ORG/NAME`` -- a BLIP ITM model on the Hugging Face hub, such as
  ``hf-hub:Salesforce/blip-itm-base-coco``, read from the Hugging Face cache
  (downloaded into it once when the hub can be reached).

BLIP rerankers run through the optional ``transformers`` dependency
(``pip install 'crossfind[blip]'``); see :mod:`retrieval.rerank_blip`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from typing import Any

from .errors import MissingExtra, ModelNotAvailable
from .rerank_files import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["RerankerSpec", "parse_reranker_spec", "require_transformers", "KINDS", "BLIP_EXTRA_HINT"]

#: The kinds of reranker a spec can name.
KINDS = ("crossfind", "blip")
BLIP_EXTRA_HINT = "pip install 'crossfind[blip]'"
_FORMS = "local-dir:PATH (a crossfind reranker folder or a BLIP save_pretrained folder) or hf-hub:ORG/NAME (e.g. hf-hub:Salesforce/blip-itm-base-coco)"


@dataclass(frozen=True)
class RerankerSpec:
    """A parsed reranker spec."""

    spec: str  # normalised: local-dir: with an absolute path, or hf-hub:ORG/NAME
    kind: str  # "crossfind" (CrossAttentionITM folder) or "blip" (transformers BLIP ITM)
    path: Path | None  # the folder of a local-dir: spec
    repo: str | None  # the hub repository of an hf-hub: spec

    @property
    def source(self) -> str:
        """What ``from_pretrained`` is given: the folder, or the hub repository."""
        return str(self.path) if self.path is not None else str(self.repo)


def _is_blip_folder(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") == "blip" or any(str(a).startswith("Blip") for a in archs)


def parse_reranker_spec(spec: str) -> RerankerSpec:
    """Parse a reranker spec (see the module docstring); a one-line
    :class:`ModelNotAvailable` names the valid forms when it is not one."""
    spec = spec.strip()
    if spec.startswith("local-dir:"):
        raw = spec[len("local-dir:") :].strip()
        if not raw:
            raise ModelNotAvailable(f"empty path in reranker spec {spec!r}; use {_FORMS}")
        path = Path(os.path.expanduser(raw)).resolve()
        if not path.is_dir():
            raise ModelNotAvailable(f"reranker folder {path} does not exist; use {_FORMS}")
        if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            return RerankerSpec(f"local-dir:{path}", "crossfind", path, None)
        if _is_blip_folder(path):
            return RerankerSpec(f"local-dir:{path}", "blip", path, None)
        raise ModelNotAvailable(
            f"{path} holds no reranker: neither {CONFIG_NAME} with {WEIGHTS_NAME} (crossfind) nor a BLIP "
            "config.json written by save_pretrained"
        )
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:") :].strip().strip("/")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelNotAvailable(f"reranker spec {spec!r} must name a hub repository as hf-hub:ORG/NAME")
        return RerankerSpec(f"hf-hub:{repo}", "blip", None, repo)
    raise ModelNotAvailable(f"unknown reranker spec {spec!r}; use {_FORMS}")


def require_transformers() -> Any:
    """The ``transformers`` module, or a one-line :class:`MissingExtra` naming the extra."""
    try:
        import transformers
    except ImportError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MissingExtra(
            f"BLIP rerankers need the transformers package ({first}); install it with {BLIP_EXTRA_HINT}"
        ) from None
    return transformers
