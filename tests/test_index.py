"""The FAISS layer against exact numpy search on seeded synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest

import retrieval.index as vindex
from retrieval.index import VectorIndex


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, d: int, k: int = 64) -> np.ndarray:
    centres = unit(rng, k, d)
    x = centres[rng.integers(0, k, n)] + 0.35 * unit(rng, n, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact(db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-(q @ db.T), axis=1)[:, :k]
    return ids[order]


def test_flat_matches_numpy_and_uses_given_ids():
    rng = np.random.default_rng(0)
    db, q = unit(rng, 500, 32), unit(rng, 20, 32)
    ids = rng.choice(10_000, 500, replace=False).astype(np.int64)
    idx = VectorIndex(32)
    idx.add(ids, db)
    res = idx.search(q, 10)
    assert idx.kind == "flat"
    np.testing.assert_array_equal(res.ids, exact(db, ids, q, 10))
    np.testing.assert_allclose(res.scores[:, 0], np.max(q @ db.T, axis=1), rtol=1e-5)


def test_remove_replace_and_reconstruct():
    rng = np.random.default_rng(1)
    db = unit(rng, 100, 16)
    idx = VectorIndex(16)
    idx.add(np.arange(100), db)
    assert idx.remove([3, 5, 999]) == 2
    assert len(idx) == 98
    assert 3 not in set(idx.ids().tolist())
    res = idx.search(db[3], 5)
    assert 3 not in res.ids[0]
    new = unit(rng, 1, 16)
    idx.add([7], new)  # replacing keeps one vector per id
    assert len(idx) == 98
    np.testing.assert_allclose(idx.reconstruct([7])[0], new[0], rtol=1e-6)


def test_allowed_ids_restrict_and_still_return_k():
    rng = np.random.default_rng(2)
    db, q = unit(rng, 300, 16), unit(rng, 4, 16)
    idx = VectorIndex(16)
    idx.add(np.arange(300), db)
    allowed = np.arange(0, 300, 7)
    res = idx.search(q, 10, allowed=allowed)
    assert set(res.ids.ravel().tolist()) <= set(allowed.tolist())
    assert (res.ids >= 0).all() and res.ids.shape == (4, 10)
    np.testing.assert_array_equal(res.ids, exact(db[allowed], allowed, q, 10))


def test_ivf_past_threshold_has_high_recall(monkeypatch):
    monkeypatch.setattr(vindex, "IVF_THRESHOLD", 2_000)
    rng = np.random.default_rng(3)
    db = clustered(rng, 6_000, 32)
    q = clustered(rng, 50, 32)
    idx = VectorIndex(32)
    idx.add(np.arange(1_000), db[:1_000])
    assert idx.kind == "flat"
    idx.add(np.arange(1_000, 6_000), db[1_000:])
    assert idx.kind == "ivf" and len(idx) == 6_000
    res = idx.search(q, 10)
    truth = exact(db, np.arange(6_000), q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids.tolist(), truth.tolist())])
    assert recall >= 0.95

    # ids survive the rebuild; removal and narrow filters work on IVF too
    assert sorted(idx.ids().tolist()) == list(range(6_000))
    idx.remove([int(truth[0, 0])])
    assert int(truth[0, 0]) not in idx.search(q[:1], 10).ids[0]
    allowed = np.array([5, 17, 4000])
    res = idx.search(q[:1], 3, allowed=allowed)
    assert sorted(res.ids[0].tolist()) == [5, 17, 4000]


def test_ivf_reconstructs_sqlite_ids(monkeypatch):
    """SQLite ids start at 1 and have gaps after removals: an IVF index must
    still give back each id's vector (every checkpoint records vectors this way)."""
    monkeypatch.setattr(vindex, "IVF_THRESHOLD", 2_000)
    rng = np.random.default_rng(5)
    db = unit(rng, 3_000, 16)
    ids = np.arange(1, 3_001) * 3 + 7  # sparse, none is a row position
    idx = VectorIndex(16)
    idx.add(ids, db)
    assert idx.kind == "ivf"
    pick = [0, 1_234, 2_999]
    np.testing.assert_allclose(idx.reconstruct(ids[pick]), db[pick], atol=1e-6)
    idx.remove(ids[:10])
    more = unit(rng, 5, 16)
    idx.add(np.array([10**9 + i for i in range(5)]), more)  # added after the direct map was made
    np.testing.assert_allclose(idx.reconstruct([10**9 + 4, int(ids[2_999])]), np.stack([more[4], db[2_999]]), atol=1e-6)


def test_ivf_grows_its_lists_with_the_collection(monkeypatch):
    monkeypatch.setattr(vindex, "IVF_THRESHOLD", 3_000)
    rng = np.random.default_rng(5)
    db = clustered(rng, 9_000, 32)
    q = clustered(rng, 50, 32)
    idx = VectorIndex(32)
    idx.add(np.arange(3_000), db[:3_000])
    first = idx._ivf().nlist
    assert idx.kind == "ivf" and first == vindex.ivf_lists(3_000)
    for start in range(3_000, 9_000, 500):  # grown a batch at a time, as indexing does
        idx.add(np.arange(start, start + 500), db[start : start + 500])
    assert idx._ivf().nlist == vindex.ivf_lists(9_000) == 2 * first
    assert sorted(idx.ids().tolist()) == list(range(9_000))
    np.testing.assert_array_equal(idx.reconstruct([0, 4_321, 8_999]), db[[0, 4_321, 8_999]])
    truth = exact(db, np.arange(9_000), q, 10)
    res = idx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids.tolist(), truth.tolist())])
    assert recall >= 0.95


def test_save_is_atomic_and_loads_back(tmp_path):
    rng = np.random.default_rng(4)
    db = unit(rng, 50, 8)
    idx = VectorIndex(8)
    idx.add(np.arange(10, 60), db)
    path = tmp_path / "x" / "images.faiss"
    idx.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["images.faiss"]  # no temp files left
    back = VectorIndex.load(path, 8)
    np.testing.assert_array_equal(back.search(db[:3], 5).ids, idx.search(db[:3], 5).ids)
    with pytest.raises(ValueError):
        VectorIndex.load(path, 16)


def test_bad_dimension_is_refused():
    with pytest.raises(ValueError):
        VectorIndex(8).add([1], np.zeros((1, 4), np.float32))
