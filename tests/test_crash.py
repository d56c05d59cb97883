"""kill -9 while indexing: the next run reconciles store and index and resumes
without redoing work saved at the last checkpoint."""

from __future__ import annotations


from conftest import kill_indexing_when, vector_rows, noise_image

from retrieval import Engine


def test_kill_during_indexing_then_resume(tmp_path, tiny_model):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        noise_image(1000 + i, (96, 96)).save(folder / f"{i:04d}.png")
    lib = tmp_path / "lib"
    db = lib / "library.db"
    kill_indexing_when(folder, lib, tiny_model, lambda: db.exists() and vector_rows(db) >= 40)
    done_before = vector_rows(db)
    assert 40 <= done_before < 400

    with Engine.open(lib, model=tiny_model) as eng:
        rep = eng.index_folder(folder)
        state = eng.state()
        in_index = set(state.images.ids().tolist())
        rows = set(eng.store.image_vector_map(state.row.id))
        ok = set(eng.store.image_ids("ok"))
        assert in_index == rows == ok and len(ok) == 400
        # work committed before the kill is not redone (at most one batch past it)
        assert rep.encoded <= 400 - done_before
        # rows left pending by the kill are reported as added (searchable now), never as unchanged
        assert rep.added == rep.encoded and rep.added + rep.unchanged == 400
        hits = eng.search_image(str(folder / "0007.png"), k=3)
        assert len(hits) == 3


def test_orphan_vectors_are_reconciled(tmp_path, tiny_model, photo_dir):
    """A vector saved to the index after the last commit is adopted if its
    image row exists, and dropped if it does not."""
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        state = eng.state()
        model_id = state.row.id
        some = sorted(eng.store.image_vector_map(model_id))[:3]
        eng.store.delete_image_vectors(model_id, some)  # as if the commit never happened
        vec = state.images.reconstruct([some[0]])
        state.images.add([99999], vec)  # a vector whose image row does not exist
        # the index is saved, then the process dies before its commit
        (state.dir / "images.generation").write_text("dirty")
        state.images.save(state.dir / "images.faiss")
        eng.store.commit()
    with Engine.open(lib, model=tiny_model) as eng:
        state = eng.state()
        ids = set(state.images.ids().tolist())
        assert 99999 not in ids
        assert set(eng.store.image_vector_map(state.row.id)) == ids and len(ids) == 12
        assert eng.index_folder(photo_dir).encoded == 0


def test_orphan_text_vectors_are_reconciled(tmp_path, tiny_model):
    """The text index reconciles like the image index: vectors the saved index
    lacks are put back from the store (nothing re-encoded), vectors of texts
    that do not exist are removed."""
    corpus = tmp_path / "caps.txt"
    corpus.write_text("a red circle\na blue square\ntwo green triangles\na purple star\n")
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        assert eng.add_texts(corpus, corpus="caps").added == 4
        state = eng.state()
        lost = sorted(eng.store.text_vector_map(state.row.id))[:2]
        vec = state.texts.reconstruct(lost[:1])
        state.texts.remove(lost)  # the index was saved before these vectors were added...
        state.texts.add([99999], vec)  # ...and holds one of a text that never got a row
        (state.dir / "texts.generation").write_text("dirty")
        state.texts.save(state.dir / "texts.faiss")
    with Engine.open(lib, model=tiny_model) as eng:
        state = eng.state()
        ids = set(state.texts.ids().tolist())
        assert 99999 not in ids and len(ids) == 4
        assert set(eng.store.text_vector_map(state.row.id)) == ids
        assert eng.add_texts(corpus, corpus="caps").unchanged == 4
        assert len(eng.state().texts) == 4
        assert eng.search_text("a red circle", k=1, target="texts")[0].text == "a red circle"


def test_clean_library_opens_without_reconciliation(tmp_path, tiny_model, photo_dir, monkeypatch):
    from retrieval.durability import IndexFiles

    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)

    def boom(*args, **kwargs):
        raise AssertionError("a cleanly closed library was reconciled")

    monkeypatch.setattr(IndexFiles, "reconcile", boom)
    monkeypatch.setattr(IndexFiles, "rebuild", boom)
    with Engine.open(lib, model=tiny_model) as eng:
        assert len(eng.search_text("x", k=12)) == 12
