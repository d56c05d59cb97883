"""The search pipeline: check → encode → candidates → rerank → finish → record.

:class:`Searcher` runs one :class:`~retrieval.types.SearchQuery` in stages a
reader can follow by name:

1. :meth:`Searcher.check` refuses queries that would be silently wrong;
2. :class:`~retrieval.queries.QueryEncoder` turns the query into one vector;
3. :meth:`Searcher.candidates` asks FAISS for the best ids under the filters,
   without the query image itself;
4. :meth:`Searcher.rerank` re-scores those candidates with the model's
   reranker (the one place a reranker is called), its image memory cached
   per image (:mod:`retrieval.rerank_memory`);
5. the threshold, near-duplicate folding and ``k`` cut make the hits;
6. :class:`~retrieval.history.History` records the search.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .duplicates import default_threshold, fold_duplicates
from .errors import LibraryError, QueryError
from .history import History
from .imageio import ImageLoadError, load_image
from .paths import is_utf8, normalize_path
from .queries import QueryEncoder, image_label
from .rerank_memory import ImageMemory
from .rerank_select import Rerankers, chosen
from .scan import file_hash
from .slot import ModelSlot
from .store import Image, Query, Result, Store, utcnow
from .types import TARGETS, Hit, SearchQuery, SearchResult

LOG = logging.getLogger(__name__)

#: Largest |weight| of an --add/--subtract term (larger ones overflow float32 sums).
MAX_TERM_WEIGHT = 1000.0
#: With ``SearchQuery(dedup=True)``, at least this many candidates per hit wanted are fetched to fold.
DEDUP_CANDIDATES = 4


def path_pattern(glob: str) -> str:
    """The SQLite GLOB for ``--path``: absolute globs as given (normalised), others
    match at any depth (``'2024/*'`` is ``'*/2024/*'``); a leading ``./`` is
    dropped, never a leading dot of a name (``'.hidden/*'``)."""
    if glob.startswith("/"):
        return glob
    while glob.startswith("./"):
        glob = glob[2:]
    return glob if glob.startswith("*") else "*/" + glob


@dataclass
class Candidates:
    """What the index found for a query, best first by the dual encoder."""

    ids: list[int]  # library ids, the query image left out, each with a row below
    dual: dict[int, float]  # dual-encoder score by id
    rows: dict[int, Any]  # Image rows (target images) or TextItem rows (target texts) by id
    index: Any  # the VectorIndex searched (near-duplicate folding reads its vectors)


@dataclass(frozen=True)
class Rescored:
    """A reranker's verdict on a list of candidates, in their order."""

    logits: np.ndarray  # float32 per candidate; the order of the hits
    probabilities: np.ndarray  # match probability per candidate (shown, and what --threshold reads)
    query_tokens: np.ndarray | None = None  # a text query's reranker tokens, kept in the history


def _file_tokens(enc: Any, ids: Sequence[int], rows: dict[int, Any], layer: str) -> tuple[list[int], np.ndarray | None]:
    """Patch tokens at ``layer`` of the files of images ``ids``, read again and
    encoded by ``enc``: the ids that loaded and their tokens (None when none
    did); a file that no longer loads is logged and left out."""
    ok: list[int] = []
    pix = []
    for i in ids:
        try:
            pix.append(enc.prepare(load_image(rows[i].path, min_size=enc.image_size).image))
            ok.append(i)
        except ImageLoadError as exc:
            LOG.warning("cannot re-read %s for re-ranking: %s", rows[i].path, exc.reason)
    if not ok:
        return ok, None
    _, toks = enc.encode_images(enc.batch(pix), with_tokens=True, token_layer=layer)
    assert toks is not None
    return ok, toks


