"""The generated ``shapes`` dataset: scenes of coloured shapes with captions.

A :class:`Scene` holds one to three objects (:class:`Obj`: a size, a colour and
a shape) and the spatial relations between them ("left of", "right of",
"above", "below"). Each scene has a canonical key, shared by every equivalent
description ("A left of B" and "B right of A" give the same key), several
caption phrasings of one small grammar, and a renderer whose geometry really
satisfies the relations. :func:`generate` writes a folder of PNG images and a
``captions.jsonl``; with ``minimal_pairs=True`` it writes groups of four
scenes that differ only by swapped colours, swapped shapes or a reversed
relation, the compositional test set.

This module needs Pillow and numpy only (no torch). Output depends only on the
seed: item ``i`` of seed ``s`` is drawn from ``numpy.random.default_rng([s, i])``,
so the same seed gives byte-identical files and a shorter run is a prefix of a
longer one.

Seeds used by the project (see ``scripts/train_shapes_model.py``): training
pools use seeds 1000 and up, the held-out retrieval evaluation seed 7, the
held-out minimal-pairs evaluation seed 8, training-time monitoring seed 9.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "RELATIONS",
    "Obj",
    "Scene",
    "Sample",
    "swap_colors",
    "swap_shapes",
    "reverse_relation",
    "samples",
    "generate",
]

#: Object colours and their RGB values; all stay distinguishable on every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 175, 60),
    "blue": (40, 80, 235),
    "yellow": (250, 225, 40),
    "purple": (150, 55, 200),
    "orange": (255, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
#: Shape names.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
#: Size names.
SIZES: tuple[str, ...] = ("small", "large")
#: Relation names, as they appear in captions.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Canonical form of a relation: (key token, whether subject and object swap).
_CANON = {"left of": ("left-of", False), "right of": ("left-of", True), "above": ("above", False), "below": ("above", True)}
_UNCANON = {"left-of": "left of", "above": "above"}
_HORIZONTAL = ("left of", "right of")
_VERTICAL = ("above", "below")

# Muted, mid-luminance backgrounds: far from white, black and every saturated colour.
_BACKGROUNDS = np.array(
    [
        (128, 128, 128),
        (150, 150, 150),
        (108, 108, 108),
        (140, 130, 115),
        (112, 124, 138),
        (124, 138, 124),
        (142, 126, 134),
    ],
    dtype=np.float32,
)
# Object radius as a fraction of the image side; sizes jitter by a few percent.
_RADIUS = {"small": 0.075, "large": 0.14}
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down for antialiasing
_N_OBJECTS_P = (0.2, 0.45, 0.35)  # probability of 1, 2, 3 objects in a random scene

Relation = tuple[int, str, int]  # (subject index, relation name, object index)
RngLike = Union[np.random.Generator, int, None]


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


@dataclass(frozen=True)
class Obj:
    """One object of a scene."""

    size: str  # one of SIZES
    color: str  # one of COLORS
    shape: str  # one of SHAPES

    def __post_init__(self) -> None:
        for value, choices, what in ((self.size, SIZES, "size"), (self.color, tuple(COLORS), "colour"), (self.shape, SHAPES, "shape")):
            if value not in choices:
                raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")

    @property
    def phrase(self) -> str:
        """The noun phrase without article: ``"small red circle"``."""
        return f"{self.size} {self.color} {self.shape}"

    @classmethod
    def from_phrase(cls, phrase: str) -> Obj:
        """Parse ``"small red circle"`` back into an :class:`Obj`."""
        words = phrase.split()
        if len(words) != 3:
            raise ValueError(f"object phrase {phrase!r} is not 'SIZE COLOUR SHAPE'")
        return cls(*words)

    @classmethod
    def random(cls, rng: np.random.Generator) -> Obj:
        """A uniformly random object."""
        return cls(SIZES[rng.integers(len(SIZES))], list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])


@dataclass(frozen=True, eq=False)
class Scene:
    """Objects and the relations that connect them.

    ``relations`` form a tree over the objects (``len(objects) - 1`` edges,
    all objects connected), and objects are pairwise distinct, so every object
    is named unambiguously by its phrase. Two scenes are equal when their
    canonical :meth:`key` is equal.
    """

    objects: tuple[Obj, ...]  # one to three distinct objects
    relations: tuple[Relation, ...] = ()  # (subject index, relation, object index) edges of a tree

    def __post_init__(self) -> None:
        n = len(self.objects)
        if not 1 <= n <= 3:
            raise ValueError(f"a scene has 1 to 3 objects, not {n}")
        if len(set(self.objects)) != n:
            raise ValueError("objects of a scene must be distinct")
        if len(self.relations) != n - 1:
            raise ValueError(f"a scene of {n} objects needs {n - 1} relations, got {len(self.relations)}")
        seen = {0}
        for _ in range(n):
            for s, rel, o in self.relations:
                if rel not in RELATIONS:
                    raise ValueError(f"unknown relation {rel!r}; choose one of: {', '.join(RELATIONS)}")
                if not (0 <= s < n and 0 <= o < n) or s == o:
                    raise ValueError(f"bad relation indices ({s}, {o}) for {n} objects")
                if s in seen or o in seen:
                    seen |= {s, o}
        if len(seen) != n:
            raise ValueError("relations must connect all objects")

    # -------------------------------------------------------------- identity
    def key(self) -> str:
        """Canonical string: equal for every equivalent description of the scene.

        Relations are normalised to ``left-of`` / ``above`` (swapping subject
        and object for "right of" / "below") and sorted, e.g.
        ``"small red circle left-of large blue square"``; one-object scenes are
        just the object phrase.
        """
        if not self.relations:
            return self.objects[0].phrase
        parts = []
        for s, rel, o in self.relations:
            token, flip = _CANON[rel]
            a, b = (self.objects[o], self.objects[s]) if flip else (self.objects[s], self.objects[o])
            parts.append(f"{a.phrase} {token} {b.phrase}")
        return "; ".join(sorted(parts))

    @classmethod
    def from_key(cls, key: str) -> Scene:
        """Parse a canonical key back into a scene (``Scene.from_key(s.key()) == s``)."""
        objects: list[Obj] = []

        def index(phrase: str) -> int:
            obj = Obj.from_phrase(phrase)
            if obj not in objects:
                objects.append(obj)
            return objects.index(obj)

        relations: list[Relation] = []
        for clause in key.split("; "):
            for token, rel in _UNCANON.items():
                left, sep, right = clause.partition(f" {token} ")
                if sep:
                    relations.append((index(left), rel, index(right)))
                    break
            else:
                index(clause)
        return cls(tuple(objects), tuple(relations))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scene) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    # -------------------------------------------------------------- sampling
    @classmethod
    def random(cls, rng: RngLike = None, n_objects: int | None = None) -> Scene:
        """A random scene; ``n_objects`` (1-3) defaults to a draw weighted 20/45/35 %.

        Three-object scenes have the form "A <horizontal> B, and C <vertical> B"
        (or the axes the other way round), which always has room to render.
        """
        g = _rng(rng)
        n = int(g.choice([1, 2, 3], p=_N_OBJECTS_P)) if n_objects is None else n_objects
        objects: list[Obj] = []
        while len(objects) < n:
            obj = Obj.random(g)
            if obj not in objects:
                objects.append(obj)
        if n == 1:
            return cls(tuple(objects))
        if n == 2:
            return cls(tuple(objects), ((0, RELATIONS[g.integers(4)], 1),))
        first, second = (_HORIZONTAL, _VERTICAL) if g.random() < 0.5 else (_VERTICAL, _HORIZONTAL)
        return cls(tuple(objects), ((0, first[g.integers(2)], 1), (2, second[g.integers(2)], 1)))

    # -------------------------------------------------------------- captions
    def caption(self, rng: RngLike = None) -> str:
        """A caption in one of several phrasings of the same grammar.

        One object: "a small red circle", "there is a small red circle", "an
        image of a small red circle". Two: "a small red circle left of a large
        blue square", "a large blue square to the right of a small red circle",
        "there is ...". Three: two such clauses joined by ", and ", where an
        object already named is "the ..." the second time.
        """
        g = _rng(rng)
        if not self.relations:
            template = ("{}", "there is {}", "an image of {}")[g.integers(3)]
            return template.format("a " + self.objects[0].phrase)
        order = list(self.relations)
        if len(order) > 1 and g.random() < 0.5:
            order.reverse()
        named: set[int] = set()
        clauses = []
        for s, rel, o in order:
            if g.random() < 0.5:
                s, rel, o = o, _INVERSE[rel], s
            subj, obj = self._mention(s, named), self._mention(o, named)
            clauses.append(_relation_phrase(rel, g).format(subj, obj))
        text = ", and ".join(clauses)
        prefix = ("", "", "there is ", "an image of ")[g.integers(4)]
        return prefix + text

    def _mention(self, i: int, named: set[int]) -> str:
        article = "the" if i in named else "a"
        named.add(i)
        return f"{article} {self.objects[i].phrase}"

    # ------------------------------------------------------------- rendering
    def layout(self, size: int = 64, rng: RngLike = None) -> list[tuple[float, float, float]]:
        """Object centres and radii ``(x, y, r)`` in pixels, one per object.

        Every relation holds in the sense of :func:`relation_holds`: "A left of
        B" puts A's right edge left of B's left edge, with the vertical offset
        at most 0.35 of the horizontal one; objects never overlap.
        """
        g = _rng(rng)
        margin = max(1.0, size / 64)
        gap = max(1.5, size * 0.03)
        radii = [size * _RADIUS[o.size] * g.uniform(0.94, 1.06) for o in self.objects]
        for _ in range(200):
            pos: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}
            while len(pos) < len(self.objects):
                for s, rel, o in self.relations:
                    if (s in pos) == (o in pos):
                        continue
                    # place the new end of the edge relative to the placed one
                    new, old, sign = (s, o, -1.0) if o in pos else (o, s, 1.0)
                    d = radii[s] + radii[o] + gap + g.uniform(0.0, 0.3 * size)
                    off = g.uniform(-0.3, 0.3) * d
                    ox, oy = pos[old]
                    if rel in _HORIZONTAL:
                        dx = d if rel == "left of" else -d  # object minus subject
                        pos[new] = (ox + sign * dx, oy + off)
                    else:
                        dy = d if rel == "above" else -d
                        pos[new] = (ox + off, oy + sign * dy)
            xs = [pos[i][0] for i in range(len(radii))]
            ys = [pos[i][1] for i in range(len(radii))]
            lo_x = min(x - r for x, r in zip(xs, radii))
            hi_x = max(x + r for x, r in zip(xs, radii))
            lo_y = min(y - r for y, r in zip(ys, radii))
            hi_y = max(y + r for y, r in zip(ys, radii))
            room_x = size - 2 * margin - (hi_x - lo_x)
            room_y = size - 2 * margin - (hi_y - lo_y)
            if room_x < 0 or room_y < 0:
                continue
            tx = margin - lo_x + g.uniform(0, room_x)
            ty = margin - lo_y + g.uniform(0, room_y)
            out = [(x + tx, y + ty, r) for x, y, r in zip(xs, ys, radii)]
            if all(
                math.hypot(a[0] - b[0], a[1] - b[1]) >= a[2] + b[2] + gap
                for i, a in enumerate(out)
                for b in out[i + 1 :]
            ):
                return out
        raise ValueError(f"no room to lay out {self.key()!r} at {size}px")

    def render(self, size: int = 64, rng: RngLike = None, boxes: list[tuple[float, float, float]] | None = None) -> Image.Image:
        """Draw the scene as an RGB image of ``size`` x ``size`` pixels.

        The background is a solid colour, a gradient, or either with light
        noise, always muted so that no object colour disappears; object
        colours jitter slightly. Positions come from :meth:`layout` (drawn
        from ``rng`` first) unless ``boxes`` gives them.
        """
        g = _rng(rng)
        if boxes is None:
            boxes = self.layout(size, g)
        canvas = _background(size, g)
        big = size * _SUPERSAMPLE
        for obj, (x, y, r) in zip(self.objects, boxes):
            mask_im = Image.new("L", (big, big), 0)
            _draw_shape(ImageDraw.Draw(mask_im), obj.shape, x * _SUPERSAMPLE, y * _SUPERSAMPLE, r * _SUPERSAMPLE)
            mask = np.asarray(mask_im.reduce(_SUPERSAMPLE), dtype=np.float32)[..., None] / 255.0
            color = np.clip(np.array(COLORS[obj.color], np.float32) + g.uniform(-10, 10, 3), 0, 255)
            canvas = canvas * (1.0 - mask) + color * mask
        return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")


def relation_holds(subject: tuple[float, float, float], relation: str, obj: tuple[float, float, float]) -> bool:
    """Whether ``subject`` (x, y, r) stands in ``relation`` to ``obj`` (image coordinates, y down)."""
    (sx, sy, sr), (ox, oy, orad) = subject, obj
    if relation in _HORIZONTAL:
        d = (ox - sx) if relation == "left of" else (sx - ox)
        return d >= sr + orad and abs(oy - sy) <= 0.35 * d
    d = (oy - sy) if relation == "above" else (sy - oy)
    return d >= sr + orad and abs(ox - sx) <= 0.35 * d


def _relation_phrase(rel: str, g: np.random.Generator) -> str:
    choices = {
        "left of": ("{} left of {}", "{} to the left of {}", "{} on the left of {}"),
        "right of": ("{} right of {}", "{} to the right of {}", "{} on the right of {}"),
        "above": ("{} above {}",),
        "below": ("{} below {}", "{} under {}"),
    }[rel]
    return choices[g.integers(len(choices))]


def _background(size: int, g: np.random.Generator) -> np.ndarray:
    """A float32 (size, size, 3) background: solid or gradient, maybe with light noise."""
    base = _BACKGROUNDS[g.integers(len(_BACKGROUNDS))] + g.uniform(-8, 8, 3).astype(np.float32)
    kind = g.integers(4)
    if kind in (1, 3):
        other = _BACKGROUNDS[g.integers(len(_BACKGROUNDS))] + g.uniform(-8, 8, 3).astype(np.float32)
        angle = g.uniform(0, 2 * math.pi)
        ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        t = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None] + 0.5
        canvas = base + (other - base) * t[..., None]
    else:
        canvas = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind >= 2:
        canvas = canvas + g.normal(0.0, 6.0, (size, size, 1)).astype(np.float32)
    return canvas


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "square":
        h = r * 0.86
        draw.rectangle((x - h, y - h, x + h, y + h), fill=255)
    elif shape == "triangle":
        # equilateral, pointing up, centred on its bounding box rather than its centroid
        w = r * 1.0
        draw.polygon([(x, y - r), (x + w * 1.05, y + r * 0.8), (x - w * 1.05, y + r * 0.8)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r * 1.08 if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(a), y + 0.1 * r + rad * math.sin(a)))
        draw.polygon(pts, fill=255)
    elif shape == "cross":
        a, t = r * 0.98, r * 0.34
        draw.rectangle((x - a, y - t, x + a, y + t), fill=255)
        draw.rectangle((x - t, y - a, x + t, y + a), fill=255)
    else:  # pragma: no cover - Obj validates shapes
        raise ValueError(f"unknown shape {shape!r}")


# ------------------------------------------------------------------ perturbations
def _swap(scene: Scene, field: str) -> Scene | None:
    if len(scene.objects) < 2:
        return None
    s, _, o = scene.relations[0]
    objs = list(scene.objects)
    a, b = objs[s], objs[o]
    objs[s] = Obj(**{**a.__dict__, field: getattr(b, field)})
    objs[o] = Obj(**{**b.__dict__, field: getattr(a, field)})
    if len(set(objs)) != len(objs):
        return None
    new = Scene(tuple(objs), scene.relations)
    return None if new.key() == scene.key() else new


def swap_colors(scene: Scene) -> Scene | None:
    """The scene with the colours of the two objects of its first relation swapped.

    Returns None for one-object scenes and when the result has the same key
    (both objects share a colour) or would repeat an object.
    """
    return _swap(scene, "color")


def swap_shapes(scene: Scene) -> Scene | None:
    """The scene with the shapes of the two objects of its first relation swapped (None as in :func:`swap_colors`)."""
    return _swap(scene, "shape")


def reverse_relation(scene: Scene) -> Scene | None:
    """The scene with its first relation reversed ("left of" becomes "right of", "above" "below").

    Returns None for one-object scenes.
    """
    if len(scene.objects) < 2:
        return None
    (s, rel, o), *rest = scene.relations
    new = Scene(scene.objects, ((s, _INVERSE[rel], o), *rest))
    return None if new.key() == scene.key() else new


# ---------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class Sample:
    """One generated item: a scene, one caption of it and its rendering."""

    scene: Scene  # what is drawn
    caption: str  # one phrasing of the scene
    image: Image.Image  # RGB rendering
    boxes: list[tuple[float, float, float]]  # where each object was drawn: centre x, y and radius in pixels


def _minimal_group(g: np.random.Generator) -> list[Scene]:
    while True:
        base = Scene.random(g, n_objects=2)
        group = [s for s in (base, swap_colors(base), swap_shapes(base), reverse_relation(base)) if s is not None]
        if len({s.key() for s in group}) == 4:
            return group


def samples(n: int, seed: int, size: int = 64, minimal_pairs: bool = False) -> Iterator[Sample]:
    """Yield ``n`` samples drawn from ``seed``; item ``i`` depends only on ``(seed, i)``.

    With ``minimal_pairs`` items come in groups of four two-object scenes (items
    ``4k`` to ``4k+3``): a base scene, its colours swapped, its shapes swapped,
    its relation reversed, all with distinct keys; the group is drawn from
    ``(seed, k)`` and each member rendered from ``(seed, k, member)``.
    """
    if minimal_pairs:
        for i in range(n):
            k, member = divmod(i, 4)
            scene = _minimal_group(np.random.default_rng([seed, k]))[member]
            yield _sample(scene, np.random.default_rng([seed, k, member]), size)
        return
    for i in range(n):
        g = np.random.default_rng([seed, i])
        yield _sample(Scene.random(g), g, size)


def _sample(scene: Scene, g: np.random.Generator, size: int) -> Sample:
    caption = scene.caption(g)
    boxes = scene.layout(size, g)
    return Sample(scene, caption, scene.render(size, g, boxes), boxes)


def generate(
    out_dir: str | Path,
    n: int,
    seed: int,
    size: int = 64,
    minimal_pairs: bool = False,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Write ``n`` PNG images under ``out_dir/images/`` and ``out_dir/captions.jsonl``.

    Each line of ``captions.jsonl`` (and each returned record) is
    ``{"image": "images/000123.png", "caption": "...", "scene": "<canonical key>"}``.
    The same arguments give byte-identical output. ``progress``, when given, is
    called with 1 after each image is written.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, sample in enumerate(samples(n, seed, size, minimal_pairs)):
        name = f"images/{i:06d}.png"
        sample.image.save(out / name, format="PNG")
        records.append({"image": name, "caption": sample.caption, "scene": sample.scene.key()})
        if progress is not None:
            progress(1)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return records
