"""Dual encoders from open_clip: model specs, loading, batched encoding.

A model spec is one of

* ``ARCH:TAG`` -- an open_clip architecture and pretrained tag
  (``ViT-B-32:laion2b_s34b_b79k``), weights from the open_clip cache or the hub;
* ``ARCH:/path/to/checkpoint.safetensors`` -- an architecture and a local checkpoint;
* ``hf-hub:org/repo`` -- an open_clip model on the Hugging Face hub;
* ``local-dir:/path`` -- a folder with ``open_clip_config.json`` and weights;
* ``shapes-tiny`` (or any folder name under ``retrieval/models/``) -- a bundled model.

Everything is built by open_clip's own factory; nothing falls back silently to
another model when weights are missing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from .errors import ModelNotAvailable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

LOG = logging.getLogger(__name__)

#: The model used when none is named and the library has no default yet.
DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
#: Folder of models bundled with the package (``local-dir:`` folders).
BUNDLED_DIR = Path(__file__).resolve().parent / "models"

FeatureVector = np.ndarray  # float32, L2-normalised, shape (dim,) or (n, dim)


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "open_clip_config.json").is_file())


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: what open_clip is asked to build."""

    spec: str  # the spec as the user wrote it (normalised for bundled models)
    model_name: str  # first argument to open_clip.create_model_and_transforms
    pretrained: str | None  # pretrained tag or checkpoint path, None for schema specs
    local_dir: Path | None  # folder of a local-dir: or bundled model

    @property
    def slug(self) -> str:
        """A filesystem-safe name for per-model files."""
        keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.spec)
        return keep.strip("_")[:120] or "model"


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; see the module docstring for the forms."""
    spec = spec.strip()
    if not spec:
        raise ModelNotAvailable("empty model spec")
    if spec in bundled_models():
        path = BUNDLED_DIR / spec
        return ModelSpec(spec, f"local-dir:{path}", None, path)
    if spec.startswith("local-dir:"):
        path = Path(os.path.expanduser(spec[len("local-dir:") :])).resolve()
        return ModelSpec(f"local-dir:{path}", f"local-dir:{path}", None, path)
    if spec.startswith("hf-hub:"):
        return ModelSpec(spec, spec, None, None)
    arch, sep, tag = spec.partition(":")
    if not sep or not tag:
        choices = ", ".join(bundled_models() + [DEFAULT_MODEL, "hf-hub:ORG/REPO", "local-dir:PATH", "ARCH:/path/ckpt"])
        raise ModelNotAvailable(f"model spec {spec!r} names no weights; use one of: {choices}")
    if "/" in tag or tag.endswith((".safetensors", ".bin", ".pt", ".pth")):
        tag = str(Path(os.path.expanduser(tag)).resolve())
        return ModelSpec(f"{arch}:{tag}", arch, tag, None)
    return ModelSpec(spec, arch, tag, None)


#: Weight files up to this size are fingerprinted by content, larger ones by size and time.
_HASH_LIMIT = 64 << 20


def weights_fingerprint(ms: ModelSpec) -> str | None:
    """What the weights of a spec that names local files are, in a few characters.

    For ``local-dir:`` and bundled models (the config and weight files in the
    folder, not a reranker's) and checkpoint paths, a hash of each file's
    content (files up to 64 MB) or its size and modification time (larger
    ones). None for weights named by a pretrained tag or a hub repository,
    which do not change under their name. A library compares it with the one
    it recorded, so a model retrained in place does not go on searching
    vectors of its old weights.
    """
    import hashlib

    if ms.local_dir is not None:
        if not ms.local_dir.is_dir():
            return None
        files = sorted(
            p for p in ms.local_dir.iterdir()
            if p.is_file() and not p.name.startswith("reranker")
            and (p.name == "open_clip_config.json" or p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
        )
    elif ms.pretrained is not None and os.path.sep in ms.pretrained:
        files = [Path(ms.pretrained)]
    else:
        return None
    digest = hashlib.sha256()
    for path in files:
        try:
            st = path.stat()
            digest.update(f"{path.name}:{st.st_size}:".encode())
            if st.st_size <= _HASH_LIMIT:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            else:
                digest.update(str(st.st_mtime_ns).encode())
        except OSError:
            continue  # a missing file: loading the model will say so
    return digest.hexdigest()[:16]


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_available(ms: ModelSpec) -> None:
    """Fail early, with one clear line, when the weights are not at hand."""
    hint = f"pass a local checkpoint with --model ARCH:/path/to/weights.safetensors or --model local-dir:/path, or try the bundled model: {', '.join(bundled_models()) or 'shapes-tiny'}"
    if ms.local_dir is not None:
        if not (ms.local_dir / "open_clip_config.json").is_file():
            raise ModelNotAvailable(f"no open_clip_config.json in {ms.local_dir}; {hint}")
        if not any(any(ms.local_dir.glob(p)) for p in ("open_clip*.safetensors", "open_clip*.bin", "*model*.safetensors", "*.bin", "*.pth")):
            raise ModelNotAvailable(f"no weights (*.safetensors, *.bin, *.pth) in {ms.local_dir}; {hint}")
        from .model_checks import check_open_clip_config

        check_open_clip_config(ms.local_dir)
        return
    import open_clip

    if ms.spec.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        repo = ms.spec[len("hf-hub:") :]
        if not isinstance(try_to_load_from_cache(repo, "open_clip_config.json"), str) and not _hub_reachable():
            raise ModelNotAvailable(f"{ms.spec} is neither cached nor downloadable (no network); {hint}")
        return
    if ms.pretrained is not None and os.path.sep in ms.pretrained:
        if ms.model_name not in open_clip.list_models():
            raise ModelNotAvailable(f"unknown architecture {ms.model_name!r}; available: {', '.join(open_clip.list_models())}")
        if not Path(ms.pretrained).is_file():
            raise ModelNotAvailable(f"checkpoint {ms.pretrained} does not exist; {hint}")
        return
    if ms.pretrained is not None:
        if ms.model_name not in open_clip.list_models():
            raise ModelNotAvailable(f"unknown architecture {ms.model_name!r}; available: {', '.join(open_clip.list_models())}")
        tags = open_clip.list_pretrained_tags_by_model(ms.model_name)
        if ms.pretrained not in tags:
            raise ModelNotAvailable(f"no pretrained tag {ms.pretrained!r} for {ms.model_name}; available: {', '.join(tags) or 'none'}")
        cfg = open_clip.get_pretrained_cfg(ms.model_name, ms.pretrained)
        if not _cached(cfg) and not _hub_reachable():
            raise ModelNotAvailable(
                f"weights for {ms.spec} are neither cached nor downloadable (no network); {hint}"
            )


def _cached(cfg: dict[str, Any]) -> bool:
    """Whether open_clip would find this pretrained config's weights without a download."""
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    hub = cfg.get("hf_hub", "")
    if not hub:
        return False  # URL-only weights: let open_clip decide
    from huggingface_hub import try_to_load_from_cache

    # "org/repo/file.bin", or "org/repo/" meaning open_clip's default file names
    repo, filename = (hub[:-1], "") if hub.endswith("/") else os.path.split(hub)
    names = [filename] if filename else ["open_clip_pytorch_model.bin"]
    names += [n.rsplit(".", 1)[0] + ".safetensors" for n in names] + ["open_clip_model.safetensors"]
    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the Hugging Face hub cannot be reached quickly."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class Encoder:
    """A loaded open_clip dual encoder.

    ``encode_images`` and ``encode_texts`` return L2-normalised float32
    vectors; ``image_tokens``/``text_tokens`` expose the towers' token outputs
    for the cross-attention reranker. Build one with :func:`load_encoder`.
    """

    def __init__(self, spec: ModelSpec, model: Any, preprocess: Callable, tokenizer: Any, device: str) -> None:
        import torch

        self.spec = spec
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model.to(device=device, dtype=self.dtype)
        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.dim: int = int(self.model.text_projection.shape[1] if not isinstance(self.model.text_projection, torch.nn.Linear) else self.model.text_projection.out_features)

    @property
    def name(self) -> str:
        return self.spec.spec

    @property
    def has_tokens(self) -> bool:
        """Whether the vision tower can return patch tokens (ViT models)."""
        return hasattr(self.model.visual, "output_tokens")

    # ----------------------------------------------------------------- images
    @functools.cached_property
    def _split(self) -> tuple[Callable, Callable] | None:
        """open_clip's transform split at ToTensor: (PIL steps, tensor steps), see :meth:`prepare`."""
        from torchvision.transforms import Compose, ToTensor

        steps = list(getattr(self.preprocess, "transforms", []))
        at = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
        if at is None:
            return None
        return Compose(steps[:at]), Compose(steps[at + 1 :])

    def prepare(self, image: Image.Image) -> Any:
        """The per-image part of preprocessing, safe and cheap in loader threads.

        Runs open_clip's PIL steps (resize, crop, mode) and returns a uint8
        ``(H, W, 3)`` array; no torch op runs here, since small tensor ops in
        several threads fight the encoder's own threads for the cores. Models
        whose transform has no ToTensor step get the full transform instead.
        """
        if self._split is None:
            return self.preprocess(image)
        return np.asarray(self._split[0](image), dtype=np.uint8)

    def batch(self, prepared: Sequence[Any]) -> torch.Tensor:
        """Stack :meth:`prepare` outputs into one normalised input batch."""
        import torch

        if self._split is None or not isinstance(prepared[0], np.ndarray):
            return torch.stack(list(prepared))
        # uint8 crosses to a GPU (a quarter of the bytes), which then does the arithmetic
        x = torch.from_numpy(np.stack(prepared)).to(self.device, non_blocking=True)
        return self._split[1](x.permute(0, 3, 1, 2).float().div_(255.0))

    def image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess PIL images into one input tensor."""
        return self.batch([self.prepare(im) for im in images])

    def encode_images(
        self, pixels: torch.Tensor, with_tokens: bool = False, token_layer: str = "final"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode a preprocessed batch: (normalised vectors, patch tokens or None).

        Patch tokens are taken at ``token_layer`` (see :meth:`image_tokens`),
        shape ``(n, patches, width)``, float16.
        """
        import torch

        with torch.inference_mode():
            x = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
            tokens = None
            if with_tokens and self.has_tokens:
                pooled, tokens = self.visual_with_tokens(x, token_layer)
            else:
                pooled = self.model.visual(x)
            vec = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
            tok = tokens.to(torch.float16).cpu().numpy() if tokens is not None else None
        return np.ascontiguousarray(vec, dtype=np.float32), tok

    def visual_with_tokens(self, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision tower's pooled output and its patch tokens at ``layer``
        (``"embed+final"``: both layers' tokens side by side, one forward pass)."""
        import torch

        visual = self.model.visual
        parts = layer.split("+")
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        try:
            for part in parts:
                if part != "final":
                    module, cut = self.token_source(part)
                    hooks.append(module.register_forward_hook(
                        lambda _m, _i, out, part=part, cut=cut: seen.__setitem__(part, cut(out))))
            visual.output_tokens = "final" in parts
            out = visual(x)
        finally:
            visual.output_tokens = False
            for hook in hooks:
                hook.remove()
        if "final" in parts:
            out, seen["final"] = out
        tokens = [seen[part] for part in parts]
        return out, tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=-1)

    def token_source(self, layer: str) -> tuple[Any, Callable[[Any], Any]]:
        """The module whose output holds the patch tokens of ``layer`` (``embed``
        or ``blockK``), and how to cut them out of it; ValueError for others."""
        visual = self.model.visual
        if layer == "embed":  # the patch embedding: what each patch alone shows (colour, local form)
            return visual.conv1, lambda out: out.flatten(2).transpose(1, 2)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        match = re.fullmatch(r"block(\d+)", layer)
        if match and blocks is not None and int(match.group(1)) < len(blocks):
            extra = 1 if getattr(visual, "class_embedding", None) is not None else 0
            return blocks[int(match.group(1))], lambda out: out[:, extra:]
        depth = len(blocks) if blocks is not None else 0
        raise ValueError(f"unknown token layer {layer!r}: use final, embed or block0..block{max(depth - 1, 0)}")

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Encode PIL images to normalised vectors."""
        return self.encode_images(self.image_batch(images))[0]

    # ------------------------------------------------------------------ texts
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Encode texts to normalised float32 vectors, in batches."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                ids = self.tokenize(texts[start : start + batch_size]).to(self.device)
                feats = self._encode_ids(ids)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        if not out:
            return np.empty((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``model.encode_text``, on the batch cut to its longest text when exact.

        With a causal mask and EOT/first-token pooling, padding after the last
        real token cannot change the pooled feature, so a batch of short
        captions runs on a few tokens instead of the full 77-token context.
        """
        m = self.model
        pool = getattr(m, "text_pool_type", None)
        if getattr(m, "attn_mask", None) is None or pool not in ("argmax", "eos", "first") or not (ids != 0).any():
            return m.encode_text(ids)
        import torch
        from open_clip.transformer import text_global_pool

        x, ids, _ = self._text_tower(ids)
        x = text_global_pool(x, ids, pool, eos_token_id=getattr(m, "text_eos_id", None))
        proj = m.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return x

    def _text_tower(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token features after ``ln_final``, the ids and their padding mask.

        With a causal text tower the batch is cut to its longest text first:
        padding after the last real token cannot change the tokens before it,
        so this is exact and saves most of the cost of a 77-token context.
        """
        m = self.model
        mask = ids != 0
        attn = m.attn_mask
        if attn is not None and mask.any():
            length = int(mask.sum(1).max())
            ids, mask, attn = ids[:, :length], mask[:, :length], attn[:length, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[: ids.shape[1]].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=attn))
        return x, ids, mask

    def text_tokens(self, texts: Sequence[str], words: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features of the text tower (after ``ln_final``) and a padding mask.

        Returns ``(tokens, mask)``: ``(n, length, width)`` float and ``(n, length)``
        bool, True where a real token (including start/end) sits; the batch is
        cut to its longest text (see :meth:`_text_tower`). With ``words`` each
        token also carries the tower's input word embedding, ``(n, length, 2 *
        width)``: a contrastive tower may all but erase words the dual encoder
        never needed (relation words, in shapes-tiny), and a reranker reads
        them there.
        """
        import torch

        with torch.no_grad():
            x, ids, mask = self._text_tower(self.tokenize(texts).to(self.device))
            if words:
                x = torch.cat([x, self.model.token_embedding(ids).to(x.dtype)], dim=-1)
        return x, mask

    def image_tokens(self, pixels: torch.Tensor, layer: str = "final") -> torch.Tensor:
        """Patch tokens of the vision tower for a preprocessed batch ``(n, patches, width)``.

        ``layer``: ``final`` (the tower's output tokens before pooling),
        ``embed`` (the patch embedding, before any attention) or ``blockK``
        (the output of transformer block K, class token dropped); several
        joined by ``+`` (``embed+final``) give each patch's tokens of those
        layers side by side, ``(n, patches, width * layers)``.
        """
        import torch

        with torch.no_grad():
            return self.visual_with_tokens(pixels.to(self.device, dtype=self.dtype), layer)[1]

    @property
    def text_width(self) -> int:
        return int(self.model.ln_final.normalized_shape[0])

    @property
    def image_width(self) -> int:
        visual = self.model.visual
        return int(visual.ln_post.normalized_shape[0]) if hasattr(visual, "ln_post") else self.dim


def load_encoder(spec: str | ModelSpec, device: str | None = None) -> Encoder:
    """Build the encoder for ``spec`` through open_clip's factory.

    Raises :class:`ModelNotAvailable` with one clear line when the weights are
    neither cached nor downloadable.
    """
    ms = parse_spec(spec) if isinstance(spec, str) else spec
    _check_available(ms)
    import open_clip

    dev = pick_device(device)
    # Every parameter is overwritten by the checkpoint (open_clip loads it
    # strictly), so random initialisation is wasted start-up time -- except for
    # hf-hub models, whose weights open_clip may fail to fetch and skip.
    skip = _skip_weight_init() if not ms.spec.startswith("hf-hub:") else contextlib.nullcontext()
    try:
        with skip:
            model, _, preprocess = open_clip.create_model_and_transforms(ms.model_name, pretrained=ms.pretrained, device="cpu")
        tokenizer = open_clip.get_tokenizer(ms.model_name)
    except Exception as exc:
        local = ms.local_dir or (Path(ms.pretrained) if ms.pretrained and os.path.sep in ms.pretrained else None)
        if local is not None:  # the files are here: they are damaged or do not fit, nothing to download
            raise ModelNotAvailable(
                f"cannot load model {ms.spec!r}: the files in {local} are damaged or do not fit its config "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
        where = ms.pretrained or ms.model_name
        raise ModelNotAvailable(
            f"cannot load model {ms.spec!r}: weights for {where} are neither cached nor downloadable ({_first_line(exc)}); "
            f"pass a local checkpoint with --model ARCH:/path/to/weights.safetensors or --model local-dir:/path, "
            f"or use the bundled model: {', '.join(bundled_models()) or 'shapes-tiny'}"
        ) from exc
    return Encoder(ms, model, preprocess, tokenizer, dev)


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Make torch's parameter initialisers no-ops while a model is built."""
    import torch

    names = ["normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_"]
    saved = {n: getattr(torch.nn.init, n) for n in names if hasattr(torch.nn.init, n)}
    try:
        for n in saved:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
