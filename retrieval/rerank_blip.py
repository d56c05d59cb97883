"""Pretrained BLIP image-text matching (ITM) as a reranker, through ``transformers``.

BLIP's ITM head (``BlipForImageTextRetrieval``) reads a caption's tokens with
cross-attention to the image's own ViT tokens (BLIP-base: ViT-B/16 at 384 px,
577 tokens of width 768) and outputs two logits, no-match and match. crossfind
uses it the way BLIP does in retrieval: the dual encoder finds the top-k
candidates, ITM re-scores them.

* Scores. ``margin = logit_match - logit_nomatch``, so ``sigmoid(margin)`` is
  exactly the softmax match probability of ``transformers``. A Platt
  :class:`Calibration` (``sigmoid(scale * margin + bias)``, fitted with
  :func:`fit_platt` on a captioned folder) turns it into a calibrated match
  probability: the hit's ``rerank_score``, which ``--threshold`` filters on.
  Uncalibrated (scale 1, bias 0), it is the model's own ITM probability.
* Order. Like BLIP's reported ITM+ITC score, hits are ordered by
  :func:`fuse`: the calibrated log-odds plus the dual encoder's cosine.
* Image features. ITM needs the vision tower's output for every candidate,
  computed at query time in batches (:meth:`BlipReranker.features`) and kept
  as float16 in a :class:`FeatureCache` folder keyed by the item's id, its
  content and the reranker's :func:`fingerprint`, so a repeated or
  overlapping query does not compute them again.

``transformers`` is an optional dependency (``pip install 'crossfind[blip]'``);
without it, loading raises :class:`~retrieval.errors.MissingExtra`. This
module imports torch; it is imported only to re-rank with BLIP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import ModelNotAvailable
from .feature_cache import FeatureCache, FeatureItem
from .imageio import ImageLoadError, load_image
from .rerank import RankedCandidate
from .reranker_spec import BLIP_EXTRA_HINT, RerankerSpec, parse_reranker_spec, require_transformers

__all__ = [
    "BLIP_EXTRA_HINT",
    "Calibration",
    "fit_platt",
    "fuse",
    "fingerprint",
    "FeatureCache",
    "FeatureItem",
    "BlipReranker",
]

LOG = logging.getLogger(__name__)

#: Files of a save_pretrained folder that decide the features and scores it gives.
_CONFIG_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
                 "vocab.txt", "tokenizer.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


# --------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """Platt scaling of ITM margins: probability = ``sigmoid(scale * margin + bias)``."""

    scale: float = 1.0  # multiplies the ITM margin (logit_match - logit_nomatch)
    bias: float = 0.0  # added after scaling
    pairs: int = 0  # (query, candidate) pairs it was fitted on; 0: not fitted (the model's own softmax)
    positives: int = 0  # of those, the matching pairs

    def log_odds(self, margins: np.ndarray) -> np.ndarray:
        """Calibrated log-odds of ITM margins (float32)."""
        return (self.scale * np.asarray(margins, np.float64) + self.bias).astype(np.float32)

    def probability(self, margins: np.ndarray) -> np.ndarray:
        """Calibrated match probabilities of ITM margins, float32 in [0, 1]."""
        z = self.log_odds(margins).astype(np.float64)
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        return cls(float(data["scale"]), float(data["bias"]), int(data.get("pairs", 0)), int(data.get("positives", 0)))


def fit_platt(margins: np.ndarray, labels: np.ndarray, iterations: int = 100) -> Calibration:
    """Fit Platt scaling to ITM ``margins`` with binary ``labels`` (1: the pair matches).

    Platt's method: logistic regression of the labels on the margins, with
    the targets softened to ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)`` so a
    separable set does not drive the scale to infinity; Newton steps on the
    two parameters. Raises :class:`ValueError` without both kinds of pair.
    """
    m = np.asarray(margins, np.float64).reshape(-1)
    y = np.asarray(labels, bool).reshape(-1)
    if len(m) != len(y):
        raise ValueError(f"{len(m)} margins for {len(y)} labels")
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        raise ValueError("calibration needs matching and non-matching pairs")
    t = np.where(y, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))
    x = np.stack([m, np.ones_like(m)], 1)
    w = np.array([1.0, 0.0])

    def loss(w: np.ndarray) -> float:
        z = x @ w
        return float(np.sum(np.logaddexp(0, z) - t * z))

    for _ in range(iterations):
        z = x @ w
        p = 1.0 / (1.0 + np.exp(-z))
        grad = x.T @ (p - t)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        before, lr = loss(w), 1.0
        while lr > 1e-6 and loss(w - lr * step) > before:
            lr /= 2
        w = w - lr * step
        if np.abs(lr * step).max() < 1e-10:
            break
    return Calibration(float(w[0]), float(w[1]), len(m), pos)


def fuse(log_odds: np.ndarray, dual_scores: np.ndarray) -> np.ndarray:
    """The order of re-ranked hits: calibrated ITM log-odds plus the dual encoder's cosine.

    BLIP's retrieval ranks by ``ITM match logit + ITC similarity``; crossfind
    adds the dual encoder's cosine (its ITC) to the calibrated log-odds.
    """
    return (np.asarray(log_odds, np.float32) + np.asarray(dual_scores, np.float32)).astype(np.float32)


# ---------------------------------------------------------------- features
def fingerprint(folder: str | os.PathLike[str]) -> str:
    """What a BLIP folder's weights and preprocessing are, in 16 hex characters:
    the content of its config, processor and tokenizer files, and each weight
    file's name, size and modification time. Features cached under one
    fingerprint are never read for another."""
    h = hashlib.sha256()
    root = Path(folder)
    for name in _CONFIG_FILES:
        p = root / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    for p in sorted(root.iterdir()):
        if p.name.endswith(_WEIGHT_SUFFIXES):
            st = p.stat()  # follows the hub cache's symlinks to their blobs
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- reranker
def _resolve(rs: RerankerSpec) -> Path | str:
    """The folder to load: a local-dir: folder, a cached hub snapshot, or the
    repository id when it must be downloaded (and the hub can be reached)."""
    if rs.path is not None:
        return rs.path
    from huggingface_hub import try_to_load_from_cache

    from .encoders import _hub_reachable

    assert rs.repo is not None
    cached = try_to_load_from_cache(rs.repo, "config.json")
    if isinstance(cached, str):
        folder = Path(cached).parent
        if any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir()):
            return folder
    if not _hub_reachable():
        raise ModelNotAvailable(
            f"{rs.spec} is neither in the Hugging Face cache nor downloadable (no network); download it once "
            "with network, or save it with save_pretrained and use local-dir:PATH"
        )
    return rs.repo


class BlipReranker:
    """A BLIP ITM model re-ranking dual-encoder candidates.

    ``margins_images(text, features)`` and ``margins_texts(features, texts)``
    give the ITM margin of each pair (see the module docstring),
    :meth:`probability` the calibrated match probability, :meth:`rank` the
    candidates best first. Image features come from :meth:`image_features`
    (decoded images) or :meth:`features` (files, through a :class:`FeatureCache`).
    Build one with :meth:`load`.
    """

    kind = "blip"

    def __init__(
        self, model: Any, processor: Any, spec: RerankerSpec, fingerprint: str, device: str = "cpu",
        calibration: Calibration | None = None, batch_size: int = 16,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.spec = spec
        self.fingerprint = fingerprint
        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model.to(device=device, dtype=self.dtype)
        self.calibration = calibration or Calibration()
        self.batch_size = batch_size
        vision = model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        self.image_shape: tuple[int, int] = (side * side + 1, int(vision.hidden_size))
        self.image_size = int(vision.image_size)
        tok = processor.tokenizer
        self.max_text_tokens = int(min(tok.model_max_length, model.config.text_config.max_position_embeddings))

    @classmethod
    def load(
        cls, spec: str | RerankerSpec, device: str | None = None, calibration: Calibration | None = None
    ) -> BlipReranker:
        """Load a BLIP ITM model and its processor from a ``local-dir:`` folder
        or ``hf-hub:`` repository (see :mod:`retrieval.reranker_spec`).

        Raises :class:`MissingExtra` without ``transformers``,
        :class:`ModelNotAvailable` when the spec names no BLIP model or its
        files cannot be had.
        """
        rs = parse_reranker_spec(spec) if isinstance(spec, str) else spec
        if rs.kind != "blip":
            raise ModelNotAvailable(f"{rs.spec} is a crossfind reranker, not a BLIP model")
        tf = require_transformers()
        source = _resolve(rs)
        verbosity = tf.utils.logging.get_verbosity()
        tf.utils.logging.set_verbosity_error()
        tf.utils.logging.disable_progress_bar()
        try:
            model = tf.BlipForImageTextRetrieval.from_pretrained(str(source))
            processor = tf.BlipProcessor.from_pretrained(str(source))
        except (OSError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelNotAvailable(f"cannot load BLIP reranker {rs.spec}: {first}") from None
        finally:
            tf.utils.logging.set_verbosity(verbosity)
            tf.utils.logging.enable_progress_bar()
        folder = source if isinstance(source, Path) else _resolve(rs)  # downloaded: now in the cache
        fp = fingerprint(folder) if isinstance(folder, Path) else hashlib.sha256(folder.encode()).hexdigest()[:16]
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, processor, rs, fp, dev, calibration)

    # ------------------------------------------------------------- features
    @torch.inference_mode()
    def image_features(self, images: Sequence[Any]) -> np.ndarray:
        """The vision tower's output for decoded RGB images, float32 ``(n, tokens, width)``."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pix = self.processor.image_processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            pix = pix["pixel_values"].to(self.device, self.dtype)
            out.append(self.model.vision_model(pixel_values=pix).last_hidden_state.float().cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, *self.image_shape), np.float32)

    def features(
        self, items: Sequence[FeatureItem], cache: FeatureCache | None = None,
        on_compute: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features of candidate image files ``(n, tokens, width)`` float32 and
        which could be had ``(n,)`` bool: cached ones read, the rest decoded,
        computed in batches and cached. A file that cannot be decoded any more
        is logged and marked False (its row is zeros). ``on_compute(n)`` is
        told how many are computed."""
        feats = np.zeros((len(items), *self.image_shape), np.float32)
        ok = np.zeros(len(items), bool)
        todo: list[int] = []
        for j, item in enumerate(items):
            got = cache.get(item) if cache is not None else None
            if got is not None:
                feats[j], ok[j] = got, True
            else:
                todo.append(j)
        if on_compute is not None and todo:
            on_compute(len(todo))
        for start in range(0, len(todo), self.batch_size):
            part, images = [], []
            for j in todo[start : start + self.batch_size]:
                try:
                    images.append(load_image(items[j].path, min_size=self.image_size).image)
                    part.append(j)
                except ImageLoadError as exc:
                    LOG.warning("cannot read %s for re-ranking: %s", items[j].path, exc.reason)
            if not part:
                continue
            new = self.image_features(images)
            for j, f in zip(part, new):
                feats[j], ok[j] = f, True
                if cache is not None:
                    cache.put(items[j], f)
        return feats, ok

    def cache(self, root: str | os.PathLike[str], read_only: bool = False) -> FeatureCache:
        """This reranker's feature cache under ``root`` (one folder per fingerprint)."""
        return FeatureCache(root, self.fingerprint, self.image_shape, read_only=read_only)

    # --------------------------------------------------------------- scores
    def _text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
            return_token_type_ids=False, return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _margins(self, ids: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor) -> np.ndarray:
        atts = torch.ones(feats.shape[:2], dtype=torch.long, device=self.device)
        hidden = self.model.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=feats, encoder_attention_mask=atts,
        ).last_hidden_state
        logits = self.model.itm_head(hidden[:, 0, :]).float()
        return (logits[:, 1] - logits[:, 0]).cpu().numpy().astype(np.float32)

    def _check(self, features: np.ndarray, ndim: int) -> np.ndarray:
        features = np.asarray(features)
        if features.ndim != ndim or (features.size and tuple(features.shape[-2:]) != self.image_shape):
            raise ValueError(f"BLIP image features must have shape {'(n, ' if ndim == 3 else '('}"
                             f"{self.image_shape[0]}, {self.image_shape[1]}), got {features.shape}")
        return features

    @torch.inference_mode()
    def margins_images(self, text: str, features: np.ndarray) -> np.ndarray:
        """ITM margins (``logit_match - logit_nomatch``) of one text against
        candidate images' features ``(n, tokens, width)``; float32 ``(n,)``."""
        features = self._check(features, 3)
        ids, mask = self._text([text])
        out = []
        for start in range(0, len(features), self.batch_size):
            f = torch.from_numpy(np.ascontiguousarray(features[start : start + self.batch_size], np.float32))
            f = f.to(self.device, self.dtype)
            out.append(self._margins(ids.expand(len(f), -1), mask.expand(len(f), -1), f))
        return np.concatenate(out) if out else np.empty(0, np.float32)

    @torch.inference_mode()
    def margins_texts(self, features: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """ITM margins of one image's features ``(tokens, width)`` against candidate texts; float32 ``(n,)``."""
        f = torch.from_numpy(np.ascontiguousarray(self._check(features, 2), np.float32))[None].to(self.device, self.dtype)
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = self._text(texts[start : start + self.batch_size])
            out.append(self._margins(ids, mask, f.expand(len(ids), -1, -1)))
        return np.concatenate(out) if out else np.empty(0, np.float32)

    def probability(self, margins: np.ndarray) -> np.ndarray:
        """Calibrated match probabilities of ITM margins (see :class:`Calibration`)."""
        return self.calibration.probability(margins)

    def order_keys(self, margins: np.ndarray, dual_scores: np.ndarray | None = None) -> np.ndarray:
        """What hits are sorted by, higher first: :func:`fuse` of the calibrated
        log-odds and the dual cosines, or the log-odds alone without them."""
        z = self.calibration.log_odds(margins)
        return z if dual_scores is None else fuse(z, dual_scores)

    def score_images(self, text: str, features: np.ndarray) -> np.ndarray:
        """Calibrated match probabilities of one text against candidate images' features."""
        return self.probability(self.margins_images(text, features))

    def rank(
        self, query: str | np.ndarray, candidates: Sequence[str] | np.ndarray, top_k: int | None = None,
        dual_scores: np.ndarray | None = None,
    ) -> list[RankedCandidate]:
        """Candidates best first: a text query against image features ``(n,
        tokens, width)``, or an image's features ``(tokens, width)`` against
        texts; ordered by :meth:`order_keys`, ties in input order."""
        if isinstance(query, str):
            margins = self.margins_images(query, np.asarray(candidates))
        else:
            margins = self.margins_texts(np.asarray(query), [str(c) for c in candidates])
        keys = self.order_keys(margins, dual_scores)
        probs = self.probability(margins)
        return [RankedCandidate(int(i), float(probs[i])) for i in np.argsort(-keys, kind="stable")[:top_k]]
