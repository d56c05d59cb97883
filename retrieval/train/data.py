"""Training data for the reranker: frozen-encoder features held in memory.

A :class:`Pool` keeps, for a set of images and captions, what the frozen dual
encoder gives once: patch tokens (float16, as the token store keeps them),
normalised vectors, text tokens and masks, and relevance keys (the canonical
scene key of a generated scene, else the image). Pools come from

* a captioned folder (``captions.jsonl`` or a Karpathy-style JSON, read by
  :func:`retrieval.evaluate.read_pairs`), or
* generated shapes scenes (:mod:`retrieval.shapes`): minimal-pair groups of
  four (a scene, its colours swapped, shapes swapped, relation reversed) and
  ordinary scenes, drawn in memory from fixed seeds (:func:`shapes_pool`).

:class:`DataSpec` parses the ``DATA`` argument of ``crossfind train-reranker``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CorpusError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..encoders import Encoder
    from ..shapes import Sample, Scene

MINIMAL_SEED = 1234  # generated minimal-pair groups trained on
ORDINARY_SEED = 4321  # generated ordinary scenes trained on
HELD_MINIMAL_SEED, HELD_ORDINARY_SEED = 8, 9  # watched during training
CALIB_SEED = 300  # calibration scenes: ordinary at 300, minimal pairs at 301
TUNE_SEEDS = (21, 22)  # ordinary, minimal pairs: choosing the dual-cosine weight only
EVAL_SEEDS = (11, 12)  # ordinary, minimal pairs: the final held-out evaluation


@dataclass(frozen=True)
class DataSpec:
    """What ``DATA`` names: a captioned folder (``folder``, optionally with
    ``annotations``, a Karpathy JSON) or generated shapes scenes (``minimal``
    minimal-pair items and ``ordinary`` ordinary scenes)."""

    folder: Path | None = None
    annotations: Path | None = None
    minimal: int = 0
    ordinary: int = 0

    @property
    def shapes(self) -> bool:
        return self.folder is None

    @classmethod
    def parse(cls, data: str) -> DataSpec:
        """``shapes:minimal=N[,ordinary=M]``, a folder with ``captions.jsonl``, or a Karpathy JSON file."""
        if data.startswith("shapes:"):
            fields_ = dict(minimal=0, ordinary=0)
            for part in filter(None, data[len("shapes:"):].split(",")):
                m = re.fullmatch(r"(minimal|ordinary)=(\d+)", part.strip())
                if m is None:
                    raise CorpusError(f"{data!r}: expected shapes:minimal=N[,ordinary=M], got {part!r}")
                fields_[m.group(1)] = int(m.group(2))
            if fields_["minimal"] % 4:
                raise CorpusError(f"{data!r}: minimal= must be a multiple of 4 (groups of four)")
            return cls(minimal=fields_["minimal"], ordinary=fields_["ordinary"])
        path = Path(data)
        if path.is_file() and path.suffix == ".json":
            return cls(folder=path.parent, annotations=path)
        if path.is_dir():
            if not (path / "captions.jsonl").is_file():
                raise CorpusError(f"{path} has no captions.jsonl (or give a Karpathy-style JSON file as DATA)")
            return cls(folder=path)
        raise CorpusError(f"{data}: no such folder or JSON file (or use shapes:minimal=N[,ordinary=M])")


@dataclass
class Pool:
    """Frozen-encoder features of images and captions, with relevance keys.

    Captions index images through ``txt_img``; generated scenes have one
    caption per image, in the same order."""

    img_tok: torch.Tensor  # (Ni, P, F) float16 patch tokens
    img_vec: np.ndarray  # (Ni, D) float32, normalised
    img_key: np.ndarray  # (Ni,) key ids
    txt_tok: torch.Tensor  # (Nt, L, T) float32 text tokens, padded to the text context
    txt_mask: torch.Tensor  # (Nt, L) bool, True on real tokens
    txt_vec: np.ndarray  # (Nt, D)
    txt_key: np.ndarray  # (Nt,) key ids
    txt_img: np.ndarray  # (Nt,) each caption's own image
    texts: list[str]
    scenes: list[str | None]  # canonical scene key per caption (None: not a generated scene)
    partners: list[list[int]] = field(default_factory=list)  # per caption: minimally different captions
    canon_tok: torch.Tensor | None = None  # tokens of each caption's canonical scene key (curriculum)
    canon_mask: torch.Tensor | None = None
    shapes: torch.Tensor | None = None  # (Ni, P): shape index under each object's centre patch, -1 elsewhere
    mined_t2i: np.ndarray | None = None  # (Nt, k) hardest wrong images per caption
    mined_i2t: np.ndarray | None = None  # (Ni, k) hardest wrong captions per image

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def empty(cls) -> Pool:
        """A pool with nothing in it."""
        z = np.zeros((0, 1), np.float32)
        ids = np.zeros(0, np.int64)
        return cls(torch.zeros(0, 1, 1), z, ids, torch.zeros(0, 1, 1), torch.zeros(0, 1, dtype=torch.bool), z, ids,
                   ids, [], [])

    def take(self, n: int) -> Pool:
        """The first ``n`` captions and images (one caption per image), without mining or partners."""
        return Pool(self.img_tok[:n], self.img_vec[:n], self.img_key[:n], self.txt_tok[:n], self.txt_mask[:n],
                    self.txt_vec[:n], self.txt_key[:n], self.txt_img[:n], self.texts[:n], self.scenes[:n])

    @staticmethod
    def join(a: Pool, b: Pool) -> Pool:
        """``a`` then ``b`` (indices of ``b`` shifted past ``a``; keys kept as ids of both)."""
        offset = len(a.img_key)
        key_base = int(max(a.img_key.max(initial=-1), a.txt_key.max(initial=-1))) + 1
        cat = torch.cat
        return Pool(
            cat([a.img_tok, b.img_tok]), np.concatenate([a.img_vec, b.img_vec]),
            np.concatenate([a.img_key, b.img_key + key_base]), cat([a.txt_tok, b.txt_tok]),
            cat([a.txt_mask, b.txt_mask]), np.concatenate([a.txt_vec, b.txt_vec]),
            np.concatenate([a.txt_key, b.txt_key + key_base]), np.concatenate([a.txt_img, b.txt_img + offset]),
            a.texts + b.texts, a.scenes + b.scenes,
            shapes=None if a.shapes is None or b.shapes is None else cat([a.shapes, b.shapes]),
        )


# ---------------------------------------------------------------- encoding
def text_features(encoder: Encoder, texts: Sequence[str], words: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 text tokens and masks (with ``words`` the input word embeddings
    beside the tower's output), padded to the model's full text context so any
    two sets stack."""
    context = int(encoder.model.positional_embedding.shape[0])
    toks, masks = [], []
    with torch.inference_mode():
        for start in range(0, len(texts), 512):
            tok, mask = encoder.text_tokens(list(texts[start : start + 512]), words=words)
            toks.append(F.pad(tok.float().cpu(), (0, 0, 0, context - tok.shape[1])))
            masks.append(F.pad(mask.cpu(), (0, context - mask.shape[1])))
    if not toks:
        width = encoder.text_width * (2 if words else 1)
        return torch.zeros(0, context, width), torch.zeros(0, context, dtype=torch.bool)
    return torch.cat(toks), torch.cat(masks)


