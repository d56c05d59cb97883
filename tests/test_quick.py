"""The quick path of a CLI text search (retrieval/quick.py): the same hits and
history rows as the engine, and the engine whenever the case is not plain."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval import Engine, onnx_runtime, quick
from retrieval.quick import quick_search
from retrieval.types import SearchQuery, Term

from conftest import noise_image

BAD_NAME = os.fsdecode(b"caf\xe9-\xff.png")  # not UTF-8


@pytest.fixture
def library(tmp_path, tiny_model, photo_dir) -> Path:
    """12 images (one named in Latin-1 bytes), 4 texts, the tiny model (no reranker) with its export."""
    noise_image(99).save(os.path.join(os.fsdecode(bytes(photo_dir)), BAD_NAME))
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red circle\na blue square\nnoise on a screen\na green triangle\n")
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        eng.add_texts(corpus, corpus="captions")
    return lib


def _stored(lib: Path, qid: int) -> tuple[tuple, list[tuple], np.ndarray]:
    with sqlite3.connect(lib / "library.db") as con:
        q = con.execute(
            "SELECT model, text, image_path, typeof(image_path), target, terms, typeof(terms), filters, typeof(filters),"
            " k, candidates, reranked, text_tokens FROM queries WHERE id = ?", (qid,)).fetchone()
        vec = con.execute("SELECT text_vector FROM queries WHERE id = ?", (qid,)).fetchone()[0]
        r = con.execute("SELECT rank, kind, item_id, CAST(path AS BLOB), typeof(path), text, typeof(text), score,"
                        " rerank_score FROM results WHERE query_id = ? ORDER BY rank", (qid,)).fetchall()
    return q, r, np.frombuffer(vec, np.float32)


def _queries(lib: Path) -> int:
    with sqlite3.connect(lib / "library.db") as con:
        return con.execute("SELECT COUNT(*) FROM queries").fetchone()[0]


@pytest.mark.parametrize("target", ["images", "texts"])
def test_same_hits_and_history_rows_as_the_engine(library, tmp_path, target):
    twin = tmp_path / "twin"
    shutil.copytree(library, twin)
    q = SearchQuery(text="a photo of noise", target=target, k=20)
    fast = quick_search(library, None, q)
    with Engine.open(twin) as eng:
        slow = eng.search(q)
    assert fast is not None and fast.query_id is not None and slow.query_id is not None
    assert len(fast.hits) == (13 if target == "images" else 4)
    assert [(h.rank, h.kind, h.id, h.path, h.text, h.corpus) for h in fast.hits] == \
        [(h.rank, h.kind, h.id, h.path, h.text, h.corpus) for h in slow.hits]
    assert np.allclose([h.score for h in fast.hits], [h.score for h in slow.hits], atol=1e-5)
    assert (fast.query, fast.model, fast.reranked, fast.notes) == (slow.query, slow.model, slow.reranked, slow.notes)
    if target == "images":
        assert BAD_NAME in {os.path.basename(h.path) for h in fast.hits}
        assert fast.notes and "has no reranker" in fast.notes[0]
    q_fast, r_fast, v_fast = _stored(library, fast.query_id)
    q_slow, r_slow, v_slow = _stored(twin, slow.query_id)
    assert q_fast == q_slow
    assert float(v_fast @ v_slow) > 0.9999
    assert [r[:7] for r in r_fast] == [r[:7] for r in r_slow]  # paths as the same bytes, of the same type
    assert np.allclose([r[7] for r in r_fast], [r[7] for r in r_slow], atol=1e-5)
    with Engine.open(library) as eng:  # history and show read what the quick path wrote
        assert eng.history(1)[0].id == fast.query_id and eng.history(1)[0].text == "a photo of noise"
        shown = eng.show(fast.query_id)
        assert [(h.id, h.path, h.text) for h in shown.hits] == [(h.id, h.path, h.text) for h in fast.hits]


def test_a_text_asked_before_is_not_encoded_again(library, monkeypatch):
    q = SearchQuery(text="noise again", k=3, rerank=False)
    first = quick_search(library, None, q)

    def refuse(*a, **k):
        raise AssertionError("the text tower was loaded for a text asked before")

    monkeypatch.setattr(onnx_runtime, "_new_session", refuse)
    again = quick_search(library, None, q)
    assert first is not None and again is not None and again.query_id == first.query_id + 1
    assert [(h.id, h.score) for h in again.hits] == [(h.id, h.score) for h in first.hits]
    assert again.notes == ()


def _set(lib: Path, sql: str, *args) -> None:
    with sqlite3.connect(lib / "library.db") as con:
        con.execute(sql, args)


def _spec(lib: Path) -> str:
    with sqlite3.connect(lib / "library.db") as con:
        return con.execute("SELECT value FROM settings WHERE key = 'default_model'").fetchone()[0]


def _model_dir(lib: Path) -> Path:
    (folder,) = [p for p in (lib / "models").iterdir() if p.is_dir()]
    return folder


NOT_PLAIN = {
    "image": lambda lib, photos: SearchQuery(image=str(next(photos.rglob("*.png")))),
    "terms": lambda lib, photos: SearchQuery(text="noise", terms=(Term(1.0, text="red"),)),
    "path filter": lambda lib, photos: SearchQuery(text="noise", path_glob="*/a/*"),
    "corpus": lambda lib, photos: SearchQuery(text="noise", target="texts", corpus="captions"),
    "dedup": lambda lib, photos: SearchQuery(text="noise", dedup=True),
    "threshold": lambda lib, photos: SearchQuery(text="noise", threshold=0.5),
    "reranker": lambda lib, photos: SearchQuery(text="noise", reranker="hf-hub:Salesforce/blip-itm-base-coco"),
}


@pytest.mark.parametrize("case", sorted(NOT_PLAIN))
def test_queries_that_are_not_plain_text_go_to_the_engine(library, photo_dir, case):
    assert quick_search(library, None, NOT_PLAIN[case](library, photo_dir)) is None
    assert _queries(library) == 0


def _stale_generation(lib: Path) -> None:
    _set(lib, "UPDATE settings SET value = '123' WHERE key LIKE 'generation:%:images'")


def _foreign_sidecar(lib: Path) -> None:
    side = _model_dir(lib) / "images.generation"
    side.write_text(json.dumps({**json.loads(side.read_text()), "library": "another"}))


def _missing_vector_row(lib: Path) -> None:  # the index holds a vector the store does not: the engine reconciles
    _set(lib, "DELETE FROM image_vectors WHERE rowid = (SELECT MIN(rowid) FROM image_vectors)")


SITUATIONS = {
    "switched off": lambda lib, mp: mp.setenv("CROSSFIND_QUICK", "0"),
    "torch only": lambda lib, mp: mp.setenv("CROSSFIND_ONNX", "0"),
    "database url": lambda lib, mp: mp.setenv("CROSSFIND_DATABASE_URL", "postgresql+psycopg://u@nowhere/db"),
    "schema behind": lambda lib, mp: _set(lib, "UPDATE alembic_version SET version_num = '0001'"),
    "weights changed": lambda lib, mp: _set(lib, "UPDATE settings SET value = 'other' WHERE key LIKE 'weights:%'"),
    "stale index": lambda lib, mp: _stale_generation(lib),
    "foreign index": lambda lib, mp: _foreign_sidecar(lib),
    "count differs": lambda lib, mp: _missing_vector_row(lib),
    "no index file": lambda lib, mp: (_model_dir(lib) / "images.faiss").unlink(),
    "compressed index": lambda lib, mp: (_model_dir(lib) / "images.pq.json").write_text("{}"),
    "shard servers": lambda lib, mp: _set(lib, "INSERT INTO settings VALUES (?, 'h:1')", f"shard-servers:{_spec(lib)}:images"),
    "chosen reranker": lambda lib, mp: _set(lib, "INSERT INTO settings VALUES (?, 'hf-hub:x/y')", f"reranker:{_spec(lib)}"),
    "no export": lambda lib, mp: shutil.rmtree(_model_dir(lib) / "onnx"),
    "no default model": lambda lib, mp: _set(lib, "DELETE FROM settings WHERE key = 'default_model'"),
}


@pytest.mark.parametrize("case", sorted(SITUATIONS))
def test_anything_but_the_plain_case_goes_to_the_engine_and_writes_nothing(library, monkeypatch, case):
    SITUATIONS[case](library, monkeypatch)
    assert quick_search(library, None, SearchQuery(text="a photo of noise")) is None
    assert _queries(library) == 0


def test_an_unknown_model_goes_to_the_engine(library, tiny_model_b):
    assert quick_search(library, None, SearchQuery(text="noise"), model=tiny_model_b) is None


def test_a_locked_library_still_answers_and_says_it_kept_no_history(library, monkeypatch):
    monkeypatch.setattr(quick, "BUSY_TIMEOUT_S", 0.2)
    other = sqlite3.connect(library / "library.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a writer holds the database
    try:
        res = quick_search(library, None, SearchQuery(text="a photo of noise", k=3))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert res is not None and len(res.hits) == 3 and res.query_id is None
    assert res.notes[-1] == "this search was not added to the history: database is locked"
    assert _queries(library) == 0


def _cli(lib: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from retrieval.cli import main; main()", "--library", str(lib), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_cli_search_prints_what_the_engine_prints(library, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(library, twin)
    for args in (["search", "a photo of noise", "-k", "4", "--json"], ["search", "a red thing", "--target", "texts"]):
        fast = _cli(library, *args)
        slow = _cli(twin, *args, env={"CROSSFIND_QUICK": "0"})
        assert fast.returncode == slow.returncode == 0, fast.stderr + slow.stderr
        assert fast.stderr == slow.stderr
        if "--json" in args:
            a, b = json.loads(fast.stdout), json.loads(slow.stdout)
            assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]] and len(a["hits"]) == 4
            assert {k: v for k, v in a.items() if k != "hits"} == {k: v for k, v in b.items() if k != "hits"}
        else:
            assert [line.split()[-1] for line in fast.stdout.splitlines()] == [line.split()[-1] for line in slow.stdout.splitlines()]
    assert _queries(library) == _queries(twin) == 2


def test_cli_quick_search_imports_no_sqlalchemy(library):
    probe = (
        "import sys, io, contextlib, json\nfrom retrieval.cli import main\nbuf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    main(['--library', {str(library)!r}, 'search', 'a brand new text', '--json'])\n"
        "print(json.dumps({m: m in sys.modules for m in ('sqlalchemy', 'alembic', 'torch', 'faiss', 'onnxruntime')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == \
        {"sqlalchemy": False, "alembic": False, "torch": False, "faiss": True, "onnxruntime": True}
