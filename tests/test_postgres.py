"""The store on PostgreSQL (issue 19, part 1), against a real server
(tests/pgserver.py): every Alembic revision up and down, paths and globs as
SQLite has them, the folder bound to its database, the password never
shown, and writers on several folders (machines) taking turns through the
database's advisory lock. The engine and CLI suites run on both stores too
(the ``backend`` fixture)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image
from sqlalchemy import inspect, select, text

from retrieval import Engine, LibraryBusy, LibraryError, QueryError
from retrieval.dialect import AdvisoryLock, glob_match, glob_regex, mask_url
from retrieval.store import Image, Store, alembic_config, make_engine, open_store, upgrade, utcnow

CLI = [sys.executable, "-c", "from retrieval.cli import main; main()"]


def crossfind(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "CROSSFIND_DATABASE_URL"} | (env or {})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=full)


def with_password(url: str, password: str) -> str:
    return url.replace("crossfind@", f"crossfind:{password}@", 1)


# ----------------------------------------------------------------- schema
def test_every_revision_runs_up_and_down(pg_db, tmp_path):
    """Each revision on its own, both ways, on both databases; at head PostgreSQL
    has bytea paths and 64-bit sizes, SQLite the same TEXT/INTEGER columns as before."""
    from alembic import command
    from alembic.script import ScriptDirectory

    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(alembic_config()).walk_revisions()))]
    assert revisions[0] == "0001" and len(revisions) >= 6
    for url in (pg_db, str(tmp_path / "library.db")):
        engine = make_engine(url)
        try:
            cfg = alembic_config(engine)
            for rev in revisions:
                command.upgrade(cfg, rev)
            for rev in reversed(revisions[:-1]):
                command.downgrade(cfg, rev)
            command.downgrade(cfg, "base")
            assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
            command.upgrade(cfg, "head")
            cols = {c["name"]: c["type"] for c in inspect(engine).get_columns("images")}
            crc = {c["name"]: c["type"] for c in inspect(engine).get_columns("image_vectors")}["token_crc"]
            names = {engine.dialect.name: (type(cols["path"]).__name__, type(cols["mtime_ns"]).__name__, type(crc).__name__)}
            if engine.dialect.name == "postgresql":
                assert names["postgresql"] == ("BYTEA", "BIGINT", "BIGINT")
            else:
                assert names["sqlite"] == ("VARCHAR", "INTEGER", "INTEGER")
        finally:
            engine.dispose()


def test_rows_written_before_0006_keep_their_paths(pg_db):
    engine = make_engine(pg_db)
    upgrade(engine, "0005")
    with engine.begin() as con:
        con.execute(text("INSERT INTO images (path, size, mtime_ns, content_hash, status, indexed_at) "
                         "VALUES ('/fotos/Ünïcode/a.jpg', 10, 1, 'h', 'ok', now())"))
    engine.dispose()
    store = open_store(pg_db)
    try:
        row = store.image_by_path("/fotos/Ünïcode/a.jpg")
        assert row is not None and row.path == "/fotos/Ünïcode/a.jpg"
        row.mtime_ns = 1_796_345_631_704_871_232  # nanoseconds since 1970: past 32 bits
        row.size = 5 * 2**30
        store.commit()
        store.session.expire_all()
        assert (store.image_by_path(row.path).mtime_ns, store.image_by_path(row.path).size) == (1_796_345_631_704_871_232, 5 * 2**30)
    finally:
        store.close()


# ------------------------------------------------------------ paths, globs
PATHS = [
    "/p/a/x.jpg", "/p/a/y.PNG", "/p/a/sub/z.jpg", "/p/a0/w.jpg", "/p/a-b/v.jpg", "/p/ab.jpg",
    "/p/ünï/ç.jpg", "/p/日本/写真.jpg", "/p/x (1)+[2].jpg", "/p/dot.file.jpg", "/p/new\nline.jpg",
    os.fsdecode(b"/p/caf\xe9/\xff.jpg"), "/p/star*q?.jpg", "/p/back\\slash.jpg", "/p/^$.jpg",
]
GLOBS = [
    "*", "/p/a/*", "*/a/*", "*.jpg", "*.JPG", "*.[jJ]pg", "*.[!p]*", "*[^j]pg", "*/?.jpg", "*/??.jpg", "*/?/*",
    "*ü*", "*/日本/*", "*[日本]*", "*(1)+[[]2].jpg", "*[*]*", "*[?]*", "*\\*", "/p/^$.jpg", "*dot.file*",
    "*dot?file*", "*[a-c]/*", "*[^a-c]/*", "*\n*", "*[]]*", "*[", os.fsdecode(b"*caf\xe9/*"), "*/?.jpg",
    "/p/a", "*[-]*", "*[a-]*",
]


def _stores(pg_db: str, tmp_path: Path) -> list[Store]:
    stores = [open_store(tmp_path / "library.db"), open_store(pg_db)]
    for store in stores:
        for i, p in enumerate(PATHS):
            store.session.add(Image(path=p, size=1, mtime_ns=1, content_hash=str(i), status="ok", indexed_at=utcnow()))
        store.commit()
    return stores


def test_globs_and_path_ranges_match_sqlite(pg_db, tmp_path):
    """``--path`` globs, folder ranges and byte order give on PostgreSQL exactly what SQLite's GLOB gives."""
    stores = _stores(pg_db, tmp_path)
    try:
        for pattern in GLOBS:
            got = [sorted(s.session.scalars(select(Image.path).where(glob_match(Image.path, pattern)))) for s in stores]
            assert got[1] == got[0], (pattern, glob_regex(pattern))
        # the comparisons above mean something: these match what a reader expects
        sqlite = stores[0]
        assert sorted(sqlite.session.scalars(select(Image.path).where(glob_match(Image.path, "*/a/*")))) == [
            "/p/a/sub/z.jpg", "/p/a/x.jpg", "/p/a/y.PNG"]
        assert list(sqlite.session.scalars(select(Image.path).where(glob_match(Image.path, os.fsdecode(b"*caf\xe9/*"))))) == [PATHS[11]]
        for root in ("/p/a", "/p/a/", "/p", os.fsdecode(b"/p/caf\xe9")):
            got = [sorted(r.path for r in s.images_under([root])) for s in stores]
            assert got[1] == got[0] and got[0], root
        orders = [list(s.session.scalars(select(Image.path).order_by(Image.path))) for s in stores]
        assert orders[1] == orders[0] == sorted(PATHS, key=lambda p: p.encode("utf-8", "surrogateescape"))
        assert stores[1].image_by_path(PATHS[11]).path == PATHS[11]  # not UTF-8: byte for byte
    finally:
        for s in stores:
            s.close()


