"""Durability: writers exclude each other, index and token files that are lost,
damaged or from another library are noticed and rebuilt from the store, orphan
temp files go, a full disk or read-only library fails cleanly (issue 14)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image, write_tiny_model
from test_rerank_engine import add_random_reranker

from retrieval import Engine, LibraryBusy, SearchQuery
from retrieval.imageio import load_image
from retrieval.lock import WriterLock

CLI = [sys.executable, "-c", "from retrieval.cli import main; main()"]


def crossfind(lib: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "--library", str(lib), *args], capture_output=True, text=True, timeout=300, **kw)


def make_folder(root: Path, n: int, seed: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        noise_image(seed + i, (64, 64)).save(root / f"{i:03d}.png")
    return root


def assert_consistent(lib: Path, model: str, n_images: int, n_texts: int = 0) -> None:
    """Store and index agree and every item is found exactly once, by its own vector."""
    with Engine.open(lib, model=model) as eng:
        state = eng.state()
        for kind, n, vec_map in (("images", n_images, eng.store.image_vector_map), ("texts", n_texts, eng.store.text_vector_map)):
            index = state.images if kind == "images" else state.texts
            ids = index.ids()
            assert len(ids) == len(set(ids.tolist())) == n, (kind, len(ids), n)
            assert set(ids.tolist()) == set(vec_map(state.row.id))
            if n:
                top = index.search(index.reconstruct(ids), 1).ids[:, 0]
                assert (top == ids).all()
        assert set(eng.store.image_ids("ok")) == set(eng.store.image_vector_map(state.row.id))


def vectors_of(lib: Path, model: str) -> dict[int, np.ndarray]:
    with Engine.open(lib, model=model) as eng:
        index = eng.state().images
        ids = index.ids()
        return dict(zip(ids.tolist(), index.reconstruct(ids)))


# ---------------------------------------------------------------- writer lock
def test_two_writer_processes_lose_no_vectors(tmp_path, tiny_model, backend):
    """Two `index` runs on different folders and two `add-texts` at once: the
    second waits for the first, and every vector of both ends up searchable."""
    a = make_folder(tmp_path / "a", 24, 0)
    b = make_folder(tmp_path / "b", 24, 500)
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.set_default_model(tiny_model)
    args = ["--batch-size", "4", "--workers", "1", "--checkpoint-seconds", "0"]
    procs = [subprocess.Popen([*CLI, "--library", str(lib), "index", str(f), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for f in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("waiting for another crossfind process" in err for _, err in outs)
    for i in range(2):
        (tmp_path / f"c{i}.txt").write_text("".join(f"text {i} number {j}\n" for j in range(30)))
    procs = [subprocess.Popen([*CLI, "--library", str(lib), "add-texts", str(tmp_path / f"c{i}.txt")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_consistent(lib, tiny_model, 48, 60)


def test_no_wait_fails_at_once_and_readers_keep_working(tmp_path, tiny_model, photo_dir, backend):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
    other = WriterLock(lib)  # another writer holds the lock
    other.acquire()
    try:
        r = crossfind(lib, "index", str(photo_dir), "--no-wait")
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "another crossfind process is writing" in r.stderr
        with Engine.open(lib) as eng:
            with pytest.raises(LibraryBusy):
                with eng.writer(wait=False):
                    pass
            assert not eng.lock.try_acquire()
        # searches, status and history work while a writer holds the lock, and search keeps its history
        r = crossfind(lib, "search", "anything", "-k", "3", "--json")
        assert r.returncode == 0, r.stderr
        with Engine.open(lib) as eng:
            assert eng.status()["images"] == 12
            assert eng.search_text("something else", k=2)
            assert [q.text for q in eng.history(2)] == ["something else", "anything"]
        waiting = subprocess.Popen([*CLI, "--library", str(lib), "remove", str(photo_dir / "a")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while waiting.poll() is None and time.time() < deadline and not _stderr_has(waiting):
            time.sleep(0.1)
    finally:
        other.release()
        other.close()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "removed 6 images" in out
    assert_consistent(lib, tiny_model, 6)


def _stderr_has(proc: subprocess.Popen) -> bool:
    import select

    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], 0.1)
    return bool(ready)


# -------------------------------------------------------- damaged index files
@pytest.mark.parametrize("damage", ["delete", "truncate", "garble-header", "garble-vectors", "garbage"])
def test_damaged_index_is_rebuilt_from_stored_vectors(tmp_path, tiny_model, photo_dir, damage, backend):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        faiss_file = eng.state().dir / "images.faiss"
    before = vectors_of(lib, tiny_model)
    data = bytearray(faiss_file.read_bytes())
    if damage == "delete":
        faiss_file.unlink()
    elif damage == "truncate":
        faiss_file.write_bytes(data[: len(data) // 2])
    elif damage == "garble-header":
        data[:16] = b"\xff" * 16
        faiss_file.write_bytes(data)
    elif damage == "garble-vectors":  # still a readable index, with wrong numbers
        mid = len(data) // 3
        data[mid : mid + 64] = bytes(64)
        faiss_file.write_bytes(data)
    else:
        faiss_file.write_bytes(b"not an index at all" * 10)
    with Engine.open(lib, model=tiny_model) as eng:
        hits = eng.search_image(photo_dir / "a" / "img00.png", k=20)
        assert len(hits) == 11  # every other image, the query left out
        assert eng.index_folder(photo_dir).encoded == 0  # nothing re-encoded
    after = vectors_of(lib, tiny_model)
    assert after.keys() == before.keys()
    for i in before:
        np.testing.assert_array_equal(after[i], before[i])
    assert_consistent(lib, tiny_model, 12)


def test_deleted_text_index_is_rebuilt(tmp_path, tiny_model, backend):
    corpus = tmp_path / "caps.txt"
    corpus.write_text("a red circle\na blue square\ntwo green triangles\n")
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.add_texts(corpus)
        (eng.state().dir / "texts.faiss").unlink()
    with Engine.open(lib, model=tiny_model) as eng:
        assert eng.search_text("a blue square", k=1, target="texts")[0].text == "a blue square"
        assert eng.add_texts(corpus).unchanged == 3
    assert_consistent(lib, tiny_model, 0, 3)


def test_older_library_gets_its_vectors_stored(tmp_path, tiny_model, photo_dir):
    """A library indexed before vectors lived in the store: its rows are filled
    from its index on first open, so a later loss of the index is survivable."""
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        state = eng.state()
        gen = eng.store.get_setting(f"generation:{state.spec.spec}:images")
        sidecar = state.dir / "images.generation"
    before = vectors_of(lib, tiny_model)
    con = sqlite3.connect(lib / "library.db")
    con.execute("update image_vectors set vector = null")
    con.commit()
    con.close()
    sidecar.write_text(str(gen))  # the plain sidecar older versions wrote
    with Engine.open(lib, model=tiny_model) as eng:
        assert len(eng.search_image(photo_dir / "b" / "img03.png", k=20)) == 11
    con = sqlite3.connect(lib / "library.db")
    assert con.execute("select count(*) from image_vectors where vector is null").fetchone()[0] == 0
    con.close()
    (sidecar.parent / "images.faiss").unlink()
    after = vectors_of(lib, tiny_model)
    assert all(np.array_equal(after[i], before[i]) for i in before) and after.keys() == before.keys()


# ---------------------------------------------------------- library identity
def test_files_of_a_deleted_database_are_never_used(tmp_path, tiny_model, photo_dir):
    """library.db deleted while models/ remains: the old index (whose ids the
    new rows would reuse) is discarded, never searched."""
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir / "a")
    for name in ("library.db", "library.db-wal", "library.db-shm"):
        (lib / name).unlink(missing_ok=True)
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir / "b")
        hits = eng.search_image(photo_dir / "b" / "img03.png", k=20)
        assert {Path(h.path).parent.name for h in hits} == {"b"} and len(hits) == 5
        # each id's vector is its own image's, not the old library's item with that id
        state = eng.state()
        index = state.images
        for row_id, vec in zip(index.ids().tolist(), index.reconstruct(index.ids())):
            path = eng.store.images_by_id([row_id])[row_id].path
            own = state.encoder.encode_images(state.encoder.image_batch([load_image(path).image]))[0][0]
            np.testing.assert_allclose(vec, own, atol=1e-5)
    assert_consistent(lib, tiny_model, 6)


def test_index_files_copied_from_another_library_are_discarded(tmp_path, tiny_model, photo_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    with Engine.open(one, model=tiny_model) as eng:
        eng.index_folder(photo_dir / "a")
        slug_dir = eng.state().dir
    with Engine.open(two, model=tiny_model) as eng:
        eng.index_folder(photo_dir / "b")
        target = eng.state().dir
    for f in slug_dir.iterdir():
        shutil.copy(f, target / f.name)
    assert_consistent(two, tiny_model, 6)
    with Engine.open(two, model=tiny_model) as eng:
        hits = eng.search_image(photo_dir / "a" / "img00.png", k=20)
        assert {Path(h.path).parent.name for h in hits} == {"b"}


# -------------------------------------------------------------- token store
@pytest.fixture(scope="module")
def rr_model(tmp_path_factory) -> str:
    d = write_tiny_model(tmp_path_factory.mktemp("rr-model-durable"))
    add_random_reranker(d)
    return f"local-dir:{d}"


@pytest.mark.parametrize("damage", ["garble-rows", "truncate", "garble-meta"])
def test_damaged_token_store_is_noticed_and_rankings_kept(tmp_path, rr_model, photo_dir, damage):
    lib = tmp_path / "lib"
    q = SearchQuery(text="a red circle", k=12, candidates=12)
    with Engine.open(lib, model=rr_model) as eng:
        eng.index_folder(photo_dir)
        before = [(h.id, h.rerank_score) for h in eng.search(q).hits]
        tok_file = eng.state().dir / "tokens.f16"
    data = bytearray(tok_file.read_bytes())
    if damage == "garble-rows":
        rng = np.random.default_rng(0)
        for pos in rng.integers(0, len(data), 200):
            data[pos] = 0xFF  # NaN halves among them
        tok_file.write_bytes(data)
    elif damage == "truncate":
        tok_file.write_bytes(data[: len(data) // 3])
    else:
        tok_file.with_suffix(".json").write_text('{"shape": [17, ')
    shutil.rmtree(lib / "rerank-features")  # the image memory cached by the first search would spare reading tokens
    with Engine.open(lib, model=rr_model) as eng:
        after = [(h.id, h.rerank_score) for h in eng.search(q).hits]
        assert all(s is not None and np.isfinite(s) for _, s in after)
        assert [i for i, _ in after] == [i for i, _ in before]
        np.testing.assert_allclose([s for _, s in after], [s for _, s in before], rtol=1e-3, atol=1e-4)
    with Engine.open(lib, model=rr_model) as eng:  # the re-encoded rows were stored and pass their check
        state = eng.state()
        ids = [i for i, _ in before]
        good, bad = state.read_tokens(ids)
        assert not bad and len(good) == 12


# ------------------------------------------------------------ temp files
def test_orphan_temp_files_are_removed_by_the_next_writer(tmp_path, tiny_model, photo_dir):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        mdir = eng.state().dir
    orphans = [mdir / "images.faiss.k2j3h4.tmp", mdir / "images.generation.tmp", lib / "stray.tmp"]
    for o in orphans:
        o.write_bytes(b"x" * 100)
    with Engine.open(lib, model=tiny_model) as eng:
        eng.search_text("x", k=1)
        assert all(o.exists() for o in orphans)  # a reader leaves them: a writer may be mid-save
        eng.index_folder(photo_dir)
    assert not any(o.exists() for o in orphans)


# ------------------------------------------- read-only and full file systems
def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a test file system needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_reading_commands_work_on_a_read_only_library(tmp_path, tiny_model, photo_dir):
    """Root ignores file modes, so the library is copied to a tmpfs that is
    then remounted read-only: a real read-only file system."""
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        qid = eng.search(SearchQuery(text="a photo", k=2)).query_id
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "64m")
    try:
        shutil.copytree(lib, mnt / "lib")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        ro = mnt / "lib"
        r = crossfind(ro, "search", "a photo", "-k", "3", "--json")
        assert r.returncode == 0, r.stderr
        assert r.stdout.count('"rank"') == 3 and "read-only" in r.stderr and "Traceback" not in r.stderr
        with Engine.open(ro) as eng:
            assert eng.read_only
            res = eng.search(SearchQuery(image=str(photo_dir / "a" / "img00.png"), k=2))
            assert len(res.hits) == 2 and res.query_id is None and any("read-only" in n for n in res.notes)
            assert eng.status()["images"] == 12
            assert [q.text for q in eng.history()] == ["a photo"]
            assert len(eng.show(qid).hits) == 2
        r = crossfind(ro, "index", str(photo_dir))
        assert r.returncode == 1 and "read-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        _umount(mnt)


def test_full_disk_while_indexing_keeps_what_was_committed(tmp_path, tiny_model):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "3m")
    try:
        lib = mnt / "lib"
        folder = make_folder(tmp_path / "photos", 150, 0)
        with Engine.open(lib, model=tiny_model) as eng:
            eng.set_default_model(tiny_model)
            eng.index_folder(folder, batch_size=8, checkpoint_seconds=0)
        more = make_folder(tmp_path / "more", 300, 1000)
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 40_000))
        r = crossfind(lib, "index", str(more), "--batch-size", "8", "--checkpoint-seconds", "0", "--json")
        assert r.returncode == 1, r.stdout
        assert len(r.stderr.strip().splitlines()) == 1 and "no space left" in r.stderr and "Traceback" not in r.stderr
        with Engine.open(lib) as eng:  # reading works on the full disk
            assert eng.status()["images_ok"] >= 150
            assert len(eng.search_text("x", k=1)) == 1
        (mnt / "filler").unlink()
        with Engine.open(lib) as eng:
            eng.index_folder(more, batch_size=64)
        assert_consistent(lib, tiny_model, 450)
    finally:
        _umount(mnt)


def test_a_long_lived_engine_sees_what_another_writer_added(tmp_path, tiny_model, photo_dir, backend):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as first:
        first.index_folder(photo_dir / "a")
        assert len(first.state().images) == 6
        with Engine.open(lib, model=tiny_model) as second:  # another writer, in between
            second.index_folder(photo_dir / "b")
        first.remove_images([photo_dir / "a" / "img00.png"])  # saves first's image index
        assert len(first.search_image(photo_dir / "b" / "img03.png", k=20)) == 10
    assert_consistent(lib, tiny_model, 11)
