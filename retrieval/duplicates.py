"""Near-duplicate images: resized copies, re-encodes, small crops, burst shots.

:func:`find_duplicates` groups the images of a library whose embeddings lie
within a cosine-similarity threshold of each other. Candidate pairs come from
FAISS range search over the model's own index (the library's vectors queried in
batches, so memory follows the number of matches, never ``n**2``). Candidate
pairs are then checked on the pixels (coarse colour thumbnails of the two files
must correlate), so images a model embeds alike without looking alike (the same
subject in another picture, black frames) stay apart. Byte-identical files
(same content hash) are joined too and marked exact. Pairs are joined into
connected components, and each component is then split around its keeper so
that **every member of a reported group is within the threshold of the group's
keeper** (and passes the pixel check with it): a chain A~B~C of gradually
changing images (a slow pan, a burst drifting across a scene) never joins A and
C unless they are alike themselves.

The keeper follows :data:`KEEP_RULE`. crossfind reports; it never deletes a file.

:func:`fold_duplicates` is the search side: it folds near-duplicate hits into the
best-ranked one (``SearchQuery(dedup=True)``, ``crossfind search --dedup``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .encoders import ModelSpec
from .errors import LibraryError, QueryError
from .store import Image, Store

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine
    from .index import VectorIndex

LOG = logging.getLogger(__name__)

#: Cosine similarity for models without a measured default of their own
#: (clip-retrieval folds results at 0.94 with CLIP ViT models). Measure your
#: model's with ``scripts/bench_duplicates.py --folder``.
DEFAULT_THRESHOLD = 0.94
#: A model folder may hold this file, ``{"threshold": T, ...}``: its measured default.
MODEL_FILE = "duplicates.json"
#: Library vectors per range-search batch (bounds the memory of one batch's matches).
QUERY_BATCH = 2048
#: Inverted lists probed per image in an IVF index (libraries of 50k images and
#: more). A near-duplicate sits in its original's list or a neighbouring one: in a
#: 100k-vector library with 1,000 planted pairs at cosine 0.97, 2 lists found
#: 99.3 % of them in 29 s (4 lists: 100 % in 80 s; search itself probes 32).
DUPLICATES_NPROBE = 2
#: At most this many matches per image are kept (its most similar ones): a pile
#: of images a model embeds as one point (blank frames) costs n*this, not n**2.
MAX_NEIGHBOURS = 256
#: Groups larger than this get a note: near-uniform images (black or blank frames) embed alike.
LARGE_GROUP = 50
#: Candidate pairs are checked on the pixels: the correlation of the two images'
#: colour thumbnails (:data:`THUMB_SIDE` squared pixels, each channel centred)
#: must reach this. Measured with scripts/bench_duplicates.py (docs/benchmarks.md).
PIXEL_THRESHOLD = 0.76
#: Side of the thumbnails compared by the pixel check: coarse enough that
#: resizing, re-encoding, 10 % crops and small rotations keep them alike.
THUMB_SIDE = 8
#: How the image to keep is chosen in each group.
KEEP_RULE = "most pixels (width x height), then the largest file, then the oldest (EXIF date, else file time), then the lowest id"


def default_threshold(spec: ModelSpec) -> float:
    """The duplicate threshold of a model: the one measured and stored with it
    (``duplicates.json`` in a bundled or ``local-dir:`` model's folder), else
    :data:`DEFAULT_THRESHOLD`."""
    if spec.local_dir is not None:
        path = spec.local_dir / MODEL_FILE
        if path.is_file():
            try:
                value = float(json.loads(path.read_text())["threshold"])
            except (ValueError, KeyError, TypeError) as exc:
                LOG.warning("ignoring %s: %s", path, exc)
            else:
                if 0.0 < value <= 1.0:
                    return value
    return DEFAULT_THRESHOLD


@dataclass(frozen=True)
class DuplicateItem:
    """One image of a duplicate group."""

    id: int  # SQLite primary key of the image
    path: str  # absolute path
    score: float  # cosine similarity with the group's keeper (1.0 for the keeper and exact copies)
    width: int | None  # pixels, None when never decoded
    height: int | None
    bytes: int  # file size
    date: dt.datetime | None  # EXIF date, else file modification time
    exact: bool  # byte-identical to the keeper (same content hash); True for the keeper itself

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "score": round(self.score, 6),
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
            "date": self.date.isoformat(timespec="seconds") if self.date is not None else None,
            "exact": self.exact,
        }


@dataclass(frozen=True)
class DuplicateGroup:
    """Images alike within the threshold; the keeper first, then by similarity."""

    keep: int  # id of the image to keep (see KEEP_RULE)
    items: tuple[DuplicateItem, ...]  # the keeper first

    @property
    def exact(self) -> bool:
        """Every member is a byte-identical copy of the keeper."""
        return all(i.exact for i in self.items)

    def to_json(self) -> dict[str, Any]:
        return {"keep": self.keep, "exact": self.exact, "items": [i.to_json() for i in self.items]}


@dataclass(frozen=True)
class DuplicateReport:
    """The duplicate groups of a library for one model and threshold."""

    model: str  # model spec whose vectors were compared
    threshold: float  # cosine similarity at or above which two images are duplicates
    groups: tuple[DuplicateGroup, ...]  # largest first
    images: int  # images compared (with a vector, after the path filter)
    seconds: float
    rule: str = KEEP_RULE  # how each group's keeper was chosen
    notes: tuple[str, ...] = ()  # things worth telling the user

    def to_json(self) -> dict[str, Any]:
        """The ``crossfind duplicates --json`` object."""
        return {
            "model": self.model,
            "threshold": self.threshold,
            "rule": self.rule,
            "images": self.images,
            "groups": [g.to_json() for g in self.groups],
        }


def thumbnail(path: str) -> np.ndarray | None:
    """An image's pixel signature for the pixel check: its :data:`THUMB_SIDE`-pixel
    colour thumbnail, each channel centred, as one unit vector; None when the
    file cannot be read or the image is near-uniform (a black or blank frame has
    nothing to compare, so it is never a near-duplicate, only an exact copy)."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    try:
        with PILImage.open(path) as f:
            f.draft("RGB", (THUMB_SIDE * 8, THUMB_SIDE * 8))  # JPEG: decode at 1/2..1/8 scale
            small = ImageOps.exif_transpose(f).convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), PILImage.Resampling.BOX)
            x = np.asarray(small, np.float32).reshape(-1, 3)
    except (OSError, ValueError, PILImage.DecompressionBombError):
        return None
    x = (x - x.mean(axis=0)).ravel()
    norm = float(np.linalg.norm(x))
    if norm < 2.0 * np.sqrt(x.size):  # under ~2 grey levels of spread: near-uniform
        return np.zeros_like(x)
    return x / norm