# ---------------------------------------------------- binding and secrets
def test_a_folder_is_bound_to_its_database(pg_server, tmp_path, tiny_model, photo_dir):
    one, two = pg_server.new_database(), pg_server.new_database()
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model, db=one) as eng:
        eng.index_folder(photo_dir)
        library = eng.store.library_id
    binding = json.loads((lib / "store.json").read_text())
    assert binding["library"] == library and not (lib / "library.db").exists()
    with pytest.raises(LibraryError, match=f"belongs to library {library}"):
        Engine.open(lib, db=two)
    with pytest.raises(LibraryError, match="keeps its store in postgresql"):
        Engine.open(lib, db="sqlite")
    assert not (lib / "library.db").exists()
    with Engine.open(tmp_path / "plain", model=tiny_model, db="sqlite") as eng:
        eng.index_folder(photo_dir)
    with pytest.raises(LibraryError, match="holds a SQLite library"):
        Engine.open(tmp_path / "plain", db=two)
    with Engine.open(lib, model=tiny_model, db=one) as eng:  # the right pair still opens, nothing lost
        assert eng.status()["images_ok"] == 12 and len(eng.search_text("x", k=20)) == 12


def test_the_password_is_never_shown(pg_db, tmp_path):
    secret = "s3cr3t-Pa55"
    url = with_password(pg_db, secret)  # trust authentication: the server ignores it
    lib = tmp_path / "lib"
    r = crossfind("--library", str(lib), "--db", url, "status", "--json")
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr and json.loads(r.stdout)["store"] == mask_url(url)
    assert "***" in mask_url(url) and secret not in (lib / "store.json").read_text()
    code = ("import sys\nfrom retrieval.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, 'status imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code, "--library", str(lib), "status"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "CROSSFIND_DATABASE_URL": url})
    assert r.returncode == 0 and "store: postgresql+psycopg://crossfind:***@/" in r.stdout and secret not in r.stdout, r.stderr
    # a server that cannot be reached: one line, exit 1, no password
    bad = f"postgresql+psycopg://someone:{secret}@127.0.0.1:1/nothing"
    r = crossfind("--library", str(tmp_path / "other"), "--db", bad, "status", timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert secret not in r.stdout + r.stderr and "someone:***@127.0.0.1:1/nothing" in r.stderr
    r = crossfind("--library", str(tmp_path / "third"), "--db", "mysql://u:" + secret + "@h/x", "status")
    assert r.returncode == 1 and "SQLite or PostgreSQL" in r.stderr and secret not in r.stderr
    for url in ("postgresql+psycopg://u:p%40ss%3Aw@h:5/db?sslmode=require", "postgresql://u:plain@h/db", "postgresql://u:a@b@h/db",
                "postgresql+psycopg://u@h/db?password=plain&sslmode=require"):
        shown = mask_url(url)
        assert "***" in shown and "p%40ss" not in shown and "plain" not in shown and ":a@" not in shown, shown


# ------------------------------------------------- several folders, one db
def _ranked(eng: Engine, query: str) -> list[str]:
    return [h.path for h in eng.search_text(query, k=50)]


def test_two_folders_share_one_database(pg_db, tmp_path, tiny_model):
    """A second folder (another machine) gets its indexes from the stored vectors;
    after either writes, the other searches what the database holds, an image
    changed in place included."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):
        noise_image(i).save(photos / f"{i}.png")
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    with Engine.open(a, model=tiny_model, db=pg_db) as eng:
        eng.index_folder(photos)
        want = _ranked(eng, "red")
    with Engine.open(b, model=tiny_model, db=pg_db) as eng:
        assert _ranked(eng, "red") == want and len(want) == 10
        noise_image(100).save(photos / "extra.png")
        noise_image(200).save(photos / "3.png")  # same path, new content: same id, new vector
        eng.index_folder(photos)
        want = _ranked(eng, "red")
        vec_b = eng.state().images.reconstruct(np.array([eng.store.image_by_path(str(photos / "3.png")).id]))
    with Engine.open(a, model=tiny_model, db=pg_db) as eng:
        assert _ranked(eng, "red") == want and len(want) == 11
        i = eng.store.image_by_path(str(photos / "3.png")).id
        assert np.allclose(eng.state().images.reconstruct(np.array([i])), vec_b)
        assert eng.remove_images([str(photos / "0.png")]) == 1
    with Engine.open(b, model=tiny_model, db=pg_db) as eng:
        assert str(photos / "0.png") not in _ranked(eng, "red") and len(_ranked(eng, "red")) == 10


def test_the_writer_lock_spans_folders_and_dies_with_its_holder(pg_db, tmp_path, tiny_model):
    with Engine.open(tmp_path / "a", model=tiny_model, db=pg_db) as a, Engine.open(tmp_path / "b", model=tiny_model, db=pg_db) as b:
        with a.writer(wait=False):
            with pytest.raises(LibraryBusy):
                with b.writer(wait=False):
                    pass
        with b.writer(wait=False):  # free again
            pass
        library = a.store.library_id
    # a holder killed with SIGKILL: the server ends its session and the lock with it
    code = (
        "import sys, time; from retrieval.store import make_engine; from retrieval.dialect import AdvisoryLock;"
        f"lock = AdvisoryLock(make_engine(sys.argv[1]), {library!r}); assert lock.try_acquire();"
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, pg_db], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        probe = AdvisoryLock(make_engine(pg_db), library)
        assert not probe.try_acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
        deadline = time.time() + 30
        while not probe.try_acquire():
            assert time.time() < deadline, "the lock outlived its holder"
            time.sleep(0.1)
        probe.release()
        probe.engine.dispose()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_two_writer_processes_on_two_folders_lose_nothing(pg_db, tmp_path, tiny_model):
    """Two machines' writers at once, each with its own folder, one database:
    they take turns, and every image and text of both is in the store and in
    every folder's index."""
    folders = []
    for m in range(2):
        f = tmp_path / f"photos{m}"
        f.mkdir()
        for i in range(12):
            noise_image(1000 * m + i, (64, 64)).save(f / f"{i:02d}.png")
        (tmp_path / f"c{m}.txt").write_text("".join(f"text {m} number {j}\n" for j in range(20)))
        folders.append(f)
    libs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    with Engine.open(libs[0], model=tiny_model, db=pg_db) as eng:
        eng.set_default_model(tiny_model)
    env = {"CROSSFIND_DATABASE_URL": pg_db}
    code = (
        "import sys; from retrieval import Engine\n"
        "lib, folder, corpus = sys.argv[1:]\n"
        "with Engine.open(lib) as eng, eng.writer(on_wait=lambda: print('waited', file=sys.stderr)):\n"
        "    eng.index_folder(folder, batch_size=4, workers=1, checkpoint_seconds=0)\n"
        "    eng.add_texts(corpus)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(lib), str(folder), str(tmp_path / f"c{m}.txt")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
        for m, (lib, folder) in enumerate(zip(libs, folders))
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("waited" in err for _, err in outs) == 1, outs  # they overlapped, and one took its turn after the other
    for lib in [*libs, tmp_path / "machine-c"]:
        with Engine.open(lib, model=tiny_model, db=pg_db) as eng:
            state = eng.state()
            img, txt = state.images.ids(), state.texts.ids()
            assert len(img) == len(set(img.tolist())) == 24 and len(txt) == 40
            assert set(img.tolist()) == set(eng.store.image_vector_map(state.row.id)) == set(eng.store.image_ids("ok"))
            assert set(txt.tolist()) == set(eng.store.text_vector_map(state.row.id))
            top = state.images.search(state.images.reconstruct(img), 1).ids[:, 0]
            assert (top == img).all()


def test_nul_characters_are_refused_alike_on_both_stores(tmp_path, tiny_model, backend):
    """PostgreSQL text cannot hold NUL: a corpus line or query with one is refused
    on either store with a reason, and the rest goes in."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a red circle"}\n{"text": "bad \\u0000 text"}\n{"id": "x\\u0000", "text": "ok"}\n'
                      '{"text": "meta may", "note": "hold \\u0000"}\n')
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.add_texts(corpus)
        assert (rep.added, rep.failed) == (2, 2) and "line 2: contains a NUL" in rep.errors[0] and "line 3" in rep.errors[1]
        with pytest.raises(QueryError, match="NUL"):
            eng.search_text("a\x00b", target="texts")
        assert sorted(h.text for h in eng.search_text("red", k=5, target="texts")) == ["a red circle", "meta may"]
