"""Typed values crossfind returns and takes: hits, queries, reports."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

ImageInput = Union[str, "Image.Image"]  # a path or an already opened image
TARGETS = ("images", "texts")


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
