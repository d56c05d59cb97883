"""The engine end to end with a tiny random-weight model: indexing, incremental
runs, renames, deletions, failures, and search against brute force."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import noise_image

from retrieval import Engine, LibraryError, QueryError
from retrieval.imageio import load_image


def brute_force(eng: Engine, folder, query_vec: np.ndarray, k: int) -> list[str]:
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    enc = eng.encoder
    vecs = enc.encode_pil([load_image(p, enc.image_size).image for p in paths])
    order = np.argsort(-(vecs @ query_vec))[:k]
    return [paths[i] for i in order]


def test_text_search_equals_brute_force(tmp_path, tiny_model, photo_dir, backend):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.index_folder(photo_dir)
        assert (rep.scanned, rep.added, rep.encoded, rep.failed) == (12, 12, 12, 0)
        hits = eng.search_text("a photo of noise", k=5)
        q = eng.encoder.encode_texts(["a photo of noise"])[0]
        assert [h.path for h in hits] == brute_force(eng, photo_dir, q, 5)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert all(h.kind == "image" and h.text is None for h in hits)
        assert hits[0].score >= hits[-1].score


def test_image_search_leaves_query_out(tmp_path, tiny_model, photo_dir, backend):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        query = photo_dir / "a" / "img04.jpg"
        hits = eng.search_image(str(query), k=11)
        assert len(hits) == 11 and str(query) not in [h.path for h in hits]
        qv = eng.encoder.encode_pil([load_image(query, eng.encoder.image_size).image])[0]
        expected = [p for p in brute_force(eng, photo_dir, qv, 12) if p != str(query)]
        assert [h.path for h in hits] == expected
        # a PIL image works as a query too
        assert eng.search_image(load_image(query).image, k=1)[0].path == str(query)


def test_second_run_encodes_nothing(tmp_path, tiny_model, photo_dir, backend):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        rep = eng.index_folder(photo_dir)
        assert (rep.unchanged, rep.added, rep.updated, rep.encoded) == (12, 0, 0, 0)


def test_rename_reuses_vector_and_change_reencodes(tmp_path, tiny_model, photo_dir, backend):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        old = photo_dir / "a" / "img00.png"
        before = eng.store.image_by_path(str(old))
        new = photo_dir / "b" / "renamed.png"
        os.rename(old, new)
        changed = photo_dir / "b" / "img01.jpg"
        noise_image(101).save(changed)
        os.utime(changed, ns=(1, 1))  # a different mtime for sure
        rep = eng.index_folder(photo_dir)
        assert rep.encoded == 1 and rep.updated == 2 and rep.added == 0 and rep.removed == 0
        after = eng.store.image_by_path(str(new))
        assert after is not None and after.id == before.id
        assert eng.store.image_by_path(str(old)) is None
        hits = eng.search_image(str(changed), k=12)
        assert str(new) in [h.path for h in hits]


def test_duplicate_copies_vector_without_encoding(tmp_path, tiny_model, photo_dir, backend):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        src = photo_dir / "a" / "img02.jpg"
        dup = photo_dir / "a" / "copy.jpg"
        shutil.copy(src, dup)
        rep = eng.index_folder(photo_dir)
        assert (rep.added, rep.encoded) == (1, 0)
        hits = eng.search_image(load_image(src).image, k=2)
        assert {h.path for h in hits} == {str(src), str(dup)}
        assert hits[0].score == pytest.approx(hits[1].score, abs=1e-6)


def test_decoding_in_processes_gives_the_same_library(tmp_path, tiny_model, photo_dir, monkeypatch):
    """Decoding in a process pool (how a GPU is fed) records what loader threads
    record: the same vectors, sizes and failure reasons, in fewer batches than files."""
    (photo_dir / "bad.jpg").write_text("not an image at all")
    data = (photo_dir / "b" / "img01.jpg").read_bytes()
    (photo_dir / "trunc.jpg").write_bytes(data[: len(data) // 2])
    seen = {}
    for how in ("threads", "processes"):
        monkeypatch.setenv("CROSSFIND_DECODE", how)
        with Engine.open(tmp_path / how, model=tiny_model) as eng:
            rep = eng.index_folder(photo_dir, batch_size=5, workers=2)
            assert (rep.encoded, rep.failed) == (12, 2), how
            st = eng.status()
            ids = np.sort(eng.state().images.ids())
            rows = eng.store.images_by_id(ids.tolist())
            vecs = dict(zip((rows[i].path for i in ids.tolist()), eng.state().images.reconstruct(ids)))
            sizes = {r.path: (r.width, r.height) for r in rows.values()}
            seen[how] = vecs, sizes, {f["path"]: f["error"] for f in st["failures"]}
    (tv, ts, tf), (pv, ps, pf) = seen["threads"], seen["processes"]
    assert tv.keys() == pv.keys() and ts == ps and tf == pf and len(tf) == 2
    for path in tv:
        np.testing.assert_allclose(tv[path], pv[path], atol=1e-5)


def test_deleted_files_leave_store_and_hits(tmp_path, tiny_model, photo_dir, backend):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        gone = photo_dir / "b" / "img03.png"
        gone.unlink()
        shutil.rmtree(photo_dir / "a")
        rep = eng.index_folder(photo_dir)
        assert rep.removed == 7
        hits = eng.search_text("anything", k=20)
        assert len(hits) == 5
        assert all(h.path.startswith(str(photo_dir / "b")) for h in hits)
        assert len(eng.state().images) == 5


def test_bad_files_are_recorded_with_reasons(tmp_path, tiny_model, photo_dir, backend):
    (photo_dir / "bad.jpg").write_text("not an image at all")
    (photo_dir / "empty.png").write_bytes(b"")
    good = photo_dir / "trunc.jpg"
    data = (photo_dir / "b" / "img01.jpg").read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.index_folder(photo_dir, batch_size=4)
        assert rep.failed == 3 and rep.encoded == 12
        st = eng.status()
        assert st["images_failed"] == 3 and st["images_ok"] == 12
        reasons = {os.path.basename(f["path"]): f["error"] for f in st["failures"]}
        assert reasons["empty.png"] == "empty file"
        assert "identify" in reasons["bad.jpg"]
        assert "truncated" in reasons["trunc.jpg"]
        # unchanged failures are not retried; a fixed file is
        again = eng.index_folder(photo_dir)
        assert (again.failed, again.encoded) == (0, 0)
        noise_image(55).save(photo_dir / "bad.jpg", "JPEG")
        fixed = eng.index_folder(photo_dir)
        assert (fixed.updated, fixed.encoded, fixed.failed) == (1, 1, 0)


def test_scan_options(tmp_path, tiny_model, photo_dir):
    hidden = photo_dir / ".cache"
    hidden.mkdir()
    noise_image(70).save(hidden / "h.jpg")
    (photo_dir / "b" / "notes.txt").write_text("x")
    os.symlink(photo_dir, photo_dir / "b" / "loop")  # a symlink loop
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.index_folder(photo_dir, exclude=["a/*"])
        # b/ only: hidden .cache skipped, notes.txt not an image, and the loop
        # back to the root is not walked again
        assert rep.scanned == 6
    with Engine.open(tmp_path / "lib2", model=tiny_model) as eng:
        rep = eng.index_folder(photo_dir, exclude=["a", "loop"], include_hidden=True)
        assert rep.scanned == 7  # b/ (6) + .cache/h.jpg


def test_errors_are_clear(tmp_path, tiny_model):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        with pytest.raises(LibraryError, match="nothing is indexed"):
            eng.search_text("x")
        with pytest.raises(LibraryError, match="no such file"):
            eng.index_folder(tmp_path / "nope")
        (tmp_path / "empty").mkdir()
        eng.index_folder(tmp_path / "empty")
        with pytest.raises(QueryError, match="does not exist"):
            eng.search_image(tmp_path / "missing.jpg")
        with pytest.raises(QueryError, match="target"):
            eng.search_text("x", target="sounds")


def test_model_retrained_in_place_drops_its_old_vectors(tmp_path, photo_dir, caplog):
    from conftest import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model", seed=0)
    spec, lib = f"local-dir:{model_dir}", tmp_path / "lib"
    corpus = tmp_path / "caps.txt"
    corpus.write_text("a red circle\na green star\n")
    with Engine.open(lib, model=spec) as eng:
        eng.index_folder(photo_dir)
        eng.add_texts(corpus)
        eng.search_text("a photo of noise", k=3)  # caches the query's vector
        old = eng.encoder.encode_texts(["a photo of noise"])[0]
    with Engine.open(lib, model=spec) as eng:  # same weights: everything kept
        assert eng.status()["models"][0]["image_vectors"] == 12 and not eng.state().weights_changed
    (model_dir / "open_clip_model.safetensors").unlink()  # retrained in place: same spec, new weights
    write_tiny_model(model_dir, seed=3)
    with Engine.open(lib, model=spec) as eng:
        state = eng.state()
        assert state.weights_changed and "weights of model" in caplog.text
        assert eng.status()["models"] == [] and not state.dir.exists()
        assert eng.store.text_vector(state.spec.spec, "a photo of noise") is None  # cached query vector gone too
        with pytest.raises(LibraryError, match="since its weights changed"):
            eng.search_text("a photo of noise", k=3)
        rep = eng.index_folder(photo_dir)
        assert rep.encoded == 12
        eng.add_texts(corpus)
        assert eng.status()["models"][0]["text_vectors"] == 2
        q = eng.encoder.encode_texts(["a photo of noise"])[0]
        assert not np.allclose(q, old)
        hits = eng.search_text("a photo of noise", k=5)
        assert [h.path for h in hits] == brute_force(eng, photo_dir, q, 5)  # searched with the new weights' vectors
    with Engine.open(lib, model=spec) as eng:  # and recorded: no second drop
        assert not eng.state().weights_changed and eng.status()["models"][0]["image_vectors"] == 12


def test_weights_change_survives_a_crash_while_dropping(tmp_path, photo_dir, monkeypatch):
    from conftest import write_tiny_model

    from retrieval.store import Store

    model_dir = write_tiny_model(tmp_path / "model", seed=0)
    spec, lib = f"local-dir:{model_dir}", tmp_path / "lib"
    with Engine.open(lib, model=spec) as eng:
        eng.index_folder(photo_dir)
    (model_dir / "open_clip_model.safetensors").unlink()
    write_tiny_model(model_dir, seed=3)

    def crash(self, spec):
        raise KeyboardInterrupt  # killed after the files went, before the rows did

    with monkeypatch.context() as m:
        m.setattr(Store, "forget_model", crash)
        with pytest.raises(KeyboardInterrupt):
            Engine.open(lib, model=spec).state()
    with Engine.open(lib, model=spec) as eng:  # the next open drops again, then works
        assert eng.state().weights_changed and eng.status()["models"] == []
        assert eng.index_folder(photo_dir).encoded == 12