def _thumbnails(paths: dict[int, str], workers: int = 4) -> dict[int, np.ndarray | None]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(thumbnail, paths.values())))


def glob_pattern(path_glob: str) -> str:
    """A SQLite GLOB over absolute paths: absolute globs as given, others match anywhere below the root."""
    return path_glob if path_glob.startswith("/") else "*/" + path_glob.lstrip("./")


class _Components:
    """Union-find over ``0..n-1`` in numpy (path halving)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = int(p[x])
        return x

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _keep_key(row: Image) -> tuple[Any, ...]:
    """Sort key: the image to keep sorts first (KEEP_RULE)."""
    pixels = (row.width or 0) * (row.height or 0)
    when = row.taken_at or dt.datetime.fromtimestamp(row.mtime_ns / 1e9)
    return (-pixels, -row.size, when, row.id)


def _range_pairs(index: VectorIndex, ids: np.ndarray, vecs: np.ndarray, threshold: float, allowed: np.ndarray | None,
                 batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, score) with a < b for the pairs of library vectors within ``threshold``
    (range search in batches; each vector's :data:`MAX_NEIGHBOURS` best matches)."""
    parts_a, parts_b, parts_s = [], [], []
    for start in range(0, len(ids), batch):
        res = index.range_search(vecs[start : start + batch], threshold, allowed=allowed, nprobe=DUPLICATES_NPROBE)
        counts = np.diff(res.lims)
        q = np.repeat(ids[start : start + batch], counts)
        other = res.ids != q
        for row in np.nonzero(counts > MAX_NEIGHBOURS + 1)[0].tolist():
            lo, hi = int(res.lims[row]), int(res.lims[row + 1])
            other[lo + np.argsort(-res.scores[lo:hi], kind="stable")[MAX_NEIGHBOURS + 1 :]] = False
        a, b = np.minimum(q[other], res.ids[other]), np.maximum(q[other], res.ids[other])
        parts_a.append(a)
        parts_b.append(b)
        parts_s.append(res.scores[other])
    if not parts_a:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    a, b, s = np.concatenate(parts_a), np.concatenate(parts_b), np.concatenate(parts_s)
    # Each pair is found from both ends (from one only when an IVF probe misses): keep one.
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return a[first], b[first], s[first]


