"""Export a model's towers (and its reranker) to ONNX, once per weights.

The exports let a search run without torch (:mod:`retrieval.onnx_runtime`):
``text.onnx`` (token ids -> normalised vector, the tower's output tokens and
its input word embeddings), ``image.onnx`` (pixels -> normalised vector, and
the patch tokens the reranker reads when the model has one) and the reranker
in two parts: ``rerank_image.onnx`` (candidate patch tokens -> image memory,
the part that does not depend on the query, so it can be cached per image)
and ``rerank_cross.onnx`` (query tokens, image memory, dual cosines ->
logits). They live in the library beside the model's index,
``models/<slug>/onnx/<key>/``, where the key is the weights fingerprint (and
the reranker's), so weights retrained in place get a new export. A
``manifest.json`` written last says what the folder holds and how to
tokenise and preprocess; a folder without it is an export that did not finish.

This module imports torch: only indexing and the first search of a model use it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .onnx_runtime import MANIFEST, ONNX_OPSET, export_dir

if TYPE_CHECKING:  # pragma: no cover
    from .encoders import Encoder

LOG = logging.getLogger(__name__)


class ExportUnsupported(Exception):
    """The model (or one of its parts) has a form the ONNX path does not cover."""


def _tokenizer_info(encoder: Encoder) -> dict[str, Any]:
    """How to tokenise without torch, or ExportUnsupported for tokenizers other than CLIP's BPE."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = encoder.tokenizer
    if type(tok) is not SimpleTokenizer or getattr(tok, "reduction_fn", None) is not None:
        raise ExportUnsupported(f"tokenizer {type(tok).__name__} has no torch-free twin")
    if getattr(tok.clean_fn, "__name__", "") != "_clean_lower" or len(tok.all_special_ids) != 2:
        raise ExportUnsupported("tokenizer with non-default cleaning or extra special tokens")
    return {"kind": "clip-bpe", "context_length": int(tok.context_length)}


def _preprocess_info(encoder: Encoder) -> dict[str, Any]:
    """open_clip's image transform as plain numbers, or ExportUnsupported for other steps."""
    from open_clip.transform import MaybeConvertMode, _convert_to_rgb
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize, ToTensor

    steps = list(getattr(encoder.preprocess, "transforms", []))
    out: dict[str, Any] = {}
    kinds = []
    for step in steps:
        if isinstance(step, Resize) and step.max_size is None:
            size = step.size
            out["resize"] = [int(size)] if isinstance(size, int) else [int(s) for s in size]
            modes = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}
            if step.interpolation not in modes:
                raise ExportUnsupported(f"resize interpolation {step.interpolation}")
            out["interpolation"] = modes[step.interpolation]
            kinds.append("resize")
        elif isinstance(step, CenterCrop):
            out["crop"] = [int(s) for s in step.size]
            kinds.append("crop")
        elif (isinstance(step, MaybeConvertMode) and step.mode == "RGB") or step is _convert_to_rgb:
            kinds.append("rgb")
        elif isinstance(step, ToTensor):
            kinds.append("tensor")
        elif isinstance(step, Normalize):
            out["mean"], out["std"] = [float(x) for x in step.mean], [float(x) for x in step.std]
            kinds.append("normalize")
        else:
            raise ExportUnsupported(f"image transform step {step!r}")
    if kinds != ["resize", "crop", "rgb", "tensor", "normalize"]:
        raise ExportUnsupported(f"image transform steps {kinds}")
    return out


