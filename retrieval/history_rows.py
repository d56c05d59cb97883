"""The store's search history: each query with its options, the query's
vectors and reranker tokens (so asking again needs no encoder), and its
ranked results."""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from .schema import Query, Result


class HistoryRows:
    """The history methods of :class:`~retrieval.store.Store`."""

    session: Session

    def add_query(self, query: Query, results: Sequence[Result]) -> int:
        self.session.add(query)
        self.session.flush()
        for r in results:
            r.query_id = query.id
        self.session.add_all(results)
        self.session.commit()
        return query.id

    def text_vector(self, model: str, text: str) -> bytes | None:
        """The stored embedding of a text asked before with this model, if any."""
        return self._last_kept(Query.text_vector, model, text)

    def text_tokens(self, model: str, text: str) -> bytes | None:
        """The stored reranker tokens of a text asked before with this model, if any."""
        return self._last_kept(Query.text_tokens, model, text)

    def _last_kept(self, column: Any, model: str, text: str) -> bytes | None:
        q = (
            select(column)
            .where(Query.model == model, Query.text == text, column.is_not(None))
            .order_by(Query.id.desc())
            .limit(1)
        )
        return self.session.scalar(q)

    def queries(self, limit: int = 20) -> list[Query]:
        return list(self.session.scalars(select(Query).order_by(Query.id.desc()).limit(limit)))

    def query(self, query_id: int) -> tuple[Query, list[Result]] | None:
        q = self.session.get(Query, query_id)
        if q is None:
            return None
        rows = list(self.session.scalars(select(Result).where(Result.query_id == query_id).order_by(Result.rank)))
        return q, rows
