"""The reranker's image memory, cached per image (retrieval/rerank_memory.py):
the split reranker scores like the whole one, a cached search like an
uncached one, a repeated search computes no memory, ``index
--rerank-features`` fills the cache, a read-only library still re-ranks, and
a changed reranker never reads the memory of the old one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_tiny_model
from PIL import Image
from test_durable import _mount_tmpfs, _umount
from test_rerank_engine import add_random_reranker

from retrieval import Engine, SearchQuery
from retrieval.cli import cli
from retrieval.encoders import load_encoder
from retrieval.feature_cache import FEATURES_DIR


def same_order_but_ties(want: np.ndarray, got: np.ndarray, tie: float = 0.01) -> bool:
    """Whether ``got`` orders every pair of candidates as ``want`` does, except
    pairs whose ``want`` logits are within ``tie`` (float16 rounding may swap those)."""
    a, b = np.subtract.outer(want, want), np.subtract.outer(got, got)
    clear = np.abs(a) > tie
    return bool(np.all(np.sign(a[clear]) == np.sign(b[clear])))


def memory_files(lib: Path) -> list[Path]:
    return sorted((lib / FEATURES_DIR).rglob("*.npy"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, list[str]]:
    """24 generated scenes (shapes-tiny's kind of image) and their captions."""
    from retrieval.shapes import generate

    root = tmp_path_factory.mktemp("scenes")
    records = generate(root, 24, seed=5)
    return root / "images", [r["caption"] for r in records]


@pytest.fixture(scope="module")
def shapes(scenes):
    from retrieval.rerank import find_reranker

    enc = load_encoder("shapes-tiny", device="cpu")
    reranker = find_reranker(enc)
    assert reranker is not None
    ims = [Image.open(p).convert("RGB") for p in sorted(scenes[0].iterdir())]
    _, toks = enc.encode_images(enc.image_batch(ims), with_tokens=True, token_layer=reranker.config.image_layer)
    return reranker, toks


def test_split_reranker_scores_like_the_whole(shapes, scenes):
    reranker, toks = shapes
    memory = reranker.image_memory(toks)
    assert memory.dtype == np.float16 and memory.shape == (len(toks), *reranker.memory_shape)
    dual = np.linspace(0.1, 0.5, len(toks)).astype(np.float32)
    for caption in scenes[1][:8]:
        want = reranker.logits_images(caption, toks, dual)
        got = reranker.logits_memory(caption, memory, dual)
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-3)
        assert same_order_but_ties(want, got)
        assert np.argmax(got) == np.argmax(want)
        np.testing.assert_allclose(reranker.probability(got), reranker.probability(want), atol=1e-4)
    # memory computed in batches is the memory computed alone
    reranker.batch_size = 5
    try:
        np.testing.assert_array_equal(reranker.image_memory(toks), memory)
    finally:
        reranker.batch_size = 256


def test_fingerprint_follows_the_weights(tmp_path):
    from retrieval.rerank import Reranker

    model_dir = write_tiny_model(tmp_path / "m")
    add_random_reranker(model_dir, seed=0)
    enc = load_encoder(f"local-dir:{model_dir}")
    first = Reranker.load(model_dir, enc)
    assert Reranker.load(model_dir, enc).fingerprint == first.fingerprint
    add_random_reranker(model_dir, seed=1)
    assert Reranker.load(model_dir, enc).fingerprint != first.fingerprint
    assert Reranker(first.module, enc).fingerprint != first.fingerprint  # built in memory: from its weights


def hits(res) -> list[tuple[int, float | None]]:
    return [(h.id, h.rerank_score) for h in res.hits]


def test_second_search_computes_no_memory_and_equals_uncached(tmp_path, scenes, monkeypatch):
    lib = tmp_path / "lib"
    captions = scenes[1]
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(scenes[0])
        memory = eng.searcher.memory
        reranker = eng.state().reranker
        calls: list[int] = []
        real = reranker.image_memory
        monkeypatch.setattr(reranker, "image_memory", lambda toks: calls.append(len(toks)) or real(toks))
        first = eng.search(SearchQuery(text=captions[0], k=10, candidates=16))
        assert first.reranked and calls == [16] and memory.computed == 16
        assert len(memory_files(lib)) == 16
        again = eng.search(SearchQuery(text=captions[1], k=10, candidates=16))
        assert again.reranked
        overlap = {h.id for h in first.hits} & {h.id for h in again.hits}
        assert overlap and memory.computed == 16 + sum(calls[1:]) and memory.computed < 32
        memory._recent.clear()  # from disk this time, not the process's LRU
        calls.clear()
        repeat = eng.search(SearchQuery(text=captions[0], k=10, candidates=16))
        assert calls == [] and hits(repeat) == hits(first)
    # Uncached (switched off): the same hits, the same probabilities to the bit.
    monkeypatch.setenv("CROSSFIND_RERANK_CACHE", "0")
    shutil.rmtree(lib / FEATURES_DIR)
    with Engine.open(lib, model="shapes-tiny") as eng:
        off = eng.search(SearchQuery(text=captions[0], k=10, candidates=16))
        assert hits(off) == hits(first) and eng.searcher.memory.computed == 16
        eng.search(SearchQuery(text=captions[0], k=10, candidates=16))
        assert eng.searcher.memory.computed == 32 and not (lib / FEATURES_DIR).exists()