def export_model(encoder: Encoder, library_dir: Path, key: str, reranker: Any = None) -> Path:
    """Export ``encoder``'s towers (and ``reranker``, a :class:`retrieval.rerank.Reranker`)
    into the library; returns the folder. Raises ExportUnsupported or the exporter's error."""
    where = export_dir(library_dir, encoder.spec, key)
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".tmp", dir=where.parent))  # processes exporting at once do not collide
    manifest: dict[str, Any] = {
        "spec": encoder.spec.spec,
        "key": key,
        "dim": encoder.dim,
        "image_size": encoder.image_size,
        "tokenizer": _tokenizer_info(encoder),
        "opset": ONNX_OPSET,
        "torch": torch.__version__,
    }
    m = encoder.model
    pool = getattr(m, "text_pool_type", None)
    # A causal tower with end/first-token pooling may run on the batch cut to its longest text.
    manifest["text_cut"] = getattr(m, "attn_mask", None) is not None and pool in ("argmax", "eos", "first")
    layer = reranker.config.image_layer if reranker is not None else None
    try:
        manifest["preprocess"] = _preprocess_info(encoder)
    except ExportUnsupported as exc:
        LOG.info("no ONNX image path for %s: %s", encoder.name, exc)
        manifest["preprocess"] = None
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel does not export
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            n = manifest["tokenizer"]["context_length"]
            _export(_TextTower(encoder), (torch.ones(2, min(n, 8), dtype=torch.long),), tmp / "text.onnx",
                    ["ids"], ["vector", "tokens", "words"], {"ids": {0: "n", 1: "length"}},
                    dynamo=not _plain_blocks(encoder.model))
            manifest["text"] = "text.onnx"
            if manifest["preprocess"] is not None:
                size = encoder.image_size
                outputs = ["vector", "tokens"] if layer is not None and encoder.has_tokens else ["vector"]
                tower, fuse = _image_tower(encoder, layer if len(outputs) == 2 else None)
                _export(tower, (torch.zeros(2, 3, size, size),), tmp / "image.onnx", ["pixels"], outputs,
                        {"pixels": {0: "n"}}, fuse=fuse)
                manifest["image"] = "image.onnx"
                manifest["image_tokens_layer"] = layer if len(outputs) == 2 else None
            if reranker is not None and layer is not None:
                manifest.update(_export_reranker(reranker, tmp))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    try:
        tmp.replace(where)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (where / MANIFEST).is_file():
            raise
        return where  # another process finished the same export first
    # Exports of earlier weights (or a half-written one) are of no use any more.
    for other in where.parent.iterdir():
        if other != where and other.is_dir() and not (other.name.endswith(".tmp") and _recent(other)):
            shutil.rmtree(other, ignore_errors=True)
    return where


def _recent(path: Path, seconds: float = 3600.0) -> bool:
    """Whether ``path`` changed within ``seconds`` (an export another process may still be writing)."""
    import time

    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def _export(module: Any, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict, dynamo: bool = False,
            fuse: tuple[int, int] | None = None) -> None:
    """Export ``module`` to ``path`` with its weights beside it; ``fuse``
    (heads, width) runs ONNX Runtime's transformer fusions over the graph (see :func:`_fused`)."""
    import time
    t = time.perf_counter()
    module.eval()
    if dynamo:
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False)
    else:
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
    # Weights in a file of their own: ONNX Runtime maps it instead of parsing
    # them out of the protobuf, which makes a session start several times faster.
    import onnx

    model = onnx.load(str(path))
    if fuse is not None:
        model = _fused(model, *fuse)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    LOG.info("exported %s in %.1f s", path.name, time.perf_counter() - t)


def _plain_blocks(model: Any) -> bool:
    """Whether the text tower is open_clip's usual stack of ResidualAttentionBlocks
    (then :class:`_TextTower` runs them itself and the fast TorchScript exporter works)."""
    tr = getattr(model, "transformer", None)
    return bool(tr is not None and getattr(tr, "batch_first", False) and _plain_stack(tr))


def _plain_stack(tr: Any) -> bool:
    """Whether ``tr``'s blocks are all open_clip's plain ResidualAttentionBlock
    (one packed, biased input projection; no separate key/value norm)."""
    from open_clip.transformer import ResidualAttentionBlock

    return all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
               and isinstance(b.attn, nn.MultiheadAttention) and b.attn._qkv_same_embed_dim and b.attn.in_proj_bias is not None
               for b in tr.resblocks)