class Searcher:
    """Run searches against the current model of a library and record them.

    ``slot()`` returns the :class:`~retrieval.slot.ModelSlot` of the model in
    use (the engine's default or the one it was opened with).
    """

    def __init__(self, store: Store, slot: Callable[[], ModelSlot], library_dir: Path) -> None:
        self.store = store
        self._slot = slot
        self.library_dir = library_dir
        self.queries = QueryEncoder(store, slot)
        self.history = History(store)
        self.rerankers = Rerankers(store, library_dir)
        self.memory = ImageMemory(library_dir, lambda: store.read_only)  # the own reranker's, cached per image
        #: Free each ONNX session as soon as a search is done with it: lower peak
        #: memory for a process that searches once (the CLI), slower for one that searches on.
        self.lean = False

    def search(self, query: SearchQuery) -> SearchResult:
        """Run one search and record it in the history; see :class:`SearchQuery`."""
        t0 = time.perf_counter()
        self.check(query)
        state = self._slot()
        model = self.store.find_model(state.spec.spec)
        if model is None:
            why = " since its weights changed" if state.weights_changed else ""
            raise LibraryError(
                f"nothing is indexed with model {state.spec.spec!r} in {self.library_dir}{why}; "
                "run `crossfind index PATH` (or add-texts) with it first"
            )
        notes: list[str] = []
        timings: dict[str, float] = {}
        vec = self.queries.vector(query)
        timings["encode"] = time.perf_counter() - t0
        if self.lean and state.onnx_loaded is not None and not (query.rerank and state.reranker is not None):
            state.onnx_loaded.release()  # before the index is read: the two never share the peak

        t1 = time.perf_counter()
        reranker = self._reranker(query, state, notes)
        n_cand = max(query.k, query.candidates) if reranker is not None else query.k
        n_cand = max(n_cand, DEDUP_CANDIDATES * query.k) if query.dedup else n_cand  # folded hits leave room
        cands = self.candidates(query, vec, n_cand, model.id)
        timings["index"] = time.perf_counter() - t1

        rescored: Rescored | None = None
        ids = list(cands.ids)
        if reranker is not None and ids:
            t2 = time.perf_counter()
            rescored = self.rerank(query, cands, reranker)
            # Order by the raw logit: probabilities of a sharp reranker round to 1.0 and would tie.
            by_logit = dict(zip(ids, rescored.logits.tolist()))
            ids.sort(key=lambda i: (-by_logit[i], -cands.dual[i]))
            timings["rerank"] = time.perf_counter() - t2
        probability = dict(zip(cands.ids, rescored.probabilities.tolist())) if rescored is not None else {}
        if query.threshold is not None:
            if reranker is not None:
                ids = [i for i in ids if probability[i] >= query.threshold]
            else:
                notes.append("--threshold needs a reranker's match probability; it was not applied")
        if query.dedup:
            ids = fold_duplicates(cands.index, ids, default_threshold(state.spec))
        hits = self._hits(query, cands, ids[: query.k], probability)
        seconds = time.perf_counter() - t0
        qid = self.record(query, state, hits, reranker is not None, seconds, rescored, notes)
        qjson = {"text": query.text, "image": image_label(query.image), "target": query.target}
        return SearchResult(qid, qjson, state.spec.spec, reranker is not None, hits, seconds, timings, tuple(notes))

    # ---------------------------------------------------------------- check
    def check(self, query: SearchQuery) -> None:
        """Refuse what would be silently wrong: an unknown target, bad k,
        threshold or weights, text that is not UTF-8, filters that do not apply
        to the target, an unknown corpus."""
        if query.target not in TARGETS:
            raise QueryError(f"unknown target {query.target!r}; choose one of: {', '.join(TARGETS)}")
        if query.k <= 0:
            raise QueryError("k must be at least 1")
        if query.threshold is not None and not 0.0 <= query.threshold <= 1.0:
            raise QueryError("threshold is a probability between 0 and 1")
        for t in query.terms:
            if not math.isfinite(t.weight) or abs(t.weight) > MAX_TERM_WEIGHT:
                raise QueryError(f"term weight {t.weight!r} must be a finite number between "
                                 f"-{MAX_TERM_WEIGHT:g} and {MAX_TERM_WEIGHT:g}")
        for text in [query.text] + [t.text for t in query.terms]:
            if text is not None and not is_utf8(text):
                raise QueryError("the query text is not valid UTF-8; check the terminal's encoding")
            if text is not None and "\x00" in text:
                raise QueryError("the query text contains a NUL character")
            if text is not None and not text.strip():
                raise QueryError("the query text is empty")
        if query.target == "texts" and (query.path_glob or query.since or query.until):
            raise QueryError("--path, --since and --until filter images; they do not apply to --target texts")
        if query.target == "images" and query.corpus is not None:
            raise QueryError("--corpus filters texts; use it with --target texts")
        if query.corpus is not None and query.corpus not in self.store.corpora():
            raise QueryError(f"no corpus named {query.corpus!r}; corpora: {', '.join(self.store.corpora()) or 'none'}")

    # ----------------------------------------------------------- candidates
    def candidates(self, query: SearchQuery, vector: np.ndarray, n: int, model_id: int) -> Candidates:
        """The best ``n`` ids for ``vector`` in the target's index, under the
        query's filters and without the query image itself."""
        index = self._slot().search_index(query.target)
        allowed = self._allowed(query, model_id)
        exclude = self._query_image_ids(query)
        res = index.search(vector, n + len(exclude), allowed=allowed)
        ids = [int(i) for i in res.ids[0] if i >= 0 and int(i) not in exclude][:n]
        dual = {int(i): float(s) for i, s in zip(res.ids[0], res.scores[0]) if i >= 0}
        rows: dict[int, Any] = self.store.images_by_id(ids) if query.target == "images" else self.store.texts_by_id(ids)
        return Candidates([i for i in ids if i in rows], dual, rows, index)

    def _allowed(self, query: SearchQuery, model_id: int) -> np.ndarray | None:
        """Ids passing the filters (None: no filter), restricted to vectors of this model."""
        if query.target == "images":
            if query.path_glob is None and query.since is None and query.until is None:
                return None
            glob = path_pattern(query.path_glob) if query.path_glob is not None else None
            return self.store.filtered_image_ids(model_id, glob, query.since, query.until)
        if query.corpus is None:
            return None
        return self.store.corpus_text_ids(model_id, query.corpus)

    def _query_image_ids(self, query: SearchQuery) -> set[int]:
        """Library ids of the query image itself (same path or same bytes)."""
        if query.target != "images" or query.image is None or not isinstance(query.image, (str, os.PathLike)):
            return set()
        path = normalize_path(query.image, "query image path")
        out = set()
        row = self.store.image_by_path(path)
        if row is not None:
            out.add(row.id)
        try:
            h = file_hash(path)
        except OSError:
            return out
        for rows in self.store.images_by_hash([h]).values():
            out.update(r.id for r in rows)
        return out

    # --------------------------------------------------------------- rerank
    def _reranker(self, query: SearchQuery, state: ModelSlot, notes: list[str]) -> Any:
        """The reranker this search uses, or None: a reranker re-scores a text
        query against images or an image query against texts."""
        text_mode = query.text is not None and query.image is None
        image_mode = query.image is not None and query.text is None
        if not query.rerank or not ((query.target == "images" and text_mode) or (query.target == "texts" and image_mode)):
            return None
        spec = query.reranker or chosen(self.store, state.spec.spec)
        if spec is not None:
            from .rerank_files import reranker_dir
            from .reranker_spec import parse_reranker_spec

            rs = parse_reranker_spec(spec)
            own = reranker_dir(state.spec)
            if rs.kind != "crossfind" or own is None or rs.path != own.resolve():
                return self.rerankers.get(rs.spec, lambda: state.encoder)
        if state.reranker is None:
            notes.append(f"model {state.spec.spec} has no reranker; results are ranked by the dual encoder alone")
        return state.reranker

    def rerank(self, query: SearchQuery, cands: Candidates, reranker: Any = None) -> Rescored:
        """Re-score ``cands.ids`` for ``query`` with ``reranker`` (default: the
        current model's own), a text query against candidate images or an image
        query against texts. A BLIP reranker's logits are the fused order
        (:func:`retrieval.rerank_blip.fuse`), its probabilities calibrated ITM."""
        state = self._slot()
        reranker = reranker if reranker is not None else state.reranker
        dual = np.array([cands.dual[i] for i in cands.ids], np.float32)
        if getattr(reranker, "kind", None) == "blip":
            return self._rerank_blip(query, cands, reranker, dual)
        if reranker is not state.reranker:
            return self._rerank_other(query, cands, reranker, dual)
        query_tokens = None
        if query.target == "images":
            assert query.text is not None
            memory = self.memory.memory(state, reranker, cands.ids, cands.rows,
                                        lambda ids: self.candidate_tokens(state, ids, cands.rows))
            query_tokens = self.queries.text_tokens(query.text)
            logits = reranker.logits_memory(query_tokens, memory, dual_scores=dual)
        else:
            assert query.image is not None
            _, qtok = self.queries.image(query.image, with_tokens=True)
            logits = reranker.logits_texts(qtok, [cands.rows[i].text for i in cands.ids], dual_scores=dual)
        return Rescored(logits, reranker.probability(logits), query_tokens)

    def _rerank_blip(self, query: SearchQuery, cands: Candidates, reranker: Any, dual: np.ndarray) -> Rescored:
        if query.target == "images":
            assert query.text is not None
            feats, ok = self.rerankers.blip_image_features(reranker, cands.ids, cands.rows)
            margins = reranker.margins_images(query.text, feats)
        else:
            assert query.image is not None
            qfeat = self._blip_query_image(reranker, query.image)
            margins = reranker.margins_texts(qfeat, [cands.rows[i].text for i in cands.ids])
            ok = np.ones(len(margins), bool)
        keys = np.where(ok, reranker.order_keys(margins, dual), -np.inf).astype(np.float32)
        probs = np.where(ok, reranker.probability(margins), 0.0).astype(np.float32)
        return Rescored(keys, probs, None)

    def _blip_query_image(self, reranker: Any, image: Any) -> np.ndarray:
        """BLIP features of a query image: cached when it is a library image, else computed."""
        if isinstance(image, (str, os.PathLike)):
            row = self.store.image_by_path(normalize_path(image, "query image path"))
            if row is not None:
                feats, ok = self.rerankers.blip_image_features(reranker, [row.id], {row.id: row})
                if ok[0]:
                    return feats[0]
            try:
                pil = load_image(image, min_size=reranker.image_size).image
            except ImageLoadError as exc:
                raise QueryError(f"cannot read query image {image}: {exc.reason}") from None
        else:
            pil = image.convert("RGB")
        return reranker.image_features([pil])[0]

    def _rerank_other(self, query: SearchQuery, cands: Candidates, reranker: Any, dual: np.ndarray) -> Rescored:
        """A crossfind reranker other than the model's own: candidate tokens at its
        layer are read from the token store when that layer is stored, else encoded."""
        state = self._slot()
        layer = reranker.config.image_layer
        if query.target == "images":
            assert query.text is not None
            if state.reranker is not None and state.token_layer == layer:
                toks = self.candidate_tokens(state, cands.ids, cands.rows)
            else:
                toks = self._fresh_tokens(state, cands.ids, cands.rows, layer, reranker.config)
            logits = reranker.logits_images(query.text, toks, dual_scores=dual)
        else:
            assert query.image is not None
            enc = state.encoder
            img = load_image(query.image, min_size=enc.image_size).image if isinstance(query.image, (str, os.PathLike)) else query.image
            _, qtok = enc.encode_images(enc.image_batch([img]), with_tokens=True, token_layer=layer)
            assert qtok is not None
            logits = reranker.logits_texts(qtok[0], [cands.rows[i].text for i in cands.ids], dual_scores=dual)
        return Rescored(logits, reranker.probability(logits), None)

    @staticmethod
    def _fresh_tokens(state: ModelSlot, ids: Sequence[int], rows: dict[int, Any], layer: str, config: Any) -> np.ndarray:
        """Patch tokens at ``layer`` encoded from the files (not stored); zeros for a file that no longer loads."""
        out = np.zeros((len(ids), config.image_tokens, config.image_features), np.float16)
        ok, new = _file_tokens(state.encoder, ids, rows, layer)
        if new is not None:
            at = {i: j for j, i in enumerate(ids)}
            out[[at[i] for i in ok]] = new
        return out

    def candidate_tokens(self, state: ModelSlot, ids: Sequence[int], rows: dict[int, Image] | None = None) -> np.ndarray:
        """Patch tokens of images ``ids`` for ``state``'s reranker, stacked in
        their order: stored rows, else re-encoded from the files (and stored).
        ``rows`` are their Image rows when at hand (else they are looked up)."""
        # Rows whose checksum fails (a damaged or cut-off token file) count as missing.
        out, missing = state.read_tokens(ids)
        if missing:
            rows = rows if rows is not None else self.store.images_by_id(missing)
            ok, toks = _file_tokens(state.runtime("image"), missing, rows, state.token_layer)
            if toks is not None:
                for i, t in zip(ok, toks):
                    out[i] = t
                state.store_tokens(ok, toks)
            shape = next(iter(out.values())).shape if out else (1, 1)
            for i in missing:
                out.setdefault(i, np.zeros(shape, np.float16))
        return np.stack([out[i] for i in ids])

    # --------------------------------------------------------------- record
    @staticmethod
    def _hits(query: SearchQuery, cands: Candidates, ids: list[int], probability: dict[int, float]) -> list[Hit]:
        hits = []
        for rank, i in enumerate(ids, 1):
            row = cands.rows[i]
            if query.target == "images":
                hits.append(Hit(rank, "image", i, row.path, None, cands.dual[i], probability.get(i)))
            else:
                hits.append(Hit(rank, "text", i, None, row.text, cands.dual[i], probability.get(i), row.corpus))
        return hits

    def record(self, query: SearchQuery, state: ModelSlot, hits: list[Hit], reranked: bool, seconds: float,
               rescored: Rescored | None, notes: list[str]) -> int | None:
        """Keep the search in the history, with the text query's vector and
        reranker tokens so that asking it again needs no encoder; its id, or
        None when the library cannot record it (then a note says so)."""
        tokens = rescored.query_tokens if rescored is not None else None
        row = Query(
            model=state.spec.spec,
            text=query.text,
            image_path=image_label(query.image),
            target=query.target,
            terms=[t.to_json() for t in query.terms] or None,
            filters=query.filters_json() or None,
            k=query.k,
            candidates=query.candidates,
            reranked=reranked,
            seconds=seconds,
            created_at=utcnow(),
            text_vector=self.queries.text_vector(query.text).tobytes() if query.text is not None else None,
            text_tokens=tokens.tobytes() if tokens is not None else None,
        )
        results = [Result(rank=h.rank, kind=h.kind, item_id=h.id, path=h.path, text=h.text, score=h.score,
                          rerank_score=h.rerank_score) for h in hits]
        return self.history.record(row, results, notes)