def test_index_rerank_features_fills_the_cache(tmp_path, scenes):
    lib = tmp_path / "lib"
    run = CliRunner()
    res = run.invoke(cli, ["--library", str(lib), "index", str(scenes[0]), "--model", "shapes-tiny", "--rerank-features"])
    assert res.exit_code == 0, res.output
    assert "24 computed for the model's own reranker" in res.stderr
    files = memory_files(lib)
    assert len(files) == 24 and all(f.stat().st_size == 64 * 128 * 2 + 128 for f in files)
    res = run.invoke(cli, ["--library", str(lib), "index", str(scenes[0]), "--model", "shapes-tiny", "--rerank-features"])
    assert res.exit_code == 0 and "0 computed" in res.stderr
    with Engine.open(lib, model="shapes-tiny") as eng:
        res = eng.search(SearchQuery(text=scenes[1][3], k=5, candidates=24))
        assert res.reranked and eng.searcher.memory.computed == 0
    assert "16 KB per image" in run.invoke(cli, ["index", "--help"]).output


def test_read_only_library_reranks_from_and_without_the_cache(tmp_path, scenes):
    """Root ignores file modes: the library goes to a tmpfs remounted read-only."""
    lib = tmp_path / "lib"
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(scenes[0])
        eng.search(SearchQuery(text=scenes[1][0], k=5, candidates=8))  # 8 candidates cached
        want = hits(eng.search(SearchQuery(text=scenes[1][0], k=24, candidates=24)))
    shutil.rmtree(lib / FEATURES_DIR)
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.search(SearchQuery(text=scenes[1][0], k=5, candidates=8))
    assert len(memory_files(lib)) == 8
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "64m")
    try:
        shutil.copytree(lib, mnt / "lib")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with Engine.open(mnt / "lib", model="shapes-tiny") as eng:
            assert eng.read_only
            got = eng.search(SearchQuery(text=scenes[1][0], k=24, candidates=24))
            assert got.reranked and hits(got) == want
            assert eng.searcher.memory.computed == 16  # the 8 cached are read, nothing is written
            assert len(memory_files(mnt / "lib")) == 8
    finally:
        _umount(mnt)


def test_changed_reranker_does_not_read_stale_memory(tmp_path, photo_dir):
    model_dir = write_tiny_model(tmp_path / "model")
    spec = f"local-dir:{model_dir}"
    add_random_reranker(model_dir, seed=0)
    lib = tmp_path / "lib"
    with Engine.open(lib, model=spec) as eng:
        eng.index_folder(photo_dir)
        old = hits(eng.search(SearchQuery(text="a red circle", k=12, candidates=12)))
        assert eng.searcher.memory.computed == 12
    folders = {p.name for p in (lib / FEATURES_DIR).iterdir()}
    add_random_reranker(model_dir, seed=1)  # other weights, same shape
    with Engine.open(lib, model=spec) as eng:
        new = eng.search(SearchQuery(text="a red circle", k=12, candidates=12))
        assert eng.searcher.memory.computed == 12  # nothing read from the old reranker's folder
        assert len({p.name for p in (lib / FEATURES_DIR).iterdir()} - folders) == 1
        # the new reranker's own scores, from the stored tokens
        reranker = eng.state().reranker
        toks = eng.image_tokens([h.id for h in new.hits])
        dual = np.array([h.score for h in new.hits], np.float32)
        np.testing.assert_allclose([h.rerank_score for h in new.hits],
                                   reranker.score_images("a red circle", toks, dual), atol=1e-3)
    assert hits(new) != old


def test_damaged_cached_memory_is_computed_again(tmp_path, scenes):
    lib = tmp_path / "lib"
    q = SearchQuery(text=scenes[1][2], k=8, candidates=8)
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(scenes[0])
        want = hits(eng.search(q))
    files = memory_files(lib)
    files[0].write_bytes(files[0].read_bytes()[:100])  # cut short
    data = bytearray(files[1].read_bytes())
    data[-64:] = b"\xff" * 64  # NaN halves
    files[1].write_bytes(bytes(data))
    with Engine.open(lib, model="shapes-tiny") as eng:
        assert hits(eng.search(q)) == want and eng.searcher.memory.computed == 2
    with Engine.open(lib, model="shapes-tiny") as eng:
        assert hits(eng.search(q)) == want and eng.searcher.memory.computed == 0  # written again