def _block(blk: Any, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One ResidualAttentionBlock with attention written out: the same
    computation as ``nn.MultiheadAttention``, with shapes taken from the input,
    so the exported graph accepts any text length."""
    attn = blk.attn
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = torch.nn.functional.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x + blk.ls_1(attn.out_proj(out.transpose(1, 2).reshape(n, length, width)))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


class _TextTower(nn.Module):
    """ids ``(n, L)`` -> normalised vector, tokens after ``ln_final``, input word embeddings.

    The positional embedding and causal mask are cut to ``L``, so the caller
    may pass the batch cut to its longest text (``text_cut`` in the manifest).
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.m = encoder.model
        self.pool = getattr(self.m, "text_pool_type", "argmax")
        self.eos = getattr(self.m, "text_eos_id", None)

    def forward(self, ids: Any) -> Any:
        from open_clip.transformer import text_global_pool

        m = self.m
        length = ids.shape[1]
        cast = m.transformer.get_cast_dtype()
        words = m.token_embedding(ids).to(cast)
        attn = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = words + m.positional_embedding[:length].to(cast)
        if _plain_blocks(m):
            for blk in m.transformer.resblocks:
                x = _block(blk, x, attn)
        else:
            x = m.transformer(x, attn_mask=attn)
        x = m.ln_final(x)
        pooled = text_global_pool(x, ids, self.pool, eos_token_id=self.eos)
        proj = m.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return torch.nn.functional.normalize(pooled.float(), dim=-1), x.float(), words.float()


def _image_tower(encoder: Encoder, layer: str | None) -> tuple[nn.Module, tuple[int, int] | None]:
    """The module to export for the image tower, and (heads, width) when its
    graph is one ONNX Runtime's transformer fusions apply to: open_clip's plain
    VisionTransformer in float32 (then :class:`_VisionTower`), else :class:`_ImageTower`."""
    from open_clip.transformer import VisionTransformer

    vis = encoder.model.visual
    parts = layer.split("+") if layer else []
    tr = getattr(vis, "transformer", None)
    plain = (type(vis) is VisionTransformer and vis.attn_pool is None and tr is not None and _plain_stack(tr)
             and set(parts) <= {"embed", "final"} and all(p.dtype == torch.float32 for p in vis.parameters()))
    if not plain or tr is None:
        return _ImageTower(encoder, layer), None
    attn = tr.resblocks[0].attn
    return _VisionTower(encoder, layer), (int(attn.num_heads), int(attn.embed_dim))


def _layer_norm(ln: Any, x: torch.Tensor) -> torch.Tensor:
    # open_clip's LayerNorm casts back to the input's type: a Cast node the fusions do not expect.
    return torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _vision_block(blk: Any, x: torch.Tensor, length: int, first_only: bool) -> torch.Tensor:
    """One ResidualAttentionBlock of an image tower, the same computation written
    in the form ONNX Runtime's attention fusion recognises: separate query, key
    and value projections, shapes constant but for the batch, the attention
    output added to the residual (not the residual to it). ``first_only``:
    the block's output at token 0 alone (keys and values still come from all
    ``length`` tokens), all that a class-token pool reads of the last block."""
    attn = blk.attn
    width, heads = int(attn.embed_dim), int(attn.num_heads)
    head = width // heads
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    h = _layer_norm(blk.ln_1, x)
    rows = 1 if first_only else length
    f = torch.nn.functional
    q = f.linear(h[:, :1] if first_only else h, wq, bq).reshape(-1, rows, heads, head).permute(0, 2, 1, 3)
    k = f.linear(h, wk, bk).reshape(-1, length, heads, head).permute(0, 2, 3, 1)
    v = f.linear(h, wv, bv).reshape(-1, length, heads, head).permute(0, 2, 1, 3)
    weights = torch.softmax(torch.matmul(q, k) / math.sqrt(head), dim=-1)
    out = torch.matmul(weights, v).permute(0, 2, 1, 3).reshape(-1, rows, width)
    x = blk.ls_1(attn.out_proj(out)) + (x[:, :1] if first_only else x)
    return x + blk.ls_2(blk.mlp(_layer_norm(blk.ln_2, x)))


class _VisionTower(nn.Module):
    """pixels ``(n, 3, H, W)`` -> normalised vector (and patch tokens at ``layer``:
    ``final``, ``embed`` or both), open_clip's VisionTransformer with its blocks
    written out by :func:`_vision_block`.

    Without tokens and with a class-token pool the last block runs for the
    class token only: the other tokens' outputs of that block are never read
    (about a fourteenth of the tower's work for ViT-B/32).
    """

    def __init__(self, encoder: Encoder, layer: str | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.visual = encoder.model.visual
        self.parts = layer.split("+") if layer else []

    def forward(self, pixels: Any) -> Any:
        vis = self.visual
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        try:
            if "embed" in self.parts:
                module, cut = self.encoder.token_source("embed")
                hooks.append(module.register_forward_hook(lambda _m, _i, out: seen.__setitem__("embed", cut(out))))
            x = vis._embeds(pixels)
        finally:
            for hook in hooks:
                hook.remove()
        length = int(vis.positional_embedding.shape[0])
        blocks = list(vis.transformer.resblocks)
        first_only = not self.parts and vis.pool_type == "tok"
        for i, blk in enumerate(blocks):
            x = _vision_block(blk, x, length, first_only and i == len(blocks) - 1)
        pooled, seen["final"] = vis._pool(x)
        if vis.proj is not None:
            pooled = pooled @ vis.proj
        vector = torch.nn.functional.normalize(pooled.float(), dim=-1)
        if not self.parts:
            return vector
        tokens = [seen[part] for part in self.parts]
        return vector, (tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=-1)).float()


def _fused(model: Any, heads: int, width: int) -> Any:
    """``model`` (an ONNX ModelProto of :class:`_VisionTower`) with ONNX
    Runtime's transformer fusions applied: each block's attention becomes one
    ``Attention`` node, GELU with its bias one ``BiasGelu``. The unfused model
    when the optimizer fails: it computes the same, only slower."""
    import os
    import sys

    try:
        from onnxruntime.transformers import optimizer

        # Its modules are imported under their own names (``fusion_attention``), not the package's.
        home = os.path.dirname(optimizer.__file__)
        loggers = [m.logger for m in list(sys.modules.values())
                   if (getattr(m, "__file__", None) or "").startswith(home) and isinstance(getattr(m, "logger", None), logging.Logger)]
        levels = [lg.level for lg in loggers]
        for lg in loggers:  # it warns about shape inference it does not need here
            lg.setLevel(logging.ERROR)
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):  # it prints some failures (the JSON of `index --json` goes there)
                out = optimizer.optimize_model(model, model_type="vit", num_heads=heads, hidden_size=width, opt_level=0)
        finally:
            if said.getvalue().strip():
                LOG.debug("ONNX Runtime's optimizer said: %s", said.getvalue().strip())
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
        LOG.info("image tower fusions: %s", {k: v for k, v in out.get_fused_operator_statistics().items() if v})
        fused = out.model
        if not any(o.domain == "com.microsoft" for o in fused.opset_import):  # the fused nodes' domain, declared
            import onnx

            fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        return fused
    except Exception as exc:  # noqa: BLE001 - the unfused graph is correct, only slower
        LOG.info("image tower left unfused: %s", exc)
        return model


