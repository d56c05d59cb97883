"""Typed values crossfind returns and takes: hits, queries, reports."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

from .errors import QueryError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

ImageInput = Union[str, "Image.Image"]  # a path or an already opened image
TARGETS = ("images", "texts")
#: Most hits (and candidates) one search may ask for, in the CLI and the server alike.
MAX_K = 10000


@dataclass(frozen=True)
class Hit:
    """One ranked search result."""

    rank: int  # 1-based position in the final order
    kind: str  # "image" or "text"
    id: int  # SQLite primary key of the image or text
    path: str | None  # absolute path of an image
    text: str | None  # the text of a text item
    score: float  # dual-encoder cosine similarity with the query
    rerank_score: float | None = None  # reranker match probability, when re-ranked
    corpus: str | None = None  # corpus of a text item

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "kind": self.kind,
            "id": self.id,
            "path": self.path,
            "text": self.text,
            "score": round(self.score, 6),
            "rerank_score": None if self.rerank_score is None else round(self.rerank_score, 6),
        }


@dataclass(frozen=True)
class Term:
    """A weighted query term: a text or an image path, summed in embedding space."""

    weight: float  # negative to subtract
    text: str | None = None  # a text term
    image: str | None = None  # path of an image term

    def to_json(self) -> dict[str, Any]:
        return {"weight": self.weight, "text": self.text, "image": self.image}


@dataclass(frozen=True)
class SearchQuery:
    """Everything a search takes. ``text`` and/or ``image`` form the main query."""

    text: str | None = None  # main text query
    image: ImageInput | None = None  # main image query: a path or a PIL image
    target: str = "images"  # what to return: "images" or "texts"
    terms: tuple[Term, ...] = ()  # extra weighted terms (--add / --subtract)
    k: int = 10  # hits wanted
    candidates: int = 50  # FAISS candidates handed to the reranker
    rerank: bool = True  # re-score candidates with the cross-attention reranker
    threshold: float | None = None  # keep hits whose match probability is at least this
    path_glob: str | None = None  # images: only paths matching this glob
    corpus: str | None = None  # texts: only this corpus
    since: dt.datetime | None = None  # images: taken at or after (EXIF date, else mtime)
    until: dt.datetime | None = None  # images: taken before or at
    dedup: bool = False  # fold near-duplicate hits into the best-ranked one (the model's duplicate threshold)
    reranker: str | None = None  # reranker spec for this search (local-dir:PATH, hf-hub:ORG/NAME); None: the library's choice

    def to_request(self, model: str | None = None) -> dict[str, Any]:
        """This query as the JSON body of ``POST /api/search`` (see :meth:`from_request`).

        Image paths (the main image, image terms) are sent as absolute paths;
        a server accepts them only from its own library's unix socket.
        """
        if self.image is not None and not isinstance(self.image, str):
            raise QueryError("only an image path can be sent in a search request")
        terms = []
        for t in self.terms:
            terms.append({"weight": t.weight, "text": t.text} if t.text is not None else {"weight": t.weight, "image": t.image})
        return {
            "q": self.text, "image": self.image, "target": self.target, "terms": terms, "k": self.k,
            "candidates": self.candidates, "rerank": self.rerank, "threshold": self.threshold,
            "path": self.path_glob, "corpus": self.corpus,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "dedup": self.dedup,
            "model": model,
            **({"reranker": self.reranker} if self.reranker is not None else {}),
        }

    @classmethod
    def from_request(
        cls,
        req: Mapping[str, Any],
        image_path: Callable[[int], str],
        allow_paths: bool = False,
        image: ImageInput | None = None,
    ) -> SearchQuery:
        """A query from a request's fields (``GET /api/search`` parameters as
        strings, or a ``POST`` JSON body); bad values raise :class:`QueryError`.

        ``image_path`` turns an ``image_id`` into the library image's path
        (raising :class:`QueryError` for an unknown id); ``image`` is an
        uploaded image. Paths in the request are refused unless ``allow_paths``.
        """
        known = {"q", "image", "image_id", "target", "terms", "k", "candidates", "rerank", "threshold",
                 "path", "corpus", "since", "until", "dedup", "model", "library_default", "reranker"}
        extra = sorted(set(req) - known)
        if extra:
            raise QueryError(f"unknown search field(s): {', '.join(extra)}; known: {', '.join(sorted(known))}")
        main: ImageInput | None = image
        if req.get("image") is not None:
            if not allow_paths:
                raise QueryError("image paths are accepted only on the library's unix socket; send image_id or upload the image")
            main = _text(req, "image")
        if req.get("image_id") is not None:
            main = image_path(_int(req, "image_id", 1, 2**62))
        terms = []
        raw_terms = req.get("terms") or []
        if not isinstance(raw_terms, list):
            raise QueryError("terms must be a list of {weight, text | image_id}")
        for t in raw_terms:
            if not isinstance(t, Mapping):
                raise QueryError("each term is an object {weight, text | image_id}")
            weight = _float(t, "weight", -100.0, 100.0) if t.get("weight") is not None else 1.0
            if t.get("text") is not None:
                terms.append(Term(weight, text=_text(t, "text")))
            elif t.get("image_id") is not None:
                terms.append(Term(weight, image=image_path(_int(t, "image_id", 1, 2**62))))
            elif t.get("image") is not None and allow_paths:
                terms.append(Term(weight, image=_text(t, "image")))
            else:
                raise QueryError("each term needs a text or an image_id")
        text = _text(req, "q") if req.get("q") not in (None, "") else None
        if text is None and main is None and not terms:
            raise QueryError("a search needs q (a text), image_id, an uploaded image, or terms")
        reranker = _text(req, "reranker") if req.get("reranker") not in (None, "") else None
        if reranker is not None and not allow_paths:
            raise QueryError("a reranker spec is accepted only on the library's unix socket; "
                             "choose the library's reranker with `crossfind set-reranker`")
        target = _text(req, "target") if req.get("target") is not None else "images"
        if target not in TARGETS:
            raise QueryError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
        return cls(
            text=text, image=main, target=target, terms=tuple(terms),
            k=_int(req, "k", 1, MAX_K) if req.get("k") is not None else 10,
            candidates=_int(req, "candidates", 1, MAX_K) if req.get("candidates") is not None else 50,
            rerank=_bool(req, "rerank") if req.get("rerank") is not None else True,
            threshold=_float(req, "threshold", 0.0, 1.0) if req.get("threshold") not in (None, "") else None,
            path_glob=_text(req, "path") if req.get("path") not in (None, "") else None,
            corpus=_text(req, "corpus") if req.get("corpus") not in (None, "") else None,
            since=_date(req, "since", end=False), until=_date(req, "until", end=True),
            dedup=_bool(req, "dedup") if req.get("dedup") is not None else False,
            reranker=reranker,
        )

    def filters_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.path_glob:
            out["path"] = self.path_glob
        if self.corpus:
            out["corpus"] = self.corpus
        if self.since:
            out["since"] = self.since.isoformat()
        if self.until:
            out["until"] = self.until.isoformat()
        if self.dedup:
            out["dedup"] = True
        return out


@dataclass(frozen=True)
class SearchResult:
    """The hits of one search and how they were found."""

    query_id: int | None  # id of the stored query (crossfind show ID); None when history could not be written
    query: dict[str, Any]  # {"text", "image", "target"} as in the JSON contract
    model: str  # model spec used
    reranked: bool  # whether the reranker ordered the hits
    hits: list[Hit]
    seconds: float  # total time of the search
    timings: dict[str, float] = field(default_factory=dict)  # encode / index / rerank seconds
    notes: tuple[str, ...] = ()  # things worth telling the user once (no reranker...)

    def to_json(self) -> dict[str, Any]:
        """The ``search --json`` object (also the body of ``/api/search``)."""
        return {
            "query": self.query,
            "model": self.model,
            "reranked": self.reranked,
            "hits": [h.to_json() for h in self.hits],
        }


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded search, as ``crossfind history`` lists it (its hits: ``show``)."""

    id: int  # query id (crossfind show ID)
    when: dt.datetime  # when the search ran (UTC)
    text: str | None  # main text query
    image: str | None  # main image query's path
    target: str  # "images" or "texts"
    model: str  # model spec used
    k: int  # hits asked for
    terms: list[dict[str, Any]] | None  # extra weighted terms, as Term.to_json()
    filters: dict[str, Any] | None  # filters, as SearchQuery.filters_json()
    reranked: bool  # whether the reranker ordered the hits
    seconds: float  # total time of the search

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "when": self.when.isoformat(timespec="seconds"),
            "text": self.text,
            "image": self.image,
            "target": self.target,
            "model": self.model,
            "k": self.k,
            "terms": self.terms,
            "filters": self.filters,
            "reranked": self.reranked,
            "seconds": round(self.seconds, 4),
        }
