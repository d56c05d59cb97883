"""Re-ranking on a captioned folder: the ablation of ``crossfind eval --reranker``
and the Platt fit of ``crossfind calibrate-reranker``.

The folder (as :func:`retrieval.evaluate.read_pairs` reads it) is indexed into
a temporary library with the dual encoder. Every caption is a text -> image
query and every image an image -> text query; the dual encoder's top
candidates of each are scored once by the reranker (any reranker spec: a BLIP
ITM model or a crossfind reranker folder). For each ``--candidates`` value k
the report gives, side by side, Recall@1/5/10 of

* ``dual``: the dual encoder alone;
* ``reranker``: its top k re-ordered by the reranker's score alone;
* ``fused``: its top k re-ordered by the fused score (calibrated log-odds plus
  the dual cosine, :func:`retrieval.rerank_blip.fuse`),

with the reranker's time per query for k candidates (image features in hand;
the vision tower's cost per image is reported once, ``feature_ms_per_image``).
Beyond k, candidates keep the dual order. The Platt calibration used for the
fused score is fitted on the same pairs (two parameters) and reported with the
calibration error (ECE) before and after.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .evaluate import KS, Pair, read_pairs, recall_at_k

__all__ = ["evaluate_reranker", "calibrate_on_folder", "eval_library", "expected_calibration_error"]


@contextmanager
def eval_library(pairs: Sequence[Pair], model: str, progress: bool = False) -> Iterator[Any]:
    """A temporary library holding the pairs' images and their captions (corpus
    ``eval``, each caption's ``ext_id`` its position in ``pairs``)."""
    from .engine import Engine

    with tempfile.TemporaryDirectory(prefix="crossfind-eval-") as tmp:
        corpus = Path(tmp) / "captions.jsonl"
        with open(corpus, "w", encoding="utf-8") as fh:
            for i, p in enumerate(pairs):
                fh.write(json.dumps({"text": p.caption, "id": str(i)}) + "\n")
        with Engine.open(Path(tmp) / "library", model=model) as eng:
            eng.index_folder([str(p) for p in sorted({p.image for p in pairs})], progress=progress)
            eng.add_texts(corpus, corpus="eval", progress=progress)
            yield eng


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE over equal-width probability bins: the mean |accuracy - confidence|, weighted by bin size."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    if not len(probs):
        return 0.0
    which = np.minimum((probs * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            err += sel.sum() * abs(labels[sel].mean() - probs[sel].mean())
    return float(err / len(probs))


@dataclass
class _Scores:
    """One direction's dual candidates and the reranker's margins for their first ``kmax``."""

    query_keys: list[str]
    ranked: list[list[int]]  # dual order of candidate ids per query
    dual: list[np.ndarray]  # their cosines
    margins: list[np.ndarray]  # reranker margins of the first kmax candidates
    seconds: dict[int, float]  # total reranker seconds for the first k candidates of every query
    dual_seconds: float


class _Scorer:
    """Uniform access to either kind of reranker: margins for text -> image
    and image -> text pairs, and their uncalibrated log-odds."""

    def __init__(self, eng: Any, spec: str | None, device: str | None) -> None:
        from .reranker_spec import parse_reranker_spec

        self.eng, self.state = eng, eng.state()
        self.feature_seconds = 0.0
        self.feature_images = 0
        self._tokens: dict[int, np.ndarray] = {}
        if spec is None:
            from .rerank_files import reranker_dir

            where = reranker_dir(self.state.spec)
            if where is None:
                from .errors import ModelNotAvailable

                raise ModelNotAvailable(f"model {self.state.spec.spec} has no reranker of its own; give one with --reranker SPEC")
            spec = f"local-dir:{where}"
        self.rs = parse_reranker_spec(spec)
        if self.rs.kind == "blip":
            from .rerank_blip import BlipReranker

            self.blip: Any = BlipReranker.load(self.rs, device=device)
            self.cache = self.blip.cache(eng.library_dir / "rerank-features")
            self.torch: Any = None
        else:
            from .rerank import Reranker

            assert self.rs.path is not None
            self.torch = Reranker.load(self.rs.path, self.state.encoder)
            self.blip = None

    def prepare_images(self, rows: dict[int, Any]) -> None:
        """Compute (and time) every image's features or tokens once, up front."""
        ids = sorted(rows)
        t = time.perf_counter()
        if self.blip is not None:
            from .rerank_blip import FeatureItem

            _, ok = self.blip.features([FeatureItem(i, rows[i].content_hash, rows[i].path) for i in ids], self.cache)
            self.ok = dict(zip(ids, ok.tolist()))
        else:
            from .imageio import load_image

            enc, layer = self.state.encoder, self.torch.config.image_layer
            for start in range(0, len(ids), 64):
                part = ids[start : start + 64]
                pix = enc.batch([enc.prepare(load_image(rows[i].path, min_size=enc.image_size).image) for i in part])
                _, toks = enc.encode_images(pix, with_tokens=True, token_layer=layer)
                assert toks is not None
                self._tokens.update(zip(part, toks))
        self.feature_seconds = time.perf_counter() - t
        self.feature_images = len(ids)
        self.rows = rows

    def _image(self, ids: list[int]) -> np.ndarray:
        if self.blip is not None:
            from .rerank_blip import FeatureItem

            feats, _ = self.blip.features([FeatureItem(i, self.rows[i].content_hash, self.rows[i].path) for i in ids], self.cache)
            return feats
        return np.stack([self._tokens[i] for i in ids])

    def t2i(self, text: str, ids: list[int], dual: np.ndarray) -> np.ndarray:
        if self.blip is not None:
            return self.blip.margins_images(text, self._image(ids))
        return self.torch.logits_images(text, self._image(ids), dual_scores=dual)

    def i2t(self, image_id: int, texts: list[str], dual: np.ndarray) -> np.ndarray:
        if self.blip is not None:
            return self.blip.margins_texts(self._image([image_id])[0], texts)
        return self.torch.logits_texts(self._image([image_id])[0], texts, dual_scores=dual)

    def log_odds(self, margins: np.ndarray) -> np.ndarray:
        """Uncalibrated log-odds (a crossfind reranker's own temperature and shift applied)."""
        if self.blip is not None:
            return np.asarray(margins, np.float32)
        cfg = self.torch.config
        return ((np.asarray(margins, np.float32) - cfg.shift) / cfg.temperature).astype(np.float32)


def _score_direction(
    query_ids: list[int], query_keys: list[str], query_vecs: np.ndarray, gallery: Any, n_cand: int,
    sweep: Sequence[int], score: Callable[[int, list[int], np.ndarray], np.ndarray],
) -> _Scores:
    t = time.perf_counter()
    res = gallery.search(query_vecs, n_cand)
    dual_seconds = time.perf_counter() - t
    kmax = max(sweep)
    bounds = sorted(set(sweep))
    out = _Scores(query_keys, [], [], [], {k: 0.0 for k in bounds}, dual_seconds)
    for qid, ids_row, score_row in zip(query_ids, res.ids, res.scores):
        keep = ids_row >= 0
        ids = [int(i) for i in ids_row[keep]]
        dual = np.asarray(score_row[keep], np.float32)
        out.ranked.append(ids)
        out.dual.append(dual)
        # Scored in chunks ending at each sweep value, so "the first k" is timed as a search with k candidates.
        parts, spent, lo = [], 0.0, 0
        for k in bounds:
            hi = min(k, len(ids), kmax)
            if hi > lo:
                t = time.perf_counter()
                parts.append(score(qid, ids[lo:hi], dual[lo:hi]))
                spent += time.perf_counter() - t
                lo = hi
            out.seconds[k] += spent
        out.margins.append(np.concatenate(parts) if parts else np.empty(0, np.float32))
    return out


def _rankings(s: _Scores, item_key: dict[int, str], k: int, log_odds: Callable[[np.ndarray], np.ndarray]) -> dict[str, dict[str, float]]:
    lists: dict[str, list[list[str]]] = {"dual": [], "reranker": [], "fused": []}
    for ids, dual, margins in zip(s.ranked, s.dual, s.margins):
        top = min(k, len(margins))
        z = log_odds(margins[:top])
        rest = ids[top:]
        alone = [ids[j] for j in np.argsort(-z, kind="stable")] + rest
        fused = [ids[j] for j in np.argsort(-(z + dual[:top]), kind="stable")] + rest
        for name, order in (("dual", ids), ("reranker", alone), ("fused", fused)):
            lists[name].append([item_key.get(i, "") for i in order])
    return {name: {f"R@{kk}": round(v, 4) for kk, v in recall_at_k(r, s.query_keys, KS).items()} for name, r in lists.items()}


def _labels(s: _Scores, item_key: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    m, y = [], []
    for ids, margins, q in zip(s.ranked, s.margins, s.query_keys):
        m.append(margins)
        y.append(np.array([item_key.get(i) == q for i in ids[: len(margins)]], bool))
    return (np.concatenate(m) if m else np.empty(0, np.float32)), (np.concatenate(y) if y else np.empty(0, bool))


def _score_folder(
    eng: Any, pairs: list[Pair], reranker: str | None, sweep: Sequence[int], device: str | None, directions: Sequence[str],
) -> tuple[_Scorer, dict[str, tuple[_Scores, dict[int, str]]]]:
    from .store import Image, TextItem

    state, store = eng.state(), eng.store
    scorer = _Scorer(eng, reranker, device)
    img_rows = {r.path: r for r in store.session.query(Image).filter(Image.status == "ok")}
    key_of_path: dict[str, str] = {}
    for p in pairs:
        key_of_path.setdefault(str(p.image), p.key)
    img_key = {r.id: key_of_path[path] for path, r in img_rows.items() if path in key_of_path}
    texts = {int(r.ext_id): r for r in store.session.query(TextItem).filter(TextItem.corpus == "eval")}
    text_key = {texts[i].id: pairs[i].key for i in texts}
    text_of = {texts[i].id: texts[i].text for i in texts}
    t_ids = [texts[i].id for i in sorted(texts)]
    i_ids = sorted(img_key)
    scorer.prepare_images({r.id: r for r in img_rows.values() if r.id in img_key})
    n_cand = max(10, max(sweep))
    out: dict[str, tuple[_Scores, dict[int, str]]] = {}
    if "t2i" in directions:
        out["t2i"] = (_score_direction(
            t_ids, [text_key[i] for i in t_ids], state.texts.reconstruct(t_ids), state.images, n_cand, sweep,
            lambda q, cand, dual: scorer.t2i(text_of[q], cand, dual)), img_key)
    if "i2t" in directions:
        out["i2t"] = (_score_direction(
            i_ids, [img_key[i] for i in i_ids], state.images.reconstruct(i_ids), state.texts, n_cand, sweep,
            lambda q, cand, dual: scorer.i2t(q, [text_of[i] for i in cand], dual)), text_key)
    return scorer, out


def _check_spec(spec: str | None) -> str | None:
    """Refuse a bad spec, or a BLIP one without transformers, before anything is indexed; its kind."""
    if spec is None:
        return None
    from .reranker_spec import parse_reranker_spec, require_transformers

    kind = parse_reranker_spec(spec).kind
    if kind == "blip":
        require_transformers()
    return kind


def evaluate_reranker(
    folder: str | Path, model: str = "shapes-tiny", reranker: str | None = None, candidates: Sequence[int] = (16, 32, 64, 128),
    annotations: str | Path | None = None, device: str | None = None, progress: bool = False,
) -> dict[str, Any]:
    """The dual encoder, the reranker alone and the fused score, per candidate count.

    ``reranker`` is a reranker spec (see :mod:`retrieval.reranker_spec`); None
    uses the model's own. Returns ``{"model", "reranker", "queries", "images",
    "feature_ms_per_image", "calibration": {"scale", "bias", "pairs",
    "ece_before", "ece_after"}, "sweep": [{"candidates": k, "t2i": {"dual":
    {"R@1", ...}, "reranker": {...}, "fused": {...}, "ms_per_query": x,
    "dual_ms_per_query": y}, "i2t": {...}}]}``.
    """
    from .rerank_blip import fit_platt

    sweep = sorted({int(k) for k in candidates})
    if not sweep or sweep[0] < 1:
        raise ValueError("candidates must be positive")
    _check_spec(reranker)
    pairs = read_pairs(folder, annotations)
    with eval_library(pairs, model, progress) as eng:
        scorer, scored = _score_folder(eng, pairs, reranker, sweep, device, ("t2i", "i2t"))
        margins, labels = zip(*(_labels(s, keys) for s, keys in scored.values()))
        m, y = scorer.log_odds(np.concatenate(margins)), np.concatenate(labels)
        cal = fit_platt(m, y) if y.any() and not y.all() else None
        log_odds = (lambda x: cal.log_odds(scorer.log_odds(x))) if cal is not None else scorer.log_odds
        rows = []
        for k in sweep:
            row: dict[str, Any] = {"candidates": k}
            for name, (s, keys) in scored.items():
                n = max(1, len(s.ranked))
                row[name] = {**_rankings(s, keys, k, log_odds), "ms_per_query": round(s.seconds[k] * 1e3 / n, 2),
                             "dual_ms_per_query": round(s.dual_seconds * 1e3 / n, 3)}
            rows.append(row)
        prob = (lambda z: 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64))))
        calibration: dict[str, Any] | None = None
        if cal is not None:
            calibration = {"scale": round(cal.scale, 4), "bias": round(cal.bias, 4), "pairs": cal.pairs,
                           "ece_before": round(expected_calibration_error(prob(m), y), 4),
                           "ece_after": round(expected_calibration_error(prob(cal.log_odds(m)), y), 4)}
        return {
            "model": eng.state().spec.spec,
            "reranker": scorer.rs.spec,
            "queries": len(scored["t2i"][0].ranked),
            "images": scorer.feature_images,
            "feature_ms_per_image": round(scorer.feature_seconds * 1e3 / max(1, scorer.feature_images), 2),
            "calibration": calibration,
            "sweep": rows,
        }


