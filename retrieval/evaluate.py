"""``crossfind eval``: Recall@K of any model on a captioned image folder.

The folder holds images and ``captions.jsonl`` (``{"image", "caption",
"scene"?}`` per line, as ``scripts/make_shapes.py`` writes) or a Karpathy-style
COCO/Flickr30k JSON. Everything is indexed into a temporary library, so the
numbers are what the engine gives users: the same decoding, encoders, FAISS
index and reranker. Relevance is by ``scene`` key when present (equivalent
scenes count as the same), else by the image a caption belongs to.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import CorpusError

KS = (1, 5, 10)


@dataclass(frozen=True)
class Pair:
    image: Path  # absolute image path
    caption: str
    key: str  # relevance key: the scene key, else the image path


def read_pairs(folder: str | Path, annotations: str | Path | None = None) -> list[Pair]:
    """Image-caption pairs of an eval folder; see the module docstring."""
    folder = Path(folder).resolve()
    if annotations is None:
        path = folder / "captions.jsonl"
        if not path.is_file():
            raise CorpusError(f"{folder} has no captions.jsonl; pass --annotations for a Karpathy-style JSON")
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                img = (folder / rec["image"]).resolve()
                pairs.append(Pair(img, str(rec["caption"]), str(rec.get("scene") or img)))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorpusError(f"{path}: line {n}: expected {{'image', 'caption'}} ({exc})") from None
        return pairs
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    images = data.get("images", data) if isinstance(data, dict) else data
    splits = {im.get("split") for im in images}
    wanted = "test" if "test" in splits else None
    pairs = []
    for im in images:
        if wanted and im.get("split") != wanted:
            continue
        img = (folder / im.get("filepath", "") / im["filename"]).resolve()
        for sent in im.get("sentences", []):
            pairs.append(Pair(img, sent.get("raw") or " ".join(sent.get("tokens", [])), str(img)))
    if not pairs:
        raise CorpusError(f"{annotations}: no images with sentences found")
    return pairs


def hits_at_k(ranked_keys: Sequence[Sequence[Any]], query_keys: Sequence[Any], k: int) -> np.ndarray:
    """Per query, whether one of its first ``k`` ranked items has the query's key."""
    return np.array([q in list(r[:k]) for r, q in zip(ranked_keys, query_keys)], dtype=bool)


def recall_at_k(ranked_keys: Sequence[Sequence[Any]], query_keys: Sequence[Any], ks: Sequence[int] = KS) -> dict[int, float]:
    """Recall@K for each k: the fraction of queries with a relevant item in their top k.

    ``ranked_keys[i]`` is the relevance keys of query ``i``'s ranked items and
    ``query_keys[i]`` its own key. The one Recall@K of crossfind: ``crossfind
    eval`` and the training scripts count with it. (``bench_search.py``'s
    recall of an approximate index against exact search is another measure:
    the overlap of two neighbour sets.)
    """
    return {k: float(hits_at_k(ranked_keys, query_keys, k).mean()) if len(query_keys) else 0.0 for k in ks}


def _as_report(recall: dict[int, float]) -> dict[str, float]:
    return {f"R@{k}": round(v, 4) for k, v in recall.items()}


def evaluate(
    folder: str | Path,
    model: str = "shapes-tiny",
    annotations: str | Path | None = None,
    candidates: int = 50,
    rerank: bool = True,
    progress: bool = False,
    int8: bool = False,
) -> dict[str, Any]:
    """Text→image and image→text Recall@1/5/10, dual encoder and re-ranked
    (``int8``: the gallery indexed with the 8-bit image tower, as ``index --int8``).

    The folder is indexed into a temporary library of its own, so nothing
    else in a library can rank among the results. Returns ``{"t2i": {"R@1",
    "R@5", "R@10"}, "i2t": {...}, "queries": n, "images": m, "model": spec}``
    plus ``"t2i_reranked"``/``"i2t_reranked"`` when the model has a reranker
    and ``rerank`` is true.
    """
    from .engine import Engine

    pairs = read_pairs(folder, annotations)
    with tempfile.TemporaryDirectory(prefix="crossfind-eval-") as tmp:
        corpus = Path(tmp) / "captions.jsonl"
        with open(corpus, "w", encoding="utf-8") as fh:
            for i, p in enumerate(pairs):
                fh.write(json.dumps({"text": p.caption, "id": str(i)}) + "\n")
        with Engine.open(Path(tmp) / "library", model=model, db="sqlite") as eng:
            images = sorted({p.image for p in pairs})
            eng.index_folder([str(p) for p in images], progress=progress, int8=int8)
            eng.add_texts(corpus, corpus="eval", progress=progress)
            return _measure(eng, pairs, candidates, rerank)