def _pixel_check(store: Store, a: np.ndarray, b: np.ndarray, notes: list[str]
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray | None]]:
    """The candidate pairs (``a[j]``, ``b[j]``) that are the same file or look
    alike on the pixels, and the thumbnails read; a note when some could not be read."""
    rows_ab = store.images_by_id(np.unique(np.concatenate([a, b])).tolist())
    same_file = np.array([rows_ab[x].content_hash == rows_ab[y].content_hash if x in rows_ab and y in rows_ab else False
                          for x, y in zip(a.tolist(), b.tolist())], dtype=bool)
    thumbs = _thumbnails({i: r.path for i, r in rows_ab.items()})
    passed = same_file | np.array([_looks_alike(thumbs.get(x), thumbs.get(y)) for x, y in zip(a.tolist(), b.tolist())], dtype=bool)
    unread = sum(v is None for v in thumbs.values())
    if unread:
        notes.append(f"{unread} image(s) could not be read for the pixel check; their pairs rest on the embeddings alone")
    return a[passed], b[passed], thumbs


def _identical_pairs(store: Store, pattern: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Byte-identical files (same content hash, whatever their vectors) as
    pairs: each copy with the first image of its content."""
    first_of: dict[str, int] = {}
    ea, eb = [], []
    for i, h in store.identical_images(pattern):
        if h in first_of:
            ea.append(first_of[h])
            eb.append(i)
        else:
            first_of[h] = i
    return np.asarray(ea, np.int64), np.asarray(eb, np.int64)


def _groups(store: Store, a: np.ndarray, b: np.ndarray, ids: np.ndarray, vecs: np.ndarray, t: float,
            thumbs: dict[int, np.ndarray | None] | None) -> list[DuplicateGroup]:
    """The groups of the connected pairs, each split around keepers so that
    every member is within ``t`` of its group's keeper."""
    groups: list[DuplicateGroup] = []
    if not len(a):
        return groups
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    comp = _Components(len(nodes))
    comp.union(inverse[: len(a)], inverse[len(a) :])
    labels = comp.labels()
    rows = store.images_by_id(nodes.tolist())
    pos = {int(i): k for k, i in enumerate(ids.tolist())}  # id -> row of vecs
    by_label: dict[int, list[int]] = {}
    for node, label in zip(nodes.tolist(), labels.tolist()):
        if node in rows:
            by_label.setdefault(label, []).append(node)
    for members in by_label.values():
        groups.extend(_split(sorted(members, key=lambda i: _keep_key(rows[i])), rows, vecs, pos, t, thumbs))
    return groups


def find_duplicates(
    engine: Engine,
    threshold: float | None = None,
    path: str | None = None,
    model: str | None = None,
    batch: int = QUERY_BATCH,
    verify: bool = True,
) -> DuplicateReport:
    """Group the library's near-duplicate and byte-identical images.

    ``threshold`` is a cosine similarity (default: the model's measured one,
    :func:`default_threshold`); ``path`` a glob restricting the images compared
    (``'*/2024/*'``, or an absolute glob); ``model`` a model spec (default: the
    engine's). Every member of a group is within the threshold of the group's
    keeper (see the module docstring); byte-identical copies are grouped even
    without a vector and marked ``exact``. With ``verify`` (the default) each
    candidate pair is also checked on the pixels (:func:`thumbnail`, only the
    files in candidate pairs are read): images a model embeds alike but that
    do not look alike (same subject, other photo; blank frames) stay apart.
    A file that cannot be read is judged by its embedding alone.
    """
    t0 = time.perf_counter()
    state = engine.state(model)
    spec = state.spec.spec
    t = default_threshold(state.spec) if threshold is None else float(threshold)
    if not 0.0 < t <= 1.0:
        raise QueryError(f"threshold is a cosine similarity in (0, 1], got {t}")
    store = engine.store
    row = store.find_model(spec)
    if row is None:
        raise LibraryError(f"nothing is indexed with model {spec!r} in {engine.library_dir}; run `crossfind index PATH` with it first")
    pattern = glob_pattern(path) if path else None

    index = state.images
    ids, vecs = index.vectors()
    allowed: np.ndarray | None = None
    if pattern is not None:
        allowed = store.filtered_image_ids(row.id, pattern)
        keep = np.isin(ids, allowed)
        ids, vecs = ids[keep], vecs[keep]
    order = np.argsort(ids, kind="stable")
    ids, vecs = ids[order], vecs[order]
    a, b, _ = _range_pairs(index, ids, vecs, t, allowed, batch)
    notes: list[str] = []
    thumbs: dict[int, np.ndarray | None] = {}
    if verify and len(a):
        a, b, thumbs = _pixel_check(store, a, b, notes)
    ea, eb = _identical_pairs(store, pattern)
    a = np.concatenate([a, ea])
    b = np.concatenate([b, eb])
    groups = _groups(store, a, b, ids, vecs, t, thumbs if verify else None)
    groups.sort(key=lambda g: (-len(g.items), g.keep))
    large = sum(len(g.items) > LARGE_GROUP for g in groups)
    if large:
        notes.append(
            f"{large} group(s) hold more than {LARGE_GROUP} images: near-uniform images (black or blank frames) "
            "embed alike; look at them, or raise --threshold"
        )
    return DuplicateReport(spec, t, tuple(groups), len(ids), time.perf_counter() - t0, KEEP_RULE, tuple(notes))


def _looks_alike(x: np.ndarray | None, y: np.ndarray | None) -> bool:
    """The pixel check of one pair; True when either file could not be read."""
    if x is None or y is None:
        return True
    return float(x @ y) >= PIXEL_THRESHOLD


def _split(members: list[int], rows: dict[int, Image], vecs: np.ndarray, pos: dict[int, int], t: float,
           thumbs: dict[int, np.ndarray | None] | None) -> list[DuplicateGroup]:
    """Split one connected component into groups around keepers.

    ``members`` come in keep order. The first remaining member is a keeper; every
    remaining member within ``t`` of it (or byte-identical to it) joins its group;
    repeat on the rest. A keeper nobody is close to stays out (it was only a link
    in a chain).
    """
    out = []
    rest = members
    while len(rest) >= 2:
        centre = rest[0]
        crow = rows[centre]
        sims = np.full(len(rest), -np.inf, np.float32)
        has = np.array([i in pos for i in rest])
        if centre in pos and has.any():
            sims[has] = vecs[[pos[i] for i in np.asarray(rest)[has].tolist()]] @ vecs[pos[centre]]
        exact = np.array([rows[i].content_hash == crow.content_hash for i in rest])
        sims[exact] = 1.0
        if thumbs is not None:
            unlike = np.array([not _looks_alike(thumbs.get(centre), thumbs.get(i)) for i in rest])
            sims[unlike & ~exact] = -np.inf
        take = (sims >= t) | exact
        if take.sum() >= 2:
            items = [
                DuplicateItem(i, rows[i].path, float(min(s, 1.0)) if not x else 1.0, rows[i].width, rows[i].height,
                              rows[i].size, rows[i].taken_at, bool(x))
                for i, s, x in zip(rest, sims.tolist(), exact.tolist()) if s >= t or x
            ]
            head, tail = items[0], sorted(items[1:], key=lambda it: (-it.score, it.id))
            out.append(DuplicateGroup(centre, (head, *tail)))
        take[0] = True
        rest = [i for i, k in zip(rest, take.tolist()) if not k]
    return out


def fold_duplicates(index: VectorIndex, ids: Sequence[int], threshold: float) -> list[int]:
    """``ids`` (ranked) without the near-duplicates of a better-ranked id.

    Each id is compared by its own stored vector with the ids kept before it
    and dropped when one is within ``threshold`` (clip-retrieval's result
    deduplication). Order is kept.
    """
    ids = list(ids)
    if len(ids) < 2:
        return ids
    vecs = index.reconstruct(ids)
    kept: list[int] = []
    for row, i in enumerate(ids):
        if kept and float(np.max(vecs[kept] @ vecs[row])) >= threshold:
            continue
        kept.append(row)
    return [ids[r] for r in kept]