def _text(req: Mapping[str, Any], key: str) -> str:
    v = req.get(key)
    if not isinstance(v, str):
        raise QueryError(f"{key} must be a string")
    return v


def _int(req: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = req.get(key)
    try:
        if isinstance(v, bool) or isinstance(v, float):
            raise ValueError
        n = int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise QueryError(f"{key} must be a whole number, got {v!r}") from None
    if not lo <= n <= hi:
        raise QueryError(f"{key} must be between {lo} and {hi}, got {n}")
    return n


def _float(req: Mapping[str, Any], key: str, lo: float, hi: float) -> float:
    v = req.get(key)
    try:
        if isinstance(v, bool):
            raise ValueError
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise QueryError(f"{key} must be a number, got {v!r}") from None
    if not lo <= x <= hi:  # also refuses NaN
        raise QueryError(f"{key} must be between {lo:g} and {hi:g}, got {x:g}")
    return x


def _bool(req: Mapping[str, Any], key: str) -> bool:
    v = req.get(key)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "false", "0", "no"):
        return v.lower() in ("true", "1", "yes")
    raise QueryError(f"{key} must be true or false, got {v!r}")


def _date(req: Mapping[str, Any], key: str, end: bool) -> dt.datetime | None:
    """An ISO date or date-time; a bare date as ``until`` means the end of that day (as in the CLI)."""
    v = req.get(key)
    if v in (None, ""):
        return None
    try:
        d = dt.datetime.fromisoformat(_text(req, key))
    except ValueError:
        raise QueryError(f"{key} must be a date like 2024-06-01 or 2024-06-01T12:00:00, got {v!r}") from None
    if d.tzinfo is not None:
        d = d.astimezone(dt.timezone.utc).replace(tzinfo=None)
    if end and len(str(v)) == 10:
        d = d + dt.timedelta(days=1) - dt.timedelta(microseconds=1)
    return d


@dataclass
class _Counts:
    """Counts shared by ``index`` and ``add-texts`` runs (the --json contract)."""

    scanned: int = 0  # image files found, or records read from a corpus file
    added: int = 0  # new items (duplicate images included)
    updated: int = 0  # changed or renamed items
    unchanged: int = 0  # items seen before, unchanged
    removed: int = 0  # items gone (files deleted; texts dropped with replace=True)
    failed: int = 0  # files that could not be decoded, or malformed records
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class IndexReport(_Counts):
    """Counts of one ``index`` run."""

    encoded: int = 0  # images run through the encoder in this run
    kept: int = 0  # indexed before, still on disk, not selected now (hidden or excluded): kept
    kept_paths: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files failed in this run
    issues: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) skipped: unreadable, broken link...


@dataclass
class TextsReport(_Counts):
    """Counts of one ``add-texts`` run."""

    errors: list[str] = field(default_factory=list)  # "line N: reason"