def image_features(encoder: Encoder, images: Sequence[Image.Image], layer: str) -> tuple[np.ndarray, torch.Tensor]:
    """Normalised vectors and float16 patch tokens of ``layer`` (``embed+final``: side by side), one forward pass."""
    vecs, toks = [], []
    for start in range(0, len(images), 256):
        v, tok = encoder.encode_images(encoder.image_batch(images[start : start + 256]), with_tokens=True,
                                       token_layer=layer)
        assert tok is not None
        vecs.append(v)
        toks.append(torch.from_numpy(tok))
    if not vecs:
        raise CorpusError("no images to train on")
    return np.concatenate(vecs), torch.cat(toks)


def key_ids(*keys: Iterable[str]) -> list[np.ndarray]:
    """Integer ids of string keys, shared across the lists given."""
    ids: dict[str, int] = {}
    return [np.array([ids.setdefault(k, len(ids)) for k in ks], np.int64) for ks in keys]


def encode_pool(
    encoder: Encoder, images: Sequence[Image.Image], img_keys: Sequence[str], texts: Sequence[str],
    txt_img: Sequence[int], txt_keys: Sequence[str], scenes: Sequence[str | None], layer: str, words: bool,
) -> Pool:
    """Encode images and captions once into a :class:`Pool`."""
    img_vec, img_tok = image_features(encoder, images, layer)
    txt_tok, txt_mask = text_features(encoder, texts, words)
    txt_key, img_key = key_ids(txt_keys, img_keys)
    return Pool(img_tok, img_vec, img_key, txt_tok, txt_mask, encoder.encode_texts(list(texts)), txt_key,
                np.asarray(txt_img, np.int64), list(texts), list(scenes), [[] for _ in texts])