class _ImageTower(nn.Module):
    """pixels ``(n, 3, H, W)`` -> normalised vector (and patch tokens at ``layer``)."""

    def __init__(self, encoder: Encoder, layer: str | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.visual = encoder.model.visual
        self.layer = layer

    def forward(self, pixels: Any) -> Any:
        if self.layer is None:
            return torch.nn.functional.normalize(self.visual(pixels).float(), dim=-1)
        pooled, tokens = self.encoder.visual_with_tokens(pixels, self.layer)
        return torch.nn.functional.normalize(pooled.float(), dim=-1), tokens.float()


def _export_reranker(reranker: Any, tmp: Path) -> dict[str, Any]:
    """Export a reranker as its two parts (see :class:`_RerankImage`,
    :class:`_RerankCross`); the manifest entries that describe them."""
    cfg = reranker.config
    image = torch.zeros(2, cfg.image_tokens, cfg.image_features, dtype=torch.float16)
    _export(_RerankImage(reranker.module), (image,), tmp / "rerank_image.onnx", ["image"], ["memory"], {"image": {0: "n"}})
    text = torch.zeros(2, 5, cfg.text_features)
    mask = torch.ones(2, 5, dtype=torch.bool)
    memory = torch.zeros(2, cfg.image_tokens, cfg.width, dtype=torch.float16)
    _export(_RerankCross(reranker.module), (text, mask, memory, torch.zeros(2)), tmp / "rerank_cross.onnx",
            ["text", "mask", "memory", "dual"], ["logits"],
            {"text": {0: "n", 1: "length"}, "mask": {0: "n", 1: "length"}, "memory": {0: "n"}, "dual": {0: "n"}})
    return {"reranker_image": "rerank_image.onnx", "reranker_cross": "rerank_cross.onnx",
            "reranker_config": json.loads(cfg.to_json()), "reranker_fingerprint": reranker.fingerprint}


class _RerankImage(nn.Module):
    """The query-independent part of :class:`CrossAttentionITM`: patch tokens
    ``(n, P, F)`` float16 -> image memory ``(n, P, width)`` (``encode_image``)."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.m = module

    def forward(self, image: Any) -> Any:
        return self.m.encode_image(image).float()


class _RerankCross(nn.Module):
    """The cross part of :class:`CrossAttentionITM` on ``n`` pairs: text tokens
    ``(n, L, F)`` with their mask, image memory ``(n, P, width)`` float16 (from
    :class:`_RerankImage`, or cached), dual cosines ``(n,)``; returns logits ``(n,)``.

    The same computation as ``CrossAttentionITM.forward`` given ``memory``,
    written with shapes taken from the inputs so one graph serves any number of
    pairs; the caller repeats the query side and passes texts cut to their
    longest real token.
    """

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.m = module

    def forward(self, text: Any, mask: Any, memory: Any, dual: Any) -> Any:
        m = self.m
        img = memory.to(m.head.weight.dtype)
        length = text.shape[1]
        t = m.text_in(text.to(m.head.weight.dtype))
        itm = m.itm_token.expand(t.shape[0], 1, -1)
        x = torch.cat([itm, t], dim=1) + m.text_pos[: length + 1]
        keep = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)[:, None, None, :]
        for block in m.blocks:
            x = block(x, keep, block.cross_attn.keys(img))
        logit = m.head(m.ln_out(x)[:, 0]).squeeze(-1).float()
        if m.config.residual:
            logit = logit + m.dual_bias.float() + m.dual_scale.float() * dual
        else:
            logit = logit + 0.0 * dual  # keeps ``dual`` an input of the graph
        return logit
