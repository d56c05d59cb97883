"""Cross-attention reranker in the ALBEF/BLIP image-text-matching style.

The query's text tokens (from the frozen dual encoder's text tower) attend to a
candidate image's patch tokens (from its vision tower, as stored at indexing
time), through a few pre-LN blocks of text self-attention, text-to-image
cross-attention and MLP. A learned [ITM] token pooled at the end goes through a
head to one logit; the match probability is ``sigmoid(logit / temperature)``,
the temperature fitted on held-out pairs so the probability is calibrated.

A reranker belongs to one dual-encoder model. Its weights live in
``reranker.safetensors`` beside ``reranker.json`` (a :class:`RerankerConfig`),
either inside a bundled or ``local-dir:`` model folder or under
``$CROSSFIND_RERANKERS/<slug>/`` or ``~/.cache/crossfind/rerankers/<slug>/``;
:func:`find_reranker` looks there. Train one with ``crossfind train-reranker`` (:mod:`retrieval.train`).

This module imports torch; the engine imports it only when it reranks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelNotAvailable
from .rerank_files import CONFIG_NAME, MEMORY_VERSION, WEIGHTS_NAME, reranker_dir, reranker_dirs, reranker_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    from .encoders import Encoder

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "RerankerConfig",
    "CrossAttentionITM",
    "RankedCandidate",
    "Reranker",
    "find_reranker",
    "reranker_dirs",
]

LOG = logging.getLogger(__name__)



@dataclass
class RerankerConfig:
    """Shape of a :class:`CrossAttentionITM` and the dual encoder it belongs to."""

    model: str  # slug of the dual-encoder spec whose tokens it was trained on
    text_width: int  # width of the encoder's text tokens (after ln_final)
    image_width: int  # width of the encoder's patch tokens
    image_tokens: int  # patch tokens per image; one learned position each
    max_text_tokens: int  # text context of the encoder; longer inputs are cut
    width: int = 128  # width of the reranker's residual stream
    depth: int = 3  # blocks of [self-attention, cross-attention, MLP]
    heads: int = 4  # attention heads in every attention layer
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of ``width``
    dropout: float = 0.0  # dropout in attention, MLP and residual branches (training only)
    temperature: float = 1.0  # calibration: probability = sigmoid((logit - shift) / temperature)
    shift: float = 0.0  # calibration offset (Platt scaling together with ``temperature``)
    residual: bool = False  # logit = dual_scale * dual cosine + dual_bias + cross-attention correction
    image_layer: str = "final"  # where patch tokens are taken: final, embed, blockK or several joined by + (Encoder.image_tokens)
    text_words: bool = False  # text tokens carry the tower's input word embeddings too (Encoder.text_tokens)
    image_depth: int = 0  # image self-attention blocks before the text attends to the patches
    image_local: int = 0  # hidden width of the local stem over each patch's 3x3 neighbourhood (0: none)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "reranker.json") -> RerankerConfig:
        """Parse and validate (types, sane bounds) a saved config; one-line errors."""
        from .model_checks import check_reranker_config

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelNotAvailable(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ModelNotAvailable(f"{where} must hold a JSON object")
        check_reranker_config(data, where)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def for_encoder(cls, encoder: Encoder, **overrides: object) -> RerankerConfig:
        """A config sized for ``encoder``'s token widths; ``overrides`` set the rest."""
        return cls(
            model=encoder.spec.slug,
            text_width=encoder.text_width,
            image_width=encoder.image_width,
            image_tokens=_patch_count(encoder),
            max_text_tokens=_context_length(encoder),
            **overrides,  # type: ignore[arg-type]
        )

    @property
    def text_features(self) -> int:
        """Width of each text token the module reads (doubled with ``text_words``)."""
        return self.text_width * (2 if self.text_words else 1)

    @property
    def image_layers(self) -> int:
        """How many vision layers each patch's tokens come from (``embed+final``: 2)."""
        return len(self.image_layer.split("+"))

    @property
    def image_features(self) -> int:
        """Width of each stored patch token: ``image_width`` per layer."""
        return self.image_width * self.image_layers