def calibrate_on_folder(
    folder: str | Path, model: str, reranker: str, candidates: int = 16, annotations: str | Path | None = None,
    device: str | None = None, progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Fit Platt scaling of ``reranker``'s margins on a captioned folder: every
    caption's top ``candidates`` images by the dual encoder and every image's
    top captions, labelled by whether they match. Returns the
    :class:`~retrieval.rerank_blip.Calibration` and a report (pairs, ECE before
    and after, the reranker's fingerprint)."""
    from .errors import CorpusError, ModelNotAvailable
    from .rerank_blip import fit_platt

    if _check_spec(reranker) != "blip":
        raise ModelNotAvailable(f"{reranker} is a crossfind reranker: those are calibrated when trained; "
                                "calibrate-reranker fits BLIP rerankers")
    pairs = read_pairs(folder, annotations)
    with eval_library(pairs, model, progress) as eng:
        scorer, scored = _score_folder(eng, pairs, reranker, [candidates], device, ("t2i", "i2t"))
        margins, labels = zip(*(_labels(s, keys) for s, keys in scored.values()))
        m, y = scorer.log_odds(np.concatenate(margins)), np.concatenate(labels)
        if not y.any() or y.all():
            raise CorpusError(f"{folder}: calibration needs matching and non-matching pairs among the top {candidates}")
        cal = fit_platt(m, y)
        prob = (lambda z: 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64))))
        report = {
            "reranker": scorer.rs.spec, "model": eng.state().spec.spec, "pairs": cal.pairs, "positives": cal.positives,
            "scale": round(cal.scale, 4), "bias": round(cal.bias, 4),
            "ece_before": round(expected_calibration_error(prob(m), y), 4),
            "ece_after": round(expected_calibration_error(prob(cal.log_odds(m)), y), 4),
            "fingerprint": scorer.blip.fingerprint if scorer.blip is not None else None,
        }
        return cal, report
