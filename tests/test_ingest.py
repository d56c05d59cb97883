"""Input robustness of an index run: no file, file name or user mistake can
stop a run, hang it, or silently lose or hide images (issue 14)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrieval import Engine
from retrieval.errors import LibraryError, QueryError
from retrieval.fuzz import WRITERS, write_mutants, write_samples
from retrieval.indexing import Known, plan_changes
from retrieval.scan import FileInfo
from retrieval.cli import main

from conftest import noise_image

BAD_NAME = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8


def cli(args, lib, capsysbinary):
    """Run the real entry point; returns (exit status, stdout bytes, stderr text)."""
    try:
        main(["--library", str(lib), *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsysbinary.readouterr()
    return code, out, err.decode("utf-8", "replace")


# ----------------------------------------------------------------- the plan
def _f(path, size=1, mtime=1):
    return FileInfo(path, size, mtime)


def _k(i, path, h, size=1, mtime=1, status="ok", vec=None):
    return Known(i, path, size, mtime, h, status, vec if vec is not None else h)


def test_plan_sorts_every_kind_of_change():
    existing = {
        "/r/same.png": _k(1, "/r/same.png", "h1"),
        "/r/touched.png": _k(2, "/r/touched.png", "h2"),
        "/r/changed.png": _k(3, "/r/changed.png", "h3"),
        "/r/old-name.png": _k(4, "/r/old-name.png", "h4"),
        "/r/deleted.png": _k(5, "/r/deleted.png", "h5"),
        "/r/.hidden.png": _k(6, "/r/.hidden.png", "h6"),
    }
    files = [_f("/r/same.png"), _f("/r/touched.png", mtime=2), _f("/r/changed.png", 9), _f("/r/new-name.png"),
             _f("/r/copy.png"), _f("/r/fresh.png"), _f("/r/unreadable.png")]
    hashes = {"/r/touched.png": "h2", "/r/changed.png": "h3b", "/r/new-name.png": "h4", "/r/copy.png": "hx",
              "/r/fresh.png": "hf"}
    known = {"hx": [_k(9, "/elsewhere/x.png", "hx")]}
    plan = plan_changes(files, existing, hashes, known, still_on_disk=["/r/.hidden.png"])
    assert plan.unchanged == (1,)
    assert [(i, f.path) for i, f in plan.touched] == [(2, "/r/touched.png")]
    assert [(i, h) for i, _, h in plan.changed] == [(3, "h3b")]
    assert [(i, f.path) for i, f in plan.moved] == [(4, "/r/new-name.png")]
    assert plan.gone == (5,)
    assert plan.kept == ("/r/.hidden.png",)
    assert plan.unreadable == ("/r/unreadable.png",)
    new = {n.file.path: n for n in plan.new}
    assert set(new) == {"/r/copy.png", "/r/fresh.png"}
    assert new["/r/copy.png"].copies_vector and new["/r/copy.png"].source.id == 9
    assert new["/r/fresh.png"].source is None
    pruned = plan_changes(files, existing, hashes, known, still_on_disk=["/r/.hidden.png"], prune=True)
    assert set(pruned.gone) == {5, 6} and pruned.kept == ()


def test_plan_does_not_copy_a_vector_made_from_other_bytes():
    known = {"h": [_k(7, "/a.png", "h", vec="older")]}
    plan = plan_changes([_f("/b.png")], {}, {"/b.png": "h"}, known)
    assert plan.new[0].source.id == 7 and not plan.new[0].copies_vector


# ---------------------------------------------------------------- formats
def test_every_format_is_indexed(tmp_path, tiny_model):
    samples = write_samples(tmp_path / "formats")
    assert {".heic", ".avif", ".jp2", ".psd", ".qoi", ".dds", ".tga", ".ico", ".pcx", ".pbm", ".pgm", ".ppm"} <= set(samples)
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.index_folder(tmp_path / "formats")
        assert (rep.scanned, rep.added, rep.failed) == (len(WRITERS), len(WRITERS), 0), rep.failures
        st = eng.status()
        assert st["images_ok"] == len(WRITERS) and st["failures"] == []


def test_fuzzed_files_are_indexed_or_failed_with_a_reason(tmp_path, tiny_model):
    samples = write_samples(tmp_path / "valid")
    mutants = write_mutants(tmp_path / "fuzz", samples, per_format=5, seed=3)
    (tmp_path / "fuzz" / "huge.png").write_bytes(_png_claiming(40000, 40000))  # a decompression bomb header
    (tmp_path / "fuzz" / "big.png").write_bytes(_png_claiming(9000, 9000))  # under the limit, but lying
    n = len(mutants) + 2
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.index_folder(tmp_path / "fuzz", batch_size=16)
        assert rep.scanned == n and rep.added + rep.failed + rep.unchanged == n
        st = eng.status()
        assert st["images_ok"] + st["images_failed"] == n and st["images_pending"] == 0
        failed = {os.path.basename(p): e for p, e in rep.failures}
        assert all(failed.values())  # every failure has a reason
        assert "too large" in failed["huge.png"] and "truncated" in failed["big.png"]
        again = eng.index_folder(tmp_path / "fuzz")  # the same broken files do not block a rerun
        assert (again.added, again.failed, again.encoded) == (0, 0, 0)


def _png_claiming(width, height):
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_json_added_counts_only_searchable_items(tmp_path, tiny_model, photo_dir, capsysbinary):
    for i in range(5):
        (photo_dir / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(i))
    code, out, err = cli(["index", str(photo_dir), "--model", tiny_model, "--json"], tmp_path / "lib", capsysbinary)
    rep = json.loads(out)
    assert code == 0 and (rep["scanned"], rep["added"], rep["failed"]) == (17, 12, 5)
    assert err.count("failed ") == 5


# ------------------------------------------------------------ file names
def test_non_utf8_file_name_round_trips(tmp_path, tiny_model, capsysbinary, backend):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(1).save(folder / "plain.png")
    bad = os.path.join(os.fsdecode(bytes(folder)), BAD_NAME)
    noise_image(2).save(bad, "PNG")
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        rep = eng.index_folder(folder)
        assert (rep.added, rep.failed) == (2, 0)
        hits = eng.search_image(bad, k=5)  # found as a query, and left out as the query itself
        assert bad not in [h.path for h in hits] and len(hits) == 1
        assert eng.index_folder(folder).unchanged == 2
    code, out, _ = cli(["search", "--image", str(folder / "plain.png"), "--paths", "-0"], lib, capsysbinary)
    assert code == 0 and out == os.fsencode(bad) + b"\0"
    code, out, _ = cli(["search", "--image", str(folder / "plain.png")], lib, capsysbinary)
    assert code == 0 and b"caf\\xe9-\\xff.png" in out
    code, out, _ = cli(["search", "--image", str(folder / "plain.png"), "--json"], lib, capsysbinary)
    assert json.loads(out)["hits"][0]["path"] == bad
    code, out, _ = cli(["history"], lib, capsysbinary)  # the query image's name, escaped
    assert code == 0 and b"caf\\xe9-\\xff.png" in out
    code, out, _ = cli(["history", "--json"], lib, capsysbinary)
    assert bad in [s["image"] for s in json.loads(out)["searches"]]
    code, out, _ = cli(["remove", bad], lib, capsysbinary)
    assert code == 0 and b"removed 1 images" in out


def test_control_characters_are_escaped(tmp_path, tiny_model, capsysbinary, backend):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(1).save(folder / "plain.png")
    noise_image(2).save(folder / "evil\n\x1b[31mname.png", "PNG")
    lib = tmp_path / "lib"
    cli(["index", str(folder), "--model", tiny_model], lib, capsysbinary)
    for fmt in ([], ["--paths"]):
        code, out, _ = cli(["search", "--image", str(folder / "plain.png"), *fmt], lib, capsysbinary)
        assert code == 0 and b"evil\\n\\x1b[31mname.png" in out and b"\x1b" not in out
    code, out, _ = cli(["search", "--image", str(folder / "plain.png"), "--paths", "--null"], lib, capsysbinary)
    assert out.endswith(b"evil\n\x1b[31mname.png\0")


def test_non_utf8_query_and_lone_surrogate_texts(tmp_path, tiny_model, photo_dir, capsysbinary):
    lib = tmp_path / "lib"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a red circle"}\n{"text": "bad \\ud800 text"}\n{"text": "a blue square"}\n')
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        rep = eng.add_texts(corpus)
        assert (rep.added, rep.failed) == (2, 1) and "line 2" in rep.errors[0]
        with pytest.raises(QueryError, match="UTF-8"):
            eng.search_text(os.fsdecode(b"\xffoo"))
    code, _, err = cli(["search", os.fsdecode(b"\xffoo")], lib, capsysbinary)
    assert code == 1 and "not valid UTF-8" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------ what is a file
def test_fifo_named_png_is_never_opened(tmp_path, tiny_model, photo_dir):
    os.mkfifo(photo_dir / "pipe.png")
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.index_folder(photo_dir)  # hangs forever when the FIFO is opened
        assert rep.added == 12
        assert ("pipe.png", "not a regular file (a FIFO)") in [(os.path.basename(p), r) for p, r in rep.issues]


def test_broken_symlinks_and_loops_are_reported(tmp_path, tiny_model, photo_dir):
    os.symlink(photo_dir / "nowhere.png", photo_dir / "dangling.png")
    os.symlink(photo_dir / "loop.png", photo_dir / "loop.png")
    os.symlink(photo_dir, photo_dir / "a" / "up")
    os.symlink(photo_dir / "a" / "img00.png", photo_dir / "link.png")  # a link to a regular file is indexed
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.index_folder(photo_dir)
        reasons = {os.path.basename(p): r for p, r in rep.issues}
        assert reasons["dangling.png"] == "broken symlink"
        assert reasons["loop.png"] == "symlink loop"
        assert "already scanned" in reasons["up"]
        assert rep.added == 13


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_is_reported(tmp_path, tiny_model, photo_dir):
    p = photo_dir / "a" / "img00.png"
    p.chmod(0)
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = eng.index_folder(photo_dir)
        assert (str(p), "permission denied") in rep.issues and rep.added == 11


# -------------------------------------------------------- one path form
def test_relative_path_with_dotdot(tmp_path, tiny_model, photo_dir, monkeypatch, capsysbinary):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    lib = tmp_path / "lib"
    code, out, _ = cli(["index", "../photos", "--model", tiny_model, "--json"], lib, capsysbinary)
    assert code == 0 and json.loads(out)["added"] == 12
    code, out, _ = cli(["index", "../photos/../photos/a", "--json"], lib, capsysbinary)
    assert code == 0 and json.loads(out)["unchanged"] == 6
    code, out, _ = cli(["remove", "../photos/b/"], lib, capsysbinary)
    assert code == 0 and b"removed 6 images" in out


def test_empty_paths_are_refused(tmp_path, tiny_model, photo_dir, monkeypatch, capsysbinary):
    monkeypatch.chdir(photo_dir)
    lib = tmp_path / "lib"
    code, _, err = cli(["index", ".", "--model", tiny_model], lib, capsysbinary)
    assert code == 0
    code, _, err = cli(["remove", ""], lib, capsysbinary)
    assert code == 1 and "empty path" in err
    with Engine.open(lib) as eng:
        assert eng.status()["images"] == 12
        with pytest.raises(LibraryError):
            eng.index_folder("")
    code, _, err = cli(["index", ""], lib, capsysbinary)
    assert code == 1 and err.startswith("crossfind: error")
    code, _, err = main_no_library(["--library", "", "status"], capsysbinary)
    assert code == 1 and "empty library path" in err and not (photo_dir / "library.db").exists()


def main_no_library(args, capsysbinary):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def test_remove_many_asks_on_a_terminal(tmp_path, tiny_model, photo_dir):
    import pty

    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
    cmd = [sys.executable, "-c", "from retrieval.cli import main; main()", "--library", str(lib), "remove", str(photo_dir)]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    os.write(master, b"n\n")
    out, err = proc.communicate(timeout=120)
    os.close(master)
    assert proc.returncode == 1 and b"remove 12 images" in err and b"--yes" in err
    with Engine.open(lib) as eng:
        assert eng.status()["images"] == 12
    done = subprocess.run(cmd + ["--yes"], stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert done.returncode == 0 and b"removed 12 images" in done.stdout


# ----------------------------------------------------- search arguments
@pytest.mark.parametrize("term", ["nan:blue", "inf:red", "1e308:red", "-inf:x"])
def test_bad_term_weights_are_one_line_errors(tmp_path, tiny_model, term, capsysbinary):
    code, _, err = cli(["search", "x", "--add", term, "--model", tiny_model], tmp_path / "lib", capsysbinary)
    assert code == 1 and "weight" in err and len(err.strip().splitlines()) == 1


def test_search_arguments_are_checked(tmp_path, tiny_model, photo_dir, capsysbinary):
    lib = tmp_path / "lib"
    hidden = photo_dir / ".hidden"
    hidden.mkdir()
    noise_image(40).save(hidden / "h.png")
    cli(["index", str(photo_dir), "--include-hidden", "--model", tiny_model], lib, capsysbinary)
    cases = {
        ("search", "x", "--add", "2:/nonexistent.png"): "text:/nonexistent.png",
        ("search", "--image", str(photo_dir)): "is a folder",
        ("show", "99999999999999999999999"): "range",
        ("search", "x", "--target", "texts", "--path", "*/a/*"): "do not apply",
        ("search", "x", "--target", "texts", "--corpus", "nope"): "no corpus named 'nope'",
    }
    for args, expected in cases.items():
        code, _, err = cli(list(args), lib, capsysbinary)
        assert code == 1 and expected in err and len(err.strip().splitlines()) == 1, (args, err)
    code, out, _ = cli(["search", "x", "--add", "2:text:/nonexistent.png", "--paths"], lib, capsysbinary)
    assert code == 0
    code, out, _ = cli(["search", "x", "--add", f"image:{photo_dir / 'a' / 'img00.png'}", "--paths"], lib, capsysbinary)
    assert code == 0
    code, out, _ = cli(["search", "x", "--path", ".hidden/*", "--paths"], lib, capsysbinary)
    assert code == 0 and out.decode().split() == [str(hidden / "h.png")]


# ------------------------------------------------- hidden and excluded
def test_newly_excluded_images_are_kept_unless_pruned(tmp_path, tiny_model, photo_dir, capsysbinary):
    lib = tmp_path / "lib"
    hidden = photo_dir / ".thumbs"
    hidden.mkdir()
    noise_image(50).save(hidden / "t.png")
    code, out, _ = cli(["index", str(photo_dir), "--include-hidden", "--model", tiny_model, "--json"], lib, capsysbinary)
    assert json.loads(out)["added"] == 13
    code, out, err = cli(["index", str(photo_dir), "--exclude", "b", "--json"], lib, capsysbinary)
    rep = json.loads(out)
    assert (rep["removed"], rep["unchanged"]) == (0, 6)
    assert "kept 7 images" in err and "--prune" in err
    with Engine.open(lib) as eng:
        assert eng.status()["images"] == 13
    code, out, _ = cli(["index", str(photo_dir), "--exclude", "b", "--prune", "--json"], lib, capsysbinary)
    assert json.loads(out)["removed"] == 7
    with Engine.open(lib) as eng:
        assert eng.status()["images"] == 6


# -------------------------------------------------------- model folders
def _model_copy(tmp_path, tiny_model, name):
    import shutil

    src = Path(tiny_model[len("local-dir:"):])
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_crafted_model_folders_are_one_line_errors(tmp_path, tiny_model, photo_dir, capsysbinary):
    lib = tmp_path / "lib"
    broken = _model_copy(tmp_path, tiny_model, "broken-json")
    (broken / "open_clip_config.json").write_text("{not json")
    bpe = _model_copy(tmp_path, tiny_model, "bpe")
    cfg = json.loads((bpe / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"bpe_path": "/etc/passwd"}
    (bpe / "open_clip_config.json").write_text(json.dumps(cfg))
    huge = _model_copy(tmp_path, tiny_model, "huge")
    cfg = json.loads((huge / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["width"] = 10**7
    (huge / "open_clip_config.json").write_text(json.dumps(cfg))
    trunc = _model_copy(tmp_path, tiny_model, "trunc")
    w = trunc / "open_clip_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    cases = {broken: "not valid JSON", bpe: "bpe_path", huge: "width", trunc: "damaged"}
    for folder, expected in cases.items():
        code, _, err = cli(["index", str(photo_dir), "--model", f"local-dir:{folder}"], lib, capsysbinary)
        assert code == 1 and expected in err and "downloadable" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_huge_reranker_config_is_refused_before_allocating(tmp_path):
    from retrieval.errors import ModelNotAvailable
    from retrieval.rerank import RerankerConfig

    good = {"model": "m", "text_width": 32, "image_width": 64, "image_tokens": 16, "max_text_tokens": 16}
    assert RerankerConfig.from_json(json.dumps(good)).width == 128
    for bad, expected in [({"width": 50_000}, "width"), ({"depth": 64, "width": 8192}, "parameters"),
                          ({"heads": 3}, "divisible"), ({"temperature": float("nan")}, "temperature"),
                          ({"image_tokens": "9"}, "image_tokens")]:
        with pytest.raises(ModelNotAvailable, match=expected):
            RerankerConfig.from_json(json.dumps({**good, **bad}))
    with pytest.raises(ModelNotAvailable, match="not valid JSON"):
        RerankerConfig.from_json("{")


# ------------------------------------------------------------- Ctrl-C
def test_ctrl_c_prints_interrupted_and_exits_130(tmp_path, tiny_model):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        noise_image(i).save(folder / f"{i:04d}.png")
    lib = tmp_path / "lib"
    cmd = [sys.executable, "-c", "from retrieval.cli import main; main()", "--library", str(lib), "index", str(folder),
           "--model", tiny_model, "--batch-size", "2", "--workers", "1", "--checkpoint-seconds", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        db = lib / "library.db"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if db.exists() and _vectors(db) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "indexing finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err


def _vectors(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
            return con.execute("select count(*) from image_vectors").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_fuzz_mutations_are_deterministic(tmp_path):
    from retrieval.fuzz import mutate

    data = bytes(range(256)) * 4
    assert mutate(data, random.Random(1)) == mutate(data, random.Random(1))