def _patch_count(encoder: Encoder) -> int:
    grid = getattr(encoder.model.visual, "grid_size", None)
    if grid is None or not encoder.has_tokens:
        raise ModelNotAvailable(f"model {encoder.name!r} has no ViT patch tokens; the reranker needs an open_clip ViT model")
    return int(grid[0]) * int(grid[1])


def _context_length(encoder: Encoder) -> int:
    return int(encoder.model.positional_embedding.shape[0])


def _mlp(width: int, ratio: float, dropout: float) -> nn.Module:
    hidden = int(width * ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))


class _Attention(nn.Module):
    """Multi-head attention whose keys and values can be computed once per
    image and shared by every text paired with it."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.kv, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def keys(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``y`` ``(n, length, width)``, each ``(n, heads, length, width / heads)``."""
        n, length, w = y.shape
        k, v = self.kv(y).view(n, length, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(n, length, width)`` attends to ``k``/``v``; ``keep`` ``(n, 1, 1, keys)`` is True on keys to attend to."""
        n, length, w = x.shape
        q = self.q(x).view(n, length, self.heads, w // self.heads).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        return self.out(out.transpose(1, 2).reshape(n, length, w))


class _ImageBlock(nn.Module):
    """Pre-LN self-attention block over an image's patch tokens."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = _Attention(width, heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = _mlp(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_attn(x)
        x = x + self.drop(self.attn(h, *self.attn.keys(h)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class _Block(nn.Module):
    """Pre-LN block: text self-attention, cross-attention to image patches, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads, dropout)
        self.ln_cross = nn.LayerNorm(width)
        self.cross_attn = _Attention(width, heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = _mlp(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, image_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``keep`` ``(n, 1, 1, L)``: the real text tokens; ``image_kv``: this block's
        keys and values of each pair's image (:meth:`_Attention.keys`)."""
        h = self.ln_self(x)
        x = x + self.drop(self.self_attn(h, *self.self_attn.keys(h), keep))
        x = x + self.drop(self.cross_attn(self.ln_cross(x), *image_kv))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


def _with_centred(tokens: torch.Tensor) -> torch.Tensor:
    """Each patch token beside itself minus the image's mean token (what is local)."""
    return torch.cat([tokens, tokens - tokens.mean(dim=1, keepdim=True)], dim=-1)


def grid_features(patches: int, freqs: int = 4) -> torch.Tensor:
    """Each patch's place on its square grid: x, y in [-1, 1] and their sin/cos at ``freqs`` frequencies."""
    side = int(round(patches**0.5))
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens do not form a square grid")
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    xs, ys = xs.reshape(-1, 1), ys.reshape(-1, 1)
    f = torch.arange(1, freqs + 1).float() * torch.pi / 2
    return torch.cat([xs, ys, torch.sin(xs * f), torch.cos(xs * f), torch.sin(ys * f), torch.cos(ys * f)], 1)


class _LocalStem(nn.Module):
    """A small MLP over each patch's 3x3 neighbourhood of first-layer tokens.

    A 3x3 convolution on the token grid, then two 1x1 ones (GELU between),
    out to the reranker's width, added to each patch's projection. It reads
    what no linear map of a token gives: the outline of an object a few
    patches wide, its shape (from the 3x3 window of shapes-tiny's patch
    embedding around an object, a linear probe reads its shape at 0.30, a
    small MLP at 0.92: ``scripts/probe_tokens.py``). The last
    layer starts at zero, so a reranker given a stem scores as it did before
    until training gives the stem a say.
    """

    def __init__(self, features: int, hidden: int, width: int, patches: int) -> None:
        super().__init__()
        self.side = int(round(patches**0.5))
        self.norm = nn.LayerNorm(features)
        last = nn.Conv2d(hidden, width, 1)
        assert last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(features, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 1), nn.GELU(),
            last,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(n, P, features)`` on a square grid, row-major -> ``(n, P, width)``."""
        n, p, c = tokens.shape
        grid = self.norm(tokens).transpose(1, 2).reshape(n, c, self.side, self.side)
        return self.net(grid).flatten(2).transpose(1, 2)


class CrossAttentionITM(nn.Module):
    """Image-text matching head over frozen dual-encoder tokens.

    ``forward(text, mask, image)`` takes text tokens ``(n, L, text_features)``
    (see :attr:`RerankerConfig.text_features`), their padding mask ``(n, L)``
    (True on real tokens) and patch tokens ``(n, P, image_features)`` (each
    layer's ``image_width`` side by side, see ``image_layer``); either side
    may have batch size 1 and is then shared by all ``n`` pairs (one query
    against many candidates). ``dual`` (optional, ``(n,)``) holds the dual
    encoder's cosine of each pair; a residual reranker (``config.residual``)
    adds ``dual_scale * dual + dual_bias`` to its logit (``dual`` None counts as
    cosine 0). Returns raw logits ``(n,)``.

    Each patch token enters as itself and centred on the image's mean token
    (what is local), plus a learned position and the fixed 2-D place of its
    patch (:func:`grid_features`), so what a text token gathers from the image
    says where as well as what. With ``image_local`` a :class:`_LocalStem`
    adds what each patch's 3x3 neighbourhood of first-layer tokens shows
    (the outline of a small object). ``image_depth`` self-attention blocks let
    patches combine into objects before the text attends to them.
    """

    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.text_in = nn.Sequential(nn.LayerNorm(config.text_features), nn.Linear(config.text_features, w))
        self.image_in = nn.Sequential(nn.LayerNorm(2 * config.image_width), nn.Linear(2 * config.image_width, w))
        # One projection per further layer (``image_layer`` "embed+final"), added to the first.
        self.extra_in = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(2 * config.image_width), nn.Linear(2 * config.image_width, w))
            for _ in range(config.image_layers - 1)
        )
        self.local_in = (
            _LocalStem(config.image_width, config.image_local, w, config.image_tokens) if config.image_local else None
        )
        grid = grid_features(config.image_tokens)
        self.register_buffer("grid", grid, persistent=False)
        self.place_in = nn.Linear(grid.shape[1], w)
        self.itm_token = nn.Parameter(torch.randn(w) * 0.02)
        self.text_pos = nn.Parameter(torch.randn(config.max_text_tokens + 1, w) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(config.image_tokens, w) * 0.02)
        self.image_blocks = nn.ModuleList(
            _ImageBlock(w, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.image_depth)
        )
        self.ln_image = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(
            _Block(w, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth)
        )
        self.ln_out = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)
        if config.residual:
            # Residual on the dual encoder: with the head at zero the reranker ranks
            # exactly like the dual encoder; training learns corrections only.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            self.dual_scale = nn.Parameter(torch.tensor(1.0))
            self.dual_bias = nn.Parameter(torch.tensor(0.0))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """The patches as the text sees them, ``(n, P, width)``; compute once per image."""
        if image.shape[1:] != (self.config.image_tokens, self.config.image_features):
            raise ValueError(
                f"expected patch tokens of shape ({self.config.image_tokens}, {self.config.image_features}) per image, "
                f"got {tuple(image.shape[1:])}"
            )
        parts = image.to(self.head.weight.dtype).chunk(self.config.image_layers, dim=-1)
        grid: torch.Tensor = self.grid  # type: ignore[assignment]
        y = self.image_in(_with_centred(parts[0])) + self.image_pos + self.place_in(grid.to(parts[0].dtype))
        for proj, part in zip(self.extra_in, parts[1:]):
            y = y + proj(_with_centred(part))
        if self.local_in is not None:
            y = y + self.local_in(parts[0])
        for block in self.image_blocks:
            y = block(y)
        return self.ln_image(y)

    def forward(
        self,
        text: torch.Tensor,
        mask: torch.Tensor,
        image: torch.Tensor | None,
        dual: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the pairs (text ``j``, image ``j``); with ``image_index`` the
        pairs (text ``j``, image ``image_index[j]``), so each image of a group is
        encoded once. ``memory`` is the images' :meth:`encode_image` computed
        before (then ``image`` is not read and may be None)."""
        logit = self.head(self.fuse(text, mask, image, image_index, memory)[:, 0]).squeeze(-1).float()
        if self.config.residual:
            base = self.dual_bias.float()
            if dual is not None:
                base = base + self.dual_scale.float() * dual.to(logit.device, torch.float32)
            logit = logit + base
        return logit

    def fuse(
        self,
        text: torch.Tensor,
        mask: torch.Tensor,
        image: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The text stream after every block, ``(n, 1 + L, width)``: the [ITM]
        token first, then one state per text token (``L`` cut to the longest text).
        ``memory``: the images' :meth:`encode_image`, when computed before."""
        if memory is None:
            assert image is not None, "fuse needs patch tokens or their image memory"
            img = self.encode_image(image)
        else:
            img = memory.to(self.head.weight.dtype)
        # Causal text towers leave padding after the last real token, so cutting
        # the batch to its longest text changes nothing but the cost.
        length = min(int(mask.sum(1).max()), self.config.max_text_tokens)
        text, mask = text[:, :length].to(self.head.weight.dtype), mask[:, :length]
        t = self.text_in(text)
        itm = self.itm_token.expand(t.shape[0], 1, -1)
        x = torch.cat([itm, t], dim=1) + self.text_pos[: length + 1]
        keep = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        pairs = len(image_index) if image_index is not None else max(x.shape[0], img.shape[0])
        x = x.expand(pairs, -1, -1)
        keep = keep.expand(pairs, -1)[:, None, None, :]
        for block in self.blocks:
            assert isinstance(block, _Block)
            # Keys and values once per image, then one row per pair.
            k, v = block.cross_attn.keys(img)
            if image_index is not None:
                k, v = k[image_index], v[image_index]
            elif k.shape[0] != pairs:
                k, v = k.expand(pairs, -1, -1, -1), v.expand(pairs, -1, -1, -1)
            x = block(x, keep, (k, v))
        return self.ln_out(x)

    def probability(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated match probability of raw logits."""
        return torch.sigmoid((logits - self.config.shift) / self.config.temperature)


@dataclass(frozen=True)
class RankedCandidate:
    """One candidate of :meth:`Reranker.rank`: its position in the input and its probability."""

    index: int  # position in the ``candidates`` passed to ``rank``
    score: float  # calibrated match probability in [0, 1]


class Reranker:
    """A trained :class:`CrossAttentionITM` bound to the dual encoder it belongs to.

    Candidate images are given by their stored patch tokens (float16, as
    :meth:`Encoder.encode_images` returns them with ``with_tokens=True``), so
    reranking never needs the image files. Build one with :meth:`load` or
    :func:`find_reranker`.

    ``encoder`` may also be a function returning it, called (and the reranker
    checked against it) only when text must be encoded: a query whose tokens
    were kept (:meth:`query_tokens`) is re-scored without loading the encoder.
    """

    def __init__(
        self, module: CrossAttentionITM, encoder: Encoder | Callable[[], Encoder], batch_size: int = 256,
        where: str = "this reranker",
    ) -> None:
        self.module = module.eval()
        self.batch_size = batch_size
        self._where = where
        self.folder: Path | None = None  # where it was loaded from (its fingerprint is its files')
        self._encoder: Encoder | None = None
        self._load_encoder: Callable[[], Encoder] | None = None
        if callable(encoder):
            self._load_encoder = encoder
        else:
            self._bind(encoder)

    def _bind(self, encoder: Encoder) -> None:
        _check_compatible(self.config, encoder, where=self._where)
        self.module.to(device=encoder.device, dtype=encoder.dtype)
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        """The dual encoder this reranker belongs to (loaded on first use when given lazily)."""
        if self._encoder is None:
            assert self._load_encoder is not None
            self._bind(self._load_encoder())
        assert self._encoder is not None
        return self._encoder

    @property
    def config(self) -> RerankerConfig:
        return self.module.config

    # ---------------------------------------------------------------- scoring
    def score_images(self, text: str, image_tokens: np.ndarray, dual_scores: np.ndarray | None = None) -> np.ndarray:
        """Match probabilities of one text query against candidate images.

        ``image_tokens`` is ``(n, patches, image_features)``, typically float16 rows
        read from the index's token store; ``dual_scores`` ``(n,)`` the dual
        encoder's cosines of the candidates (a residual reranker builds on them).
        Returns ``(n,)`` float32 in [0, 1].
        """
        return self.probability(self.logits_images(text, image_tokens, dual_scores))

    def score_texts(
        self, image_tokens: np.ndarray, texts: Sequence[str], dual_scores: np.ndarray | None = None
    ) -> np.ndarray:
        """Match probabilities of one image query (its patch tokens ``(patches,
        image_features)``) against candidate texts; ``dual_scores`` as in
        :meth:`score_images`. Returns ``(n,)`` float32 in [0, 1]."""
        return self.probability(self.logits_texts(image_tokens, texts, dual_scores))

    def probability(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated match probabilities of raw logits."""
        with torch.inference_mode():
            return self.module.probability(torch.from_numpy(np.asarray(logits, np.float32))).numpy()

    @torch.inference_mode()
    def query_tokens(self, text: str) -> np.ndarray:
        """The text tower's tokens of one query as this reranker reads them,
        float32 ``(length, text_features)``; pass them to :meth:`logits_images`
        instead of the text to score it again without the encoder."""
        tok, mask = self.encoder.text_tokens([text], words=self.config.text_words)
        return tok[0][mask[0]].float().cpu().numpy()

    @torch.inference_mode()
    def logits_images(
        self, text: str | np.ndarray, image_tokens: np.ndarray, dual_scores: np.ndarray | None = None
    ) -> np.ndarray:
        """Raw logits behind :meth:`score_images`, float32 ``(n,)``: the same
        order as the probabilities, without their saturation near 0 and 1, so
        rank by these. ``text`` is the query, or its :meth:`query_tokens`."""
        tokens = self._check_tokens(image_tokens, ndim=3)
        dual = self._dual(dual_scores, len(tokens))
        text_tok, mask = self._query(text)
        out = [
            self._logits(
                text_tok, mask, self._tensor(tokens[start : start + self.batch_size]),
                None if dual is None else dual[start : start + self.batch_size],
            )
            for start in range(0, len(tokens), self.batch_size)
        ]
        return np.concatenate(out) if out else np.empty(0, np.float32)

    def _query(self, text: str | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens ``(1, L, F)`` and mask of a query or of its kept :meth:`query_tokens`."""
        if isinstance(text, str):
            return self.encoder.text_tokens([text], words=self.config.text_words)  # once per query
        kept = np.asarray(text, dtype=np.float32)
        if kept.ndim != 2 or kept.shape[1] != self.config.text_features or not len(kept):
            raise ValueError(f"query tokens must have shape (length, {self.config.text_features}), got {kept.shape}")
        text_tok = torch.from_numpy(kept.copy())[None].to(self._device)
        return text_tok, torch.ones(text_tok.shape[:2], dtype=torch.bool, device=self._device)

    # --------------------------------------------------- image memory, cached
    @property
    def memory_shape(self) -> tuple[int, int]:
        """Shape of one image's memory (:meth:`image_memory`): ``(patches, width)``."""
        return (self.config.image_tokens, self.config.width)

    @functools.cached_property
    def fingerprint(self) -> str:
        """What this reranker computes, in 16 hex characters: its files'
        (:func:`~retrieval.rerank_files.reranker_fingerprint`), or its config
        and weights when it was built in memory. Keys its cached image memory."""
        if self.folder is not None:
            return reranker_fingerprint(self.folder)
        digest = hashlib.sha256(f"crossfind-reranker-memory{MEMORY_VERSION}".encode() + self.config.to_json().encode())
        for name, value in sorted(self.module.state_dict().items()):
            digest.update(name.encode() + value.detach().to("cpu", torch.float16).numpy().tobytes())
        return digest.hexdigest()[:16]

    @torch.inference_mode()
    def image_memory(self, image_tokens: np.ndarray) -> np.ndarray:
        """The query-independent part of re-ranking: candidate patch tokens
        ``(n, patches, image_features)`` as the text sees them, float16
        ``(n, patches, width)`` (:meth:`CrossAttentionITM.encode_image`). Keep
        it per image and score with :meth:`logits_memory`."""
        tokens = self._check_tokens(image_tokens, ndim=3)
        out = [self.module.encode_image(self._tensor(tokens[s : s + self.batch_size])).to("cpu", torch.float16).numpy()
               for s in range(0, len(tokens), self.batch_size)]
        return np.concatenate(out) if out else np.empty((0, *self.memory_shape), np.float16)

    @torch.inference_mode()
    def logits_memory(
        self, text: str | np.ndarray, memory: np.ndarray, dual_scores: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`logits_images` of candidates given by their :meth:`image_memory`
        ``(n, patches, width)``: the cross-attention part only."""
        memory = np.asarray(memory)
        if memory.ndim != 3 or (memory.size and tuple(memory.shape[1:]) != self.memory_shape):
            raise ValueError(f"image memory must have shape (n, {self.memory_shape[0]}, {self.memory_shape[1]}), got {memory.shape}")
        dual = self._dual(dual_scores, len(memory))
        text_tok, mask = self._query(text)
        out = []
        for start in range(0, len(memory), self.batch_size):
            mem = torch.from_numpy(np.array(memory[start : start + self.batch_size], dtype=np.float16)).to(self._device)
            part = None if dual is None else dual[start : start + self.batch_size]
            out.append(self.module(text_tok, mask, None, part, memory=mem).cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.empty(0, np.float32)

    @torch.inference_mode()
    def logits_texts(
        self, image_tokens: np.ndarray, texts: Sequence[str], dual_scores: np.ndarray | None = None
    ) -> np.ndarray:
        """Raw logits behind :meth:`score_texts` (see :meth:`logits_images`)."""
        image = self._tensor(self._check_tokens(image_tokens, ndim=2)[None])
        dual = self._dual(dual_scores, len(texts))
        out = []
        for start in range(0, len(texts), self.batch_size):
            text_tok, mask = self.encoder.text_tokens(
                list(texts[start : start + self.batch_size]), words=self.config.text_words
            )
            out.append(self._logits(
                text_tok, mask, image, None if dual is None else dual[start : start + self.batch_size]
            ))
        return np.concatenate(out) if out else np.empty(0, np.float32)

    def rank(
        self,
        query: str | np.ndarray,
        candidates: Sequence[str] | np.ndarray,
        top_k: int | None = None,
        dual_scores: np.ndarray | None = None,
    ) -> list[RankedCandidate]:
        """Score every candidate against ``query`` and return them best first.

        A text query ranks candidate images given as patch tokens ``(n, patches,
        width)``; an image query given as patch tokens ``(patches, width)`` ranks
        candidate texts. Ties keep the input order; ``top_k`` keeps the first k;
        ``dual_scores`` are the candidates' dual-encoder cosines.
        """
        if isinstance(query, str):
            logits = self.logits_images(query, np.asarray(candidates), dual_scores=dual_scores)
        else:
            logits = self.logits_texts(np.asarray(query), list(candidates), dual_scores=dual_scores)
        order = np.argsort(-logits, kind="stable")[:top_k]
        probs = self.probability(logits)
        return [RankedCandidate(int(i), float(probs[i])) for i in order]

    def _logits(
        self, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, dual: torch.Tensor | None = None
    ) -> np.ndarray:
        return self.module(text, mask, image, dual).cpu().numpy().astype(np.float32)

    def _dual(self, dual_scores: np.ndarray | None, n: int) -> torch.Tensor | None:
        if dual_scores is None:
            if self.config.residual:
                LOG.debug("residual reranker scored without dual-encoder cosines; treating them as 0")
            return None
        dual = np.asarray(dual_scores, dtype=np.float32).reshape(-1)
        if len(dual) != n:
            raise ValueError(f"dual_scores has {len(dual)} entries for {n} candidates")
        return torch.from_numpy(dual.copy())

    def _tensor(self, tokens: np.ndarray) -> torch.Tensor:
        # Stored tokens are float16; casting fresh ones the same way keeps both paths identical.
        # Always a copy: rows may come from a read-only memmap.
        return torch.from_numpy(np.array(tokens, dtype=np.float16, order="C")).to(self._device)

    @property
    def _device(self) -> torch.device:
        return self.module.head.weight.device

    def _check_tokens(self, tokens: np.ndarray, ndim: int) -> np.ndarray:
        tokens = np.asarray(tokens)
        want = (self.config.image_tokens, self.config.image_features)
        if tokens.ndim != ndim or (tokens.size and tuple(tokens.shape[-2:]) != want):
            lead = "(n, " if ndim == 3 else "("
            raise ValueError(f"patch tokens must have shape {lead}{want[0]}, {want[1]}), got {tokens.shape}")
        return tokens

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``reranker.safetensors`` (float16) and ``reranker.json`` into ``directory``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.module.state_dict().items()}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / WEIGHTS_NAME)
        os.chmod(out / WEIGHTS_NAME, 0o644)  # package data: readable like the config beside it
        (out / CONFIG_NAME).write_text(self.config.to_json())
        return out

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], encoder: Encoder | Callable[[], Encoder], model: str | None = None
    ) -> Reranker:
        """Load the reranker saved in ``directory`` for ``encoder`` (or a
        function returning it, see :class:`Reranker`; ``model`` names it in
        messages then).

        Raises :class:`ModelNotAvailable` when the files are missing or do not
        fit the config, or the reranker was trained for a model with other
        token shapes (checked when the encoder is at hand).
        """
        from safetensors.torch import load_file

        name = model or (encoder.name if not callable(encoder) else "MODEL")
        where = Path(directory)
        weights, cfg_path = where / WEIGHTS_NAME, where / CONFIG_NAME
        if not (weights.is_file() and cfg_path.is_file()):
            raise ModelNotAvailable(
                f"no reranker in {where} (needs {WEIGHTS_NAME} and {CONFIG_NAME}); "
                f"train one with crossfind train-reranker DATA --model {name} --out {where}"
            )
        try:
            text = cfg_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelNotAvailable(f"cannot read {cfg_path}: {exc}") from None
        config = RerankerConfig.from_json(text, where=str(cfg_path))
        if not callable(encoder):
            _check_compatible(config, encoder, where=str(where))
        module = CrossAttentionITM(config)
        try:
            state = load_file(str(weights))
            module.load_state_dict({k: v.float() for k, v in state.items()})
        except Exception as exc:  # weights of another config, or a damaged (truncated) file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotAvailable(
                f"reranker weights in {where} do not fit {CONFIG_NAME} ({first}); retrain with "
                f"crossfind train-reranker DATA --model {name}, or search with --no-rerank"
            ) from exc
        loaded = cls(module, encoder, where=str(where))
        loaded.folder = where
        return loaded


def find_reranker(encoder: Encoder) -> Reranker | None:
    """The reranker trained for ``encoder``'s model, or None when there is none.

    Looks in :func:`reranker_dirs`; a reranker found there but trained for
    other token shapes raises :class:`ModelNotAvailable` rather than being
    skipped, since that is a mistake to fix, not a missing file.
    """
    where = reranker_dir(encoder.spec)
    if where is None:
        return None
    LOG.info("reranker for %s: %s", encoder.name, where)
    return Reranker.load(where, encoder)


def _check_compatible(config: RerankerConfig, encoder: Encoder, where: str) -> None:
    have = {
        "text width": encoder.text_width,
        "image width": encoder.image_width,
        "patch tokens": _patch_count(encoder),
        "text context": _context_length(encoder),
    }
    want = {
        "text width": config.text_width,
        "image width": config.image_width,
        "patch tokens": config.image_tokens,
        "text context": config.max_text_tokens,
    }
    diff = [f"{k} {want[k]} vs {have[k]}" for k in want if want[k] != have[k]]
    if diff:
        raise ModelNotAvailable(
            f"{where} was trained for model {config.model!r} and does not fit model {encoder.name!r} "
            f"({'; '.join(diff)}); train one with crossfind train-reranker DATA --model {encoder.name}, "
            f"or search with --no-rerank"
        )
