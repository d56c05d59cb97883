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
from typing import Any

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


def recall_at(ranked_keys: list[list[str]], query_keys: list[str], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Fraction of queries with a relevant item in the top k, for each k."""
    out = {}
    for k in ks:
        hit = [q in r[:k] for r, q in zip(ranked_keys, query_keys)]
        out[f"R@{k}"] = round(float(np.mean(hit)) if hit else 0.0, 4)
    return out


def evaluate(
    folder: str | Path,
    model: str = "shapes-tiny",
    annotations: str | Path | None = None,
    candidates: int = 50,
    rerank: bool = True,
    progress: bool = False,
    library: str | Path | None = None,
) -> dict[str, Any]:
    """Text→image and image→text Recall@1/5/10, dual encoder and re-ranked.

    Returns ``{"t2i": {"R@1", "R@5", "R@10"}, "i2t": {...}, "queries": n,
    "images": m, "model": spec}`` plus ``"t2i_reranked"``/``"i2t_reranked"``
    when the model has a reranker and ``rerank`` is true.
    """
    from .engine import Engine

    pairs = read_pairs(folder, annotations)
    with tempfile.TemporaryDirectory(prefix="crossfind-eval-") as tmp:
        lib = Path(library) if library is not None else Path(tmp) / "library"
        corpus = Path(tmp) / "captions.jsonl"
        with open(corpus, "w", encoding="utf-8") as fh:
            for i, p in enumerate(pairs):
                fh.write(json.dumps({"text": p.caption, "id": str(i)}) + "\n")
        with Engine.open(lib, model=model) as eng:
            images = sorted({p.image for p in pairs})
            eng.index_folder([str(p) for p in images], progress=progress)
            eng.add_texts(corpus, corpus="eval", progress=progress)
            return _measure(eng, pairs, candidates, rerank)


def _measure(eng: Any, pairs: list[Pair], candidates: int, rerank: bool) -> dict[str, Any]:
    from .store import Image, TextItem

    state = eng.state()
    store = eng.store
    img_rows = {r.path: r for r in store.session.query(Image).filter(Image.status == "ok")}
    key_of_path: dict[str, str] = {}
    for p in pairs:
        key_of_path.setdefault(str(p.image), p.key)
    img_key = {r.id: key_of_path[path] for path, r in img_rows.items() if path in key_of_path}
    texts = {int(r.ext_id): r for r in store.session.query(TextItem).filter(TextItem.corpus == "eval")}
    text_key = {texts[i].id: pairs[i].key for i in texts}
    text_of = {texts[i].id: texts[i].text for i in texts}

    n_cand = max(10, candidates)
    # text -> image: every caption is a query
    t_ids = [texts[i].id for i in sorted(texts)]
    t_vecs = state.texts.reconstruct(t_ids)
    res = state.images.search(t_vecs, n_cand)
    t2i_ranked = [[int(i) for i in row if i >= 0] for row in res.ids]
    t2i_scores = [[float(s) for i, s in zip(row, srow) if i >= 0] for row, srow in zip(res.ids, res.scores)]
    t_keys = [text_key[i] for i in t_ids]
    report: dict[str, Any] = {
        "t2i": recall_at([[img_key.get(i, "") for i in r] for r in t2i_ranked], t_keys),
    }
    # image -> text: every image is a query
    i_ids = sorted(img_key)
    i_vecs = state.images.reconstruct(i_ids)
    res = state.texts.search(i_vecs, n_cand)
    i2t_ranked = [[int(i) for i in row if i >= 0] for row in res.ids]
    i2t_scores = [[float(s) for i, s in zip(row, srow) if i >= 0] for row, srow in zip(res.ids, res.scores)]
    i_keys = [img_key[i] for i in i_ids]
    report["i2t"] = recall_at([[text_key.get(i, "") for i in r] for r in i2t_ranked], i_keys)
    report["queries"] = len(t_ids)
    report["images"] = len(i_ids)
    report["model"] = state.spec.spec

    reranker = state.reranker if rerank else None
    if rerank and reranker is None:
        report["note"] = f"model {state.spec.spec} has no reranker; only dual-encoder recall is reported"
    if reranker is not None:
        rows = store.images_by_id(list(img_key))
        reordered = []
        for tid, cand, dual in zip(t_ids, t2i_ranked, t2i_scores):
            cand = cand[:candidates]
            logits = reranker.logits_images(
                text_of[tid], eng._candidate_tokens(state, cand, rows), dual_scores=np.asarray(dual[: len(cand)], np.float32)
            )
            reordered.append([cand[j] for j in np.argsort(-logits, kind="stable")])
        report["t2i_reranked"] = recall_at([[img_key.get(i, "") for i in r] for r in reordered], t_keys)
        reordered = []
        for iid, cand, dual in zip(i_ids, i2t_ranked, i2t_scores):
            cand = cand[:candidates]
            tok = eng._candidate_tokens(state, [iid], rows)[0]
            logits = reranker.logits_texts(tok, [text_of[i] for i in cand], dual_scores=np.asarray(dual[: len(cand)], np.float32))
            reordered.append([cand[j] for j in np.argsort(-logits, kind="stable")])
        report["i2t_reranked"] = recall_at([[text_key.get(i, "") for i in r] for r in reordered], i_keys)
    return report
