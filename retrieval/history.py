"""The search history: every search is kept with its results (``history``, ``show``)."""

from __future__ import annotations

from .errors import QueryError, write_failure
from .store import Query, Result, Store
from .types import HistoryEntry, Hit, SearchResult


class History:
    """Record searches and read them back as typed results."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, query: Query, results: list[Result], notes: list[str]) -> int | None:
        """Keep a search and its results; returns the query id. On a read-only
        or full library the search still answers: None, and a note saying it
        was not recorded. History needs no writer lock: SQLite's WAL lets it
        commit while a writer runs."""
        if self.store.read_only:
            notes.append("the library is read-only: this search was not added to the history")
            return None
        try:
            return self.store.add_query(query, results)
        except Exception as exc:
            reason = write_failure(exc)
            if reason is None:
                from sqlalchemy.exc import OperationalError

                if not isinstance(exc, OperationalError):
                    raise
                reason = str(exc.orig).splitlines()[0]
            self.store.rollback()
            notes.append(f"this search was not added to the history: {reason}")
            return None

    def recent(self, limit: int = 20) -> list[HistoryEntry]:
        """The most recent searches, newest first."""
        return [
            HistoryEntry(q.id, q.created_at, q.text, q.image_path, q.target, q.model, q.k, q.terms, q.filters,
                         q.reranked, q.seconds)
            for q in self.store.queries(limit)
        ]

    def show(self, query_id: int) -> SearchResult:
        """A stored search's results, as they were found (nothing recomputed)."""
        found = self.store.query(query_id) if 0 < query_id < 2**63 else None
        if found is None:
            raise QueryError(f"no stored search with id {query_id}; see `crossfind history`")
        q, rows = found
        hits = [Hit(r.rank, r.kind, r.item_id, r.path, r.text, r.score, r.rerank_score) for r in rows]
        qjson = {"text": q.text, "image": q.image_path, "target": q.target}
        return SearchResult(q.id, qjson, q.model, q.reranked, hits, q.seconds)