# ------------------------------------------------------------ generated scenes
def shape_targets(items: Sequence[Sample], patches: int, size: int) -> torch.Tensor:
    """``(n, P)``: the shape index of the object whose centre lies in each patch, -1 elsewhere."""
    from ..shapes import SHAPES

    grid = int(round(patches**0.5))
    step = size / grid
    out = torch.full((len(items), patches), -1, dtype=torch.long)
    for i, item in enumerate(items):
        for obj, (x, y, _) in zip(item.scene.objects, item.boxes):
            out[i, min(int(y // step), grid - 1) * grid + min(int(x // step), grid - 1)] = SHAPES.index(obj.shape)
    return out


def shapes_pool(
    encoder: Encoder, n: int, seed: int, minimal_pairs: bool, layer: str, words: bool, canonical: bool = False,
) -> Pool:
    """``n`` generated scenes of ``seed`` (:func:`retrieval.shapes.samples`):
    one caption per image, shape targets for the local stem and, with
    ``canonical``, the tokens of each scene's canonical key. Minimal-pair items
    come in groups of four consecutive ones, each the others' partners."""
    from ..shapes import samples

    items = list(samples(n, seed, size=encoder.image_size, minimal_pairs=minimal_pairs))
    keys = [x.scene.key() for x in items]
    pool = encode_pool(encoder, [x.image for x in items], keys, [x.caption for x in items], range(n), keys, keys,
                       layer, words)
    pool.shapes = shape_targets(items, pool.img_tok.shape[1], encoder.image_size)
    if minimal_pairs:
        pool.partners = [[4 * (i // 4) + m for m in range(4) if 4 * (i // 4) + m != i] for i in range(n)]
    if canonical:
        pool.canon_tok, pool.canon_mask = text_features(encoder, keys, words)
    return pool


def parse_scene(key: str | None) -> Scene | None:
    """The scene of a canonical key, or None when ``key`` is not one."""
    from ..shapes import Scene

    if not key:
        return None
    try:
        return Scene.from_key(key)
    except (ValueError, TypeError):
        return None


# ---------------------------------------------------------------- records
Record = tuple[str, str, str | None]  # (image path, caption, scene key or None)


def folder_records(spec: DataSpec) -> list[Record]:
    """The (image, caption, scene) records of a captioned folder."""
    import json

    from ..evaluate import read_pairs

    assert spec.folder is not None
    if spec.annotations is not None:
        return [(str(p.image), p.caption, None) for p in read_pairs(spec.folder, spec.annotations)]
    out: list[Record] = []
    for line in (spec.folder / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append((str((spec.folder / rec["image"]).resolve()), str(rec["caption"]), rec.get("scene")))
    if not out:
        raise CorpusError(f"{spec.folder / 'captions.jsonl'} holds no records")
    return out


def generated_records(n: int, seed: int, minimal_fraction: float = 0.4) -> list[tuple[Sample, str]]:
    """Generated scenes for calibration: ordinary ones of ``seed`` then minimal
    pairs of ``seed + 1``, each with a record name (``ordinary/000012``)."""
    from ..shapes import samples

    n_min = int(n * minimal_fraction) // 4 * 4
    out = [(s, f"ordinary/{i:06d}") for i, s in enumerate(samples(n - n_min, seed))]
    return out + [(s, f"minimal/{i:06d}") for i, s in enumerate(samples(n_min, seed + 1, minimal_pairs=True))]


def split_keys(keys: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A random ``fraction`` of the distinct ``keys`` (at least one), to hold out."""
    unique = sorted(set(keys))
    rng = np.random.default_rng(seed)
    held = rng.choice(len(unique), size=max(1, int(len(unique) * fraction)), replace=False)
    return {unique[i] for i in held.tolist()}


def records_pool(
    encoder: Encoder, records: Sequence[tuple[Image.Image | str, str, str]], layer: str, words: bool,
    perturb_seed: int | None = None, size: int | None = None,
) -> Pool:
    """A pool of ``(image or path, caption, key)`` records; images shared by
    path. With ``perturb_seed``, every generated scene (key parses as a scene)
    also gets its colours-swapped, shapes-swapped and relation-reversed
    variants, captioned and rendered, as its partners."""
    from PIL import Image as PILImage

    from ..shapes import reverse_relation, swap_colors, swap_shapes

    images: list[PILImage.Image] = []
    seen: dict[str, int] = {}
    img_keys: list[str] = []
    texts, txt_img, keys = [], [], []
    for image, caption, key in records:
        name = image if isinstance(image, str) else f"#{len(images)}"
        if name not in seen:
            if isinstance(image, str):
                try:
                    with PILImage.open(image) as im:
                        images.append(im.convert("RGB"))
                except OSError as exc:
                    raise CorpusError(f"cannot read image {image}: {exc}") from None
            else:
                images.append(image)
            seen[name] = len(images) - 1
            img_keys.append(key)
        texts.append(caption)
        txt_img.append(seen[name])
        keys.append(key)
    partners: list[list[int]] = [[] for _ in texts]
    n_orig = len(texts)
    if perturb_seed is not None:
        side = size or (images[0].size[0] if images else 64)
        for t in range(n_orig):
            scene = parse_scene(keys[t])
            if scene is None:
                continue
            group = [t]
            for j, fn in enumerate((swap_colors, swap_shapes, reverse_relation)):
                other = fn(scene)
                if other is None:
                    continue
                g = np.random.default_rng([perturb_seed, t, j])
                texts.append(other.caption(g))
                images.append(other.render(side, g))
                img_keys.append(other.key())
                txt_img.append(len(images) - 1)
                keys.append(other.key())
                partners.append([])
                group.append(len(texts) - 1)
            for a in group:
                partners[a].extend(b for b in group if b != a)
    scenes = [k if parse_scene(k) is not None else None for k in keys]
    pool = encode_pool(encoder, images, img_keys, texts, txt_img, keys, scenes, layer, words)
    pool.partners = partners
    return pool
