"""The store's per-model vector rows: which items have a vector of a model,
the content hash it was computed from, the float32 vector itself (kept
durably outside the FAISS file, see :mod:`retrieval.durability`), and for
images whether a patch-token row is stored and its CRC-32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from .schema import ImageVector, Model, TextVector, _blobs, _vector_table, chunks, table_of


class VectorRows:
    """The vector-row methods of :class:`~retrieval.store.Store`."""

    session: Session

    def image_vector_map(self, model_id: int) -> dict[int, str]:
        """image id -> content hash its vector was computed from, for one model."""
        q = select(ImageVector.image_id, ImageVector.content_hash).where(ImageVector.model_id == model_id)
        return {i: h for i, h in self.session.execute(q)}

    def token_ids(self, model_id: int, ids: Sequence[int]) -> set[int]:
        out: set[int] = set()
        for part in chunks(list(ids)):
            q = select(ImageVector.image_id).where(
                ImageVector.model_id == model_id, ImageVector.has_tokens.is_(True), ImageVector.image_id.in_(part)
            )
            out.update(self.session.scalars(q))
        return out

    def clear_tokens(self, model_id: int) -> None:
        """Mark every stored patch-token row of a model invalid (the token store started over)."""
        self.session.execute(
            update(ImageVector).where(ImageVector.model_id == model_id).values(has_tokens=False)
        )

    def set_image_vectors(
        self,
        model_id: int,
        rows: Sequence[tuple[int, str, bool]],
        vectors: np.ndarray | None = None,
        token_crcs: dict[int, int] | None = None,
    ) -> None:
        """Record (image id, content hash, has tokens) vector rows for a model,
        with each row's float32 vector (``vectors[j]`` for ``rows[j]``) and the
        CRC-32 of its patch-token row when it has one."""
        ids = [r[0] for r in rows]
        blobs = _blobs(vectors, len(rows))
        crcs = token_crcs or {}
        self.delete_image_vectors(model_id, ids)
        if rows:  # one executemany INSERT: ORM objects cost about ten times as much a row
            self.session.execute(insert(table_of(ImageVector)), [
                {"model_id": model_id, "image_id": i, "content_hash": h, "has_tokens": bool(t and i in crcs), "vector": b,
                 "token_crc": crcs.get(i) if t else None}
                for (i, h, t), b in zip(rows, blobs)
            ])

    def vectors(self, model_id: int, kind: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """A model's durable vectors of ``kind`` (``images``/``texts``): ids,
        an (n, dim) float32 matrix, and the ids of rows that have no vector."""
        table, item = _vector_table(kind)
        dim = self.session.scalar(select(Model.dim).where(Model.id == model_id)) or 0
        ids: list[int] = []
        blobs: list[bytes] = []
        empty: list[int] = []
        q = select(item, table.vector).where(table.model_id == model_id).order_by(item)
        for i, blob in self.session.execute(q):
            if blob is None or len(blob) != 4 * dim:
                empty.append(i)
            else:
                ids.append(i)
                blobs.append(blob)
        mat = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim) if ids else np.empty((0, dim), np.float32)
        return np.asarray(ids, np.int64), mat, empty

    def vector_ids(self, model_id: int, kind: str) -> np.ndarray:
        """Ascending ids of a model's rows of ``kind`` that keep a whole vector
        (the ids :meth:`vectors` returns, without reading the vectors)."""
        table, item = _vector_table(kind)
        dim = self.session.scalar(select(Model.dim).where(Model.id == model_id)) or 0
        q = select(item).where(table.model_id == model_id, func.length(table.vector) == 4 * dim).order_by(item)
        return np.fromiter(self.session.scalars(q), dtype=np.int64)

    def vectors_by_id(self, model_id: int, kind: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The float32 vectors of ``ids`` (rows that keep one), ``(len(ids), dim)`` in the order given."""
        table, item = _vector_table(kind)
        got: dict[int, bytes] = {}
        for part in chunks([int(i) for i in ids]):
            q = select(item, table.vector).where(table.model_id == model_id, item.in_(part))
            got.update({i: b for i, b in self.session.execute(q)})
        flat = np.frombuffer(b"".join(got[int(i)] for i in ids), dtype=np.float32)
        return flat.reshape(len(ids), -1) if len(ids) else flat.reshape(0, 0)

    def count_vectors(self, model_id: int, kind: str) -> int:
        table, _ = _vector_table(kind)
        return int(self.session.scalar(select(func.count()).select_from(table).where(table.model_id == model_id)) or 0)

    def vector_map(self, model_id: int, kind: str) -> dict[int, str]:
        """item id -> content hash its vector of ``kind`` was computed from, for one model."""
        table, item = _vector_table(kind)
        return {i: h for i, h in self.session.execute(select(item, table.content_hash).where(table.model_id == model_id))}

    def vectorless_ids(self, model_id: int, kind: str) -> list[int]:
        """Ids of a model's vector rows of ``kind`` that keep no vector (rows of an older library)."""
        table, item = _vector_table(kind)
        return list(self.session.scalars(select(item).where(table.model_id == model_id, table.vector.is_(None))))

    def delete_vectors(self, model_id: int, kind: str, ids: Sequence[int]) -> None:
        """Drop a model's vector rows of ``kind`` for ``ids``."""
        table, item = _vector_table(kind)
        for part in chunks(list(ids)):
            self.session.execute(delete(table).where(table.model_id == model_id, item.in_(part)))

    def tokens_without_crc(self, model_id: int) -> list[int]:
        """Image ids whose token row is marked stored but has no CRC-32 yet (an older library)."""
        q = select(ImageVector.image_id).where(
            ImageVector.model_id == model_id, ImageVector.has_tokens.is_(True), ImageVector.token_crc.is_(None)
        )
        return list(self.session.scalars(q))

    def fill_vectors(self, model_id: int, kind: str, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Store the vectors of existing rows (an older library's rows, filled from its index)."""
        table, item = _vector_table(kind)
        for i, blob in zip(ids, _blobs(vectors, len(ids))):
            self.session.execute(update(table).where(table.model_id == model_id, item == int(i)).values(vector=blob))

    def token_crcs(self, model_id: int, ids: Sequence[int]) -> dict[int, int | None]:
        """image id -> CRC-32 of its stored patch-token row, for rows marked as having tokens."""
        out: dict[int, int | None] = {}
        for part in chunks(list(ids)):
            q = select(ImageVector.image_id, ImageVector.token_crc).where(
                ImageVector.model_id == model_id, ImageVector.has_tokens.is_(True), ImageVector.image_id.in_(part)
            )
            out.update({i: c for i, c in self.session.execute(q)})
        return out

    def set_tokens(self, model_id: int, crcs: dict[int, int | None]) -> None:
        """Mark image rows as having a stored token row with that CRC-32 (None: none)."""
        for i, c in crcs.items():
            self.session.execute(
                update(ImageVector)
                .where(ImageVector.model_id == model_id, ImageVector.image_id == int(i))
                .values(has_tokens=c is not None, token_crc=c)
            )

    def delete_image_vectors(self, model_id: int, ids: Sequence[int]) -> None:
        for part in chunks(list(ids)):
            self.session.execute(
                delete(ImageVector).where(ImageVector.model_id == model_id, ImageVector.image_id.in_(part))
            )

    def text_vector_map(self, model_id: int) -> dict[int, str]:
        q = select(TextVector.text_id, TextVector.content_hash).where(TextVector.model_id == model_id)
        return {i: h for i, h in self.session.execute(q)}

    def set_text_vectors(self, model_id: int, rows: Sequence[tuple[int, str]], vectors: np.ndarray | None = None) -> None:
        """Record (text id, content hash) vector rows with their float32 vectors."""
        ids = [r[0] for r in rows]
        self.delete_text_vectors(model_id, ids)
        blobs = _blobs(vectors, len(rows))
        if rows:
            self.session.execute(insert(table_of(TextVector)), [
                {"model_id": model_id, "text_id": i, "content_hash": h, "vector": b} for (i, h), b in zip(rows, blobs)
            ])

    def delete_text_vectors(self, model_id: int, ids: Sequence[int]) -> None:
        for part in chunks(list(ids)):
            self.session.execute(delete(TextVector).where(TextVector.model_id == model_id, TextVector.text_id.in_(part)))
