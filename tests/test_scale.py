"""The compressed index, its re-scoring sidecar and id-range shards (issue 19)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.index import VectorIndex
from retrieval.index.compressed import (
    CompressedIndex,
    IndexPlan,
    Sidecar,
    id_bounds,
    open_shards,
    parse_memory,
    plan_index,
    write_shards,
)


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    s, i = flat.search(xq, k)
    return s, ids[i]


def test_parse_memory() -> None:
    assert parse_memory("4G") == 4 << 30
    assert parse_memory("512M") == 512 << 20
    assert parse_memory("1.5GB") == int(1.5 * (1 << 30))
    assert parse_memory("2GiB") == 2 << 30
    with pytest.raises(ValueError):
        parse_memory("lots")


def test_plan_follows_the_memory_budget() -> None:
    # No budget, or one the uncompressed index fits: today's index types.
    assert plan_index(1000, 512).factory == "IDMap2,Flat"
    assert plan_index(100_000, 512, "4G").kind == "ivf"
    # 10M CLIP vectors (20 GB as float32) under 4 GiB: PQ codes, HNSW coarse quantizer.
    big = plan_index(10_000_000, 512, "4G")
    assert big.kind == "ivfpq" and big.factory == "IVF16384_HNSW32,PQ64x8np"
    assert big.memory_bytes <= (4 << 30) // 2
    # A tighter budget gets a shorter code; an impossible one is refused.
    small = plan_index(10_000_000, 512, "600M")
    assert small.kind == "ivfpq" and small.pq_m < big.pq_m
    with pytest.raises(ValueError):
        plan_index(10_000_000, 512, "10M")
    # Too few vectors to train PQ codebooks: never compressed.
    assert plan_index(100, 512, "1K").kind == "flat"


def test_flat_shards_give_the_single_index_results(tmp_path) -> None:
    xb, xq = unit(3000, 32, 0), unit(20, 32, 1)
    ids = np.arange(3000, dtype=np.int64) * 7 + 5  # sparse, like store ids after deletions
    single = VectorIndex(32)
    single.add(ids, xb)
    paths = write_shards(single._index, 4, tmp_path / "flat")
    assert len(paths) == 4
    sharded = open_shards(paths, mmap=True)
    assert sharded.ntotal == 3000
    want = single.search(xq, 10)
    got_s, got_i = sharded.search(xq, 10)
    np.testing.assert_array_equal(got_i, want.ids)
    np.testing.assert_allclose(got_s, want.scores, rtol=1e-6)
    # each shard holds one id range and nothing else
    shards = [faiss.read_index(str(p)) for p in paths]
    held = [faiss.vector_to_array(shard.id_map) for shard in shards]
    assert sorted(np.concatenate(held).tolist()) == sorted(ids.tolist())
    assert all(a.max() < b.min() for a, b in zip(held, held[1:]))


def test_ivf_shards_at_exact_settings_match_one_index_and_brute_force(tmp_path) -> None:
    xb, xq = unit(4000, 32, 2), unit(25, 32, 3)
    ids = np.arange(10, 4010, dtype=np.int64)
    index = faiss.index_factory(32, "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add_with_ids(xb, ids)
    index.nprobe = 32  # every list: exact
    sharded = open_shards(write_shards(index, 3, tmp_path / "ivf"), mmap=True, nprobe=32)
    s1, i1 = index.search(xq, 10)
    s2, i2 = sharded.search(xq, 10)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_allclose(s2, s1, rtol=1e-6)
    _, truth = exact(xb, ids, xq, 10)
    np.testing.assert_array_equal(i1, truth)


def small_plan(n: int, dim: int) -> IndexPlan:
    return IndexPlan(n, dim, "ivfpq", "IVF16_HNSW32,PQ8x4np", 16, 8, 16.0, 0)


def test_compressed_index_rescores_to_the_exact_top_k(tmp_path) -> None:
    n, dim = 3000, 32
    xb, xq = unit(n, dim, 4), unit(15, dim, 5)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    chunks = (xb[s : s + 1000] for s in range(0, n, 1000))
    one = CompressedIndex.build(small_plan(n, dim), ids, chunks, tmp_path / "one", xb)
    assert len(one) == n and (tmp_path / "one.faiss").exists() and (tmp_path / "one.f16.npy").exists()
    one.set_nprobe(16)
    one.rescore_factor = 40  # 400 candidates of 3000: the true top-10 are among them
    res = one.search(xq, 10)
    scores, got = res.scores, res.ids
    want_s, want_i = exact(xb, ids, xq, 10)
    np.testing.assert_array_equal(got, want_i)
    np.testing.assert_allclose(scores, want_s, atol=2e-3)  # float16 sidecar
    # PQ order alone is not exact: the re-scoring is what makes it so
    pq_only = one.candidates(xq, 10)
    assert (pq_only != want_i).any()

    # The same build cut into 3 id-range shards: the same results.
    chunks = (xb[s : s + 1000] for s in range(0, n, 1000))
    three = CompressedIndex.build(small_plan(n, dim), ids, chunks, tmp_path / "three", xb, shards=3)
    assert not (tmp_path / "three.faiss").exists() and len(list(tmp_path.glob("three.shard*.faiss"))) == 3
    assert isinstance(three.index, faiss.IndexShards) and len(three) == n
    three.set_nprobe(16)
    three.rescore_factor = 40
    r3 = three.search(xq, 10)
    s3, i3 = r3.scores, r3.ids
    np.testing.assert_array_equal(i3, got)
    np.testing.assert_allclose(s3, scores, rtol=1e-6)
    # Reopened from disk (memory-mapped), the same again.
    again = CompressedIndex.open(tmp_path / "three")
    again.set_nprobe(16)
    again.rescore_factor = 40
    np.testing.assert_array_equal(again.search(xq, 10).ids, got)
    # A filter keeps to the allowed ids, across shards, and still scores exactly.
    allowed = ids[::5]
    want_s, want_i = exact(xb[::5], allowed, xq, 10)
    filtered = again.search(xq, 10, allowed=allowed)
    assert all(set(a) == set(b) for a, b in zip(filtered.ids.tolist(), want_i.tolist()))
    np.testing.assert_allclose(filtered.scores, want_s, atol=2e-3)  # order may differ only within float16 ties


def test_sidecar_needs_ascending_ids_and_finds_only_its_own(tmp_path) -> None:
    x = unit(10, 8, 6)
    with pytest.raises(ValueError, match="ascending"):
        Sidecar.write(tmp_path / "bad", np.array([3, 2, 1, 4, 5, 6, 7, 8, 9, 10]), [x])
    side = Sidecar.write(tmp_path / "ok", np.arange(100, 110), [x[:4], x[4:]])
    np.testing.assert_allclose(side.gather(np.array([109, 100])), x[[9, 0]], atol=1e-3)
    with pytest.raises(KeyError):
        side.gather(np.array([100, 5]))


def test_id_bounds_split_evenly() -> None:
    b = id_bounds(np.arange(1, 101), 4)
    assert b[1:-1] == [26, 51, 76]
    with pytest.raises(ValueError):
        id_bounds(np.arange(5), 0)


def test_index_memory_budget_builds_and_searches_a_compressed_index(tmp_path, tiny_model, backend) -> None:
    from retrieval import Engine
    from retrieval.scale import apply_index_memory, in_step

    lib = tmp_path / "lib"
    corpus = tmp_path / "words.txt"
    corpus.write_text("".join(f"caption number {i} of a {['red', 'blue', 'green'][i % 3]} thing {i * 7 % 13}\n" for i in range(400)))
    with Engine.open(lib, model=tiny_model) as eng:
        eng.add_texts(corpus)
        want = [h.id for h in eng.search_text("caption number 17 of a blue thing", k=5, target="texts")]
        # 400 vectors of dimension 32 do not fit 80 KB uncompressed: a PQ index is planned and built.
        with eng.writer():
            (rep,) = apply_index_memory(eng.state(), "80K", kinds=("texts",))
        assert rep.compressed and rep.built and rep.vectors == 400 and "PQ" in rep.plan
        assert in_step(eng.state(), "texts")
    with Engine.open(lib, model=tiny_model) as eng:
        index = eng.state().search_index("texts")
        assert index.kind == "ivfpq" and len(index) == 400
        got = [h.id for h in eng.search_text("caption number 17 of a blue thing", k=5, target="texts")]
        assert got == want  # re-scored exactly: the same top results as the full index
        # The budget is remembered: a later run finds the index in step and leaves it.
        with eng.writer():
            (again,) = apply_index_memory(eng.state(), kinds=("texts",))
        assert again.compressed and not again.built
        # More texts: the compressed index is stale until rebuilt, and searches use the full one meanwhile.
        more = tmp_path / "more.txt"
        more.write_text("".join(f"another line {i}\n" for i in range(50)))
        eng.add_texts(more)
        assert not in_step(eng.state(), "texts")
        with eng.writer():
            (third,) = apply_index_memory(eng.state(), kinds=("texts",))
        assert third.built and third.vectors == 450


def test_cli_index_memory_option(tmp_path, tiny_model, photo_dir, capsys) -> None:
    import json

    from click.testing import CliRunner

    from retrieval.cli import cli

    from retrieval.cli import main

    lib = str(tmp_path / "lib")
    with pytest.raises(SystemExit) as bad:
        main(["--library", lib, "index", str(photo_dir), "--model", tiny_model, "--index-memory", "lots"])
    assert bad.value.code == 1
    err = capsys.readouterr().err
    assert "not a memory size" in err and "Traceback" not in err
    assert not (tmp_path / "lib").exists() or not list((tmp_path / "lib").rglob("*.faiss"))  # refused before indexing
    ok = CliRunner().invoke(cli, ["--library", lib, "index", str(photo_dir), "--model", tiny_model, "--index-memory", "1G", "--json"])
    assert ok.exit_code == 0, ok.output
    (plan,) = json.loads(ok.stdout)["index_plans"]
    # a dozen images fit any budget uncompressed: the plan says so and nothing else is built
    assert plan["kind"] == "images" and plan["compressed"] is False and plan["plan"] == "IDMap2,Flat"
    assert not list((tmp_path / "lib").rglob("images.pq.*"))


def test_search_defaults_follow_the_measured_settings():
    """nprobe stays 64 up to 4,096 lists and falls to 12 at 16,384 (10M vectors);
    re-scoring deepens from 20k candidates at 1M to 150k at 10M (docs/benchmarks.md)."""
    from retrieval.index.compressed import default_nprobe, default_rescore

    assert [default_nprobe(n) for n in (8, 1024, 4096, 8192, 16384, 65536)] == [8, 64, 64, 28, 12, 8]
    assert [default_rescore(n) for n in (1_000, 1_000_000, 2_000_000, 10_000_000, 10**9)] == [20, 20, 37, 150, 150]
