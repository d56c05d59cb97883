"""Text corpora, every query direction, combined queries, filters, history,
models side by side, removal, and the schema upgrade from revision 0001."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval import Engine, LibraryError, SearchQuery, Term
from retrieval.cli import cli
from retrieval.corpus import read_corpus
from retrieval.imageio import load_image

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a purple star above a cross", "an orange hexagon"]


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "caps.jsonl"
    lines = [json.dumps({"text": t, "id": f"c{i}", "source": "test"}) for i, t in enumerate(CAPTIONS)]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"no_text": 1}))
    p.write_text("\n".join(lines) + "\n\n")
    return p


def test_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n  two  words \none\n")
    rec = read_corpus(tmp_path / "a.txt")
    assert [r.text for r in rec.records] == ["one", "two words", "one"] and rec.errors == []
    (tmp_path / "b.csv").write_text('id,text,price\nx1,"a red, round thing",3\nx2,a box,4\nx3,bad\nx1,a red ball,5\n')
    rec = read_corpus(tmp_path / "b.csv")
    assert {r.ext_id: r.text for r in rec.records} == {"x1": "a red ball", "x2": "a box"}  # duplicate id: last wins
    assert rec.records[1].meta == {"price": "5"}
    assert rec.errors == ["line 4: expected 3 fields"]


def test_add_texts_reports_malformed_lines_and_updates(tmp_path, tiny_model, corpus_file, backend):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.add_texts(corpus_file, corpus="caps")
        assert (rep.added, rep.failed) == (5, 2)
        assert rep.errors[0].startswith("line 3: invalid JSON") and rep.errors[1].startswith("line 5:")
        assert len(eng.state().texts) == 5
        again = eng.add_texts(corpus_file, corpus="caps")
        assert (again.added, again.unchanged, again.updated) == (0, 5, 0)
        corpus_file.write_text(json.dumps({"text": "a yellow circle", "id": "c0"}) + "\n" + json.dumps({"text": "new", "id": "c9"}) + "\n")
        upd = eng.add_texts(corpus_file, corpus="caps", replace=True)
        assert (upd.updated, upd.added, upd.removed) == (1, 1, 4)
        hits = eng.search_text("a yellow circle", k=10, target="texts")
        assert sorted(h.text for h in hits) == ["a yellow circle", "new"]
        assert hits[0].text == "a yellow circle" and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_every_direction_finds_the_known_item(tmp_path, tiny_model, photo_dir, corpus_file, backend):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        eng.add_texts(corpus_file, corpus="caps")
        enc = eng.encoder
        img = photo_dir / "a" / "img06.png"
        # text -> text: a text's own words come back first
        t2t = eng.search_text("an orange hexagon", k=3, target="texts")
        assert t2t[0].text == "an orange hexagon" and t2t[0].kind == "text" and t2t[0].corpus == "caps"
        # image -> image: an identical copy elsewhere comes back first
        copy = tmp_path / "query.bmp"  # same pixels, other bytes: not the query itself
        load_image(img).image.save(copy)
        assert eng.search_image(str(copy), k=1)[0].path == str(img)
        # image -> text: the caption whose vector is closest to the image
        iv = enc.encode_pil([load_image(img, enc.image_size).image])[0]
        tv = enc.encode_texts(CAPTIONS)
        i2t = eng.search_image(str(img), k=5, target="texts")
        assert [h.text for h in i2t] == [CAPTIONS[i] for i in np.argsort(-(tv @ iv))]
        # text -> image: the image whose vector is closest to the text
        t2i = eng.search_text(CAPTIONS[0], k=1)[0]
        paths = sorted(str(p) for p in photo_dir.rglob("*.*"))
        iv_all = enc.encode_pil([load_image(p, enc.image_size).image for p in paths])
        assert t2i.path == paths[int(np.argmax(iv_all @ tv[0]))]


def test_weighted_terms_equal_the_hand_computed_sum(tmp_path, tiny_model, photo_dir):
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        enc = eng.encoder
        img = photo_dir / "b" / "img05.jpg"
        q = SearchQuery(text="beach", terms=(Term(2.0, text="sunset"), Term(-0.5, image=str(img))), k=4)
        got = eng.query_vector(q)
        iv = enc.encode_pil([load_image(img, enc.image_size).image])[0]
        want = enc.encode_texts(["beach"])[0] + 2.0 * enc.encode_texts(["sunset"])[0] - 0.5 * iv
        np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-5)
        hits = eng.search(q).hits
        paths = sorted(str(p) for p in photo_dir.rglob("*.*"))
        vecs = enc.encode_pil([load_image(p, enc.image_size).image for p in paths])
        assert [h.path for h in hits] == [paths[i] for i in np.argsort(-(vecs @ got))[:4]]


def test_filters_restrict_before_ranking_and_return_k(tmp_path, tiny_model, photo_dir, corpus_file, backend):
    old = photo_dir / "a" / "img00.png"
    os.utime(old, (dt.datetime(2020, 1, 1).timestamp(),) * 2)
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        eng.add_texts(corpus_file, corpus="caps")
        eng.add_texts(corpus_file, corpus="other")
        hits = eng.search(SearchQuery(text="x", k=6, path_glob="a/*")).hits
        assert len(hits) == 6 and all("/a/" in h.path for h in hits)
        hits = eng.search(SearchQuery(text="x", k=5, until=dt.datetime(2021, 1, 1))).hits
        assert [h.path for h in hits] == [str(old)]
        hits = eng.search(SearchQuery(text="x", k=20, since=dt.datetime(2021, 1, 1))).hits
        assert len(hits) == 11 and str(old) not in [h.path for h in hits]
        hits = eng.search(SearchQuery(text="a red circle", k=5, target="texts", corpus="other")).hits
        assert len(hits) == 5 and {h.corpus for h in hits} == {"other"}


def test_history_round_trips(tmp_path, tiny_model, photo_dir, backend):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        res = eng.search(SearchQuery(text="sunny", k=3, terms=(Term(2.0, text="sea"),), path_glob="b/*"))
        shown = eng.show(res.query_id)
        assert shown.hits == res.hits and shown.query == res.query
        q = eng.history(1)[0]
        assert (q.text, q.k, q.target, q.model) == ("sunny", 3, "images", tiny_model)
        assert q.terms == [{"weight": 2.0, "text": "sea", "image": None}] and q.filters == {"path": "b/*"}
        assert q.seconds > 0
    runner = CliRunner()
    out = runner.invoke(cli, ["--library", str(lib), "show", str(res.query_id), "--json"])
    assert json.loads(out.stdout)["hits"] == [h.to_json() for h in res.hits]
    out = runner.invoke(cli, ["--library", str(lib), "history"])
    assert "sunny" in out.stdout and out.exit_code == 0


def test_models_side_by_side_and_default(tmp_path, tiny_model, tiny_model_b, photo_dir):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        hits_a = eng.search_text("x", k=3)
    with Engine.open(lib, model=tiny_model_b) as eng:
        rep = eng.index_folder(photo_dir)
        assert (rep.unchanged, rep.encoded) == (12, 12)
        st = eng.status()
        assert [(m["spec"], m["image_vectors"]) for m in st["models"]] == [(tiny_model, 12), (tiny_model_b, 12)]
        assert st["default_model"] == tiny_model
    with Engine.open(lib) as eng:  # the default model, untouched by the second
        assert eng.model_spec == tiny_model
        assert [h.id for h in eng.search_text("x", k=3)] == [h.id for h in hits_a]
        eng.set_default_model(tiny_model_b)
    with Engine.open(lib) as eng:
        assert eng.model_spec == tiny_model_b


def test_removal_from_store_and_every_index(tmp_path, tiny_model, tiny_model_b, photo_dir, corpus_file, backend):
    lib = tmp_path / "lib"
    for m in (tiny_model, tiny_model_b):
        with Engine.open(lib, model=m) as eng:
            eng.index_folder(photo_dir)
            eng.add_texts(corpus_file, corpus="caps")
    with Engine.open(lib, model=tiny_model) as eng:
        assert eng.remove_images([photo_dir / "a"]) == 6
        assert eng.remove_texts("caps") == 5
        with pytest.raises(LibraryError, match="no corpus"):
            eng.remove_texts("caps")
    for m in (tiny_model, tiny_model_b):
        with Engine.open(lib, model=m) as eng:
            assert len(eng.state().images) == 6 and len(eng.state().texts) == 0
            assert all("/b/" in h.path for h in eng.search_text("x", k=20))


def test_library_from_revision_0001_upgrades_with_rows_intact(tmp_path, tiny_model, photo_dir):
    from retrieval.store import make_engine, upgrade

    lib = tmp_path / "lib"
    lib.mkdir()
    engine = make_engine(lib / "library.db")
    upgrade(engine, "0001")  # a library as the first release wrote it
    with engine.begin() as con:
        con.exec_driver_sql("insert into models (id, spec, dim, created_at) values (1, ?, 32, '2026-01-01')", (tiny_model,))
        con.exec_driver_sql(
            "insert into images (id, path, size, mtime_ns, content_hash, status, indexed_at) "
            "values (7, '/old/a.jpg', 10, 1, 'h', 'failed', '2026-01-01')"
        )
    engine.dispose()
    with Engine.open(lib, model=tiny_model) as eng:
        row = eng.store.image_by_path("/old/a.jpg")
        assert row is not None and row.id == 7 and row.status == "failed" and row.taken_at is None
        assert eng.store.models()[0].spec == tiny_model
        eng.index_folder(photo_dir)
        assert eng.status()["images"] == 13
    con = sqlite3.connect(lib / "library.db")
    assert con.execute("select version_num from alembic_version").fetchone()[0] == "0006"


def test_repeated_text_query_needs_no_encoder(tmp_path, tiny_model, photo_dir, backend):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        first = eng.search_text("a cat on a mat", k=4)
    with Engine.open(lib, model=tiny_model) as eng:
        again = eng.search(SearchQuery(text="a cat on a mat", k=4, path_glob="*"))
        assert eng.state()._encoder is None  # the vector came from the history
        assert [h.id for h in again.hits] == [h.id for h in first]
        eng.search_text("a new query", k=1)
        assert eng.state()._encoder is not None