Rescorer = Callable[[int, list[int], np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Direction:
    """One direction of an evaluation: every query of one kind against the other kind's index."""

    name: str  # "t2i" or "i2t"
    query_ids: list[int]  # library ids of the queries (texts or images)
    query_keys: list[str]  # their relevance keys
    queries: Any  # the VectorIndex holding the query vectors
    gallery: Any  # the VectorIndex searched
    item_key: dict[int, str]  # relevance key of each gallery id
    rescore: Rescorer | None  # (query id, candidate ids, dual scores) -> a logit per candidate


def _recall(d: Direction, n_cand: int, candidates: int) -> tuple[dict[str, float], dict[str, float] | None]:
    """Recall of one direction: the dual encoder's ranking and, with a
    rescorer, its top ``candidates`` re-ranked."""
    res = d.gallery.search(d.queries.reconstruct(d.query_ids), n_cand)
    ranked: list[list[int]] = []
    reranked: list[list[int]] = []
    for qid, ids_row, score_row in zip(d.query_ids, res.ids, res.scores):
        keep = ids_row >= 0
        ids = [int(i) for i in ids_row[keep]]
        ranked.append(ids)
        if d.rescore is not None:
            cand = ids[:candidates]
            logits = d.rescore(qid, cand, np.asarray(score_row[keep][: len(cand)], np.float32))
            reranked.append([cand[j] for j in np.argsort(-logits, kind="stable")])

    def keys(lists: list[list[int]]) -> list[list[str]]:
        return [[d.item_key.get(i, "") for i in r] for r in lists]

    dual = _as_report(recall_at_k(keys(ranked), d.query_keys))
    return dual, (_as_report(recall_at_k(keys(reranked), d.query_keys)) if d.rescore is not None else None)


def _measure(eng: Any, pairs: list[Pair], candidates: int, rerank: bool) -> dict[str, Any]:
    state = eng.state()
    store = eng.store
    img_rows = store.images_by_id(store.image_ids("ok"))
    key_of_path: dict[str, str] = {}
    for p in pairs:
        key_of_path.setdefault(str(p.image), p.key)
    img_key = {i: key_of_path[r.path] for i, r in img_rows.items() if r.path in key_of_path}
    texts = {int(r.ext_id): r for r in store.corpus_rows("eval")}
    text_key = {texts[i].id: pairs[i].key for i in texts}
    text_of = {texts[i].id: texts[i].text for i in texts}
    t_ids = [texts[i].id for i in sorted(texts)]  # text -> image: every caption is a query
    i_ids = sorted(img_key)  # image -> text: every image is a query

    reranker = state.reranker if rerank else None
    t2i_rescore: Rescorer | None = None
    i2t_rescore: Rescorer | None = None
    if reranker is not None:

        def t2i_rescore(tid: int, cand: list[int], dual: np.ndarray) -> np.ndarray:
            return reranker.logits_images(text_of[tid], eng.image_tokens(cand), dual_scores=dual)

        def i2t_rescore(iid: int, cand: list[int], dual: np.ndarray) -> np.ndarray:
            return reranker.logits_texts(eng.image_tokens([iid])[0], [text_of[i] for i in cand], dual_scores=dual)

    report: dict[str, Any] = {"queries": len(t_ids), "images": len(i_ids), "model": state.spec.spec}
    for d in (
        Direction("t2i", t_ids, [text_key[i] for i in t_ids], state.texts, state.images, img_key, t2i_rescore),
        Direction("i2t", i_ids, [img_key[i] for i in i_ids], state.images, state.texts, text_key, i2t_rescore),
    ):
        report[d.name], reranked = _recall(d, max(10, candidates), candidates)
        if reranked is not None:
            report[f"{d.name}_reranked"] = reranked
    if rerank and reranker is None:
        report["note"] = f"model {state.spec.spec} has no reranker; only dual-encoder recall is reported"
    return {k: report[k] for k in ("t2i", "i2t", "queries", "images", "model", "note", "t2i_reranked", "i2t_reranked")
            if k in report}
