"""Indexing through Ray Data on a local Ray cluster: the same library as
in-process indexing, failures recorded the same way, and a driver killed
after a checkpoint loses nothing committed."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import kill_indexing_when, vector_rows, noise_image, write_tiny_model
from test_rerank_engine import add_random_reranker

from retrieval import Engine, LibraryError, SearchQuery
from retrieval.cli import main

ray = pytest.importorskip("ray", reason="Ray Data is the optional extra crossfind[ray] (in [dev])")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster (2 CPUs) for the module; yields its address."""
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception:  # Ray gives its raylet 30 s to register, which a loaded machine can miss: once more
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def rr_model(tmp_path_factory) -> str:
    """A tiny model with a reranker: indexing keeps its patch tokens too."""
    d = write_tiny_model(tmp_path_factory.mktemp("rr-model-ray"))
    add_random_reranker(d)
    return f"local-dir:{d}"


def _library(eng: Engine) -> dict:
    """What a library holds: rows (path, status, error, size), vectors and tokens by id."""
    state = eng.state()
    rows = eng.store.images_by_id(sorted(eng.store.image_ids(None)))
    ids = sorted(eng.store.image_vector_map(state.row.id))
    return {
        "rows": {i: (r.path, r.status, r.error, r.width, r.height, r.taken_at) for i, r in rows.items()},
        "ids": ids,
        "vectors": state.images.reconstruct(ids),
        "tokens": state.read_tokens(ids)[0],
    }


def test_ray_library_matches_in_process(tmp_path, rr_model, photo_dir, cluster):
    (photo_dir / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photo_dir / "b" / "cut.png").write_bytes((photo_dir / "a" / "img00.png").read_bytes()[:60])  # cut off
    queries = [SearchQuery(text="a red circle", k=8, candidates=12), SearchQuery(text="a green star", k=5, rerank=False)]
    with Engine.open(tmp_path / "local", model=rr_model) as eng:
        local = eng.index_folder(photo_dir)
        local_hits = [[(h.id, h.path) for h in eng.search(q).hits] for q in queries]
        local_lib = _library(eng)
    with Engine.open(tmp_path / "ray", model=rr_model) as eng:
        rep = eng.index_folder(photo_dir, ray=cluster, batch_size=5)
        ray_hits = [[(h.id, h.path) for h in eng.search(q).hits] for q in queries]
        ray_lib = _library(eng)
        again = eng.index_folder(photo_dir, ray=cluster)  # nothing new: nothing encoded
    assert (rep.scanned, rep.added, rep.failed, rep.encoded) == (local.scanned, local.added, local.failed, local.encoded) == (14, 12, 2, 12)
    # failures recorded exactly as in-process: same files, same reasons
    assert sorted(rep.failures) == sorted(local.failures)
    assert {p for p, _ in rep.failures} == {str(photo_dir / "a" / "broken.jpg"), str(photo_dir / "b" / "cut.png")}
    assert ray_lib["rows"] == local_lib["rows"]
    assert ray_lib["ids"] == local_lib["ids"] and len(ray_lib["ids"]) == 12
    np.testing.assert_allclose(ray_lib["vectors"], local_lib["vectors"], atol=1e-5)
    assert set(ray_lib["tokens"]) == set(local_lib["tokens"]) == set(ray_lib["ids"])
    for i in ray_lib["ids"]:
        np.testing.assert_allclose(ray_lib["tokens"][i].astype(np.float32), local_lib["tokens"][i].astype(np.float32), atol=1e-2)
    assert ray_hits == local_hits and len(ray_hits[0]) == 8
    assert (again.encoded, again.unchanged, again.failed) == (0, 14, 0)  # failed files are not retried


def test_ray_encoders_use_the_librarys_onnx_export(tmp_path, tiny_model, photo_dir, cluster, monkeypatch):
    """On CPUs the actors run the ONNX export the driver uses (sent without its sessions)."""
    from retrieval.imageio import load_image
    from retrieval.onnx_runtime import OnnxEncoder

    monkeypatch.setenv("CROSSFIND_ONNX", "1")
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir / "a")  # in-process: makes the export
        enc = eng.state().runtime("image")
        assert isinstance(enc, OnnxEncoder)
        rep = eng.index_folder(photo_dir / "b", ray=cluster)
        assert (rep.added, rep.encoded, rep.failed) == (6, 6, 0)
        paths = sorted(str(p) for p in (photo_dir / "b").iterdir())
        ids = [eng.store.image_by_path(p).id for p in paths]
        want = enc.encode_images(enc.image_batch([load_image(p, min_size=enc.image_size).image for p in paths]))[0]
        np.testing.assert_allclose(eng.state().images.reconstruct(ids), want, atol=1e-5)


def test_killed_ray_driver_loses_nothing_committed(tmp_path, tiny_model, cluster):
    folder = tmp_path / "many"
    folder.mkdir()
    n = 300
    for i in range(n):
        noise_image(3000 + i, (64, 64)).save(folder / f"{i:04d}.png")
    lib = tmp_path / "lib"
    db = lib / "library.db"
    kill_indexing_when(folder, lib, tiny_model, lambda: db.exists() and vector_rows(db) >= 20, timeout=300,
                       extra=["--ray", cluster])
    committed = vector_rows(db)  # the driver is dead: this is all it committed
    assert 20 <= committed < n
    with Engine.open(lib, model=tiny_model) as eng:
        rep = eng.index_folder(folder, ray=cluster)
        state = eng.state()
        in_index = set(state.images.ids().tolist())
        rows = set(eng.store.image_vector_map(state.row.id))
        ok = set(eng.store.image_ids("ok"))
        assert in_index == rows == ok and len(ok) == n
        # what was committed before the kill is kept, and only the rest is encoded again
        assert rep.encoded == n - committed
        assert rep.added == rep.encoded and rep.added + rep.unchanged == n
        hits = eng.search_image(str(folder / "0007.png"), k=3)
        assert len(hits) == 3 and str(folder / "0007.png") not in {h.path for h in hits}  # the query itself is left out


def test_without_ray_the_error_names_the_extra(tmp_path, tiny_model, photo_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as when it is not installed
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        with pytest.raises(LibraryError, match=r"pip install 'crossfind\[ray\]'"):
            eng.index_folder(photo_dir, ray="auto")
        assert eng.store.image_ids(None) == []  # refused before anything was written
    with pytest.raises(SystemExit) as ei:
        main(["--library", str(tmp_path / "lib"), "index", str(photo_dir), "--model", tiny_model, "--ray"])
    assert ei.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("pip install 'crossfind[ray]'"), err


def test_ray_option_before_the_path_is_caught(tmp_path, photo_dir, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--library", str(tmp_path / "lib"), "index", "--ray", str(photo_dir), str(photo_dir)])
    assert ei.value.code == 1
    assert "--ray=ADDRESS" in capsys.readouterr().err
