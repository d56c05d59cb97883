"""The command line: JSON contract, help texts with examples, one-line errors,
and a --help that does not import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from retrieval.cli import cli, main


def run(args, lib, code=0):
    res = CliRunner().invoke(cli, ["--library", str(lib), *args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def test_index_search_status_json(tmp_path, tiny_model, photo_dir):
    lib = tmp_path / "lib"
    out = json.loads(run(["index", str(photo_dir), "--model", tiny_model, "--json"], lib).stdout)
    assert out == {**out, "scanned": 12, "added": 12, "updated": 0, "unchanged": 0, "removed": 0, "failed": 0}
    assert set(out) == {"scanned", "added", "updated", "unchanged", "removed", "failed", "seconds"}
    res = json.loads(run(["search", "red circle", "-k", "3", "--json"], lib).stdout)
    assert res["query"] == {"text": "red circle", "image": None, "target": "images"}
    assert res["model"] == tiny_model and res["reranked"] is False
    assert [h["rank"] for h in res["hits"]] == [1, 2, 3]
    hit = res["hits"][0]
    assert set(hit) == {"rank", "kind", "id", "path", "text", "score", "rerank_score"}
    assert hit["kind"] == "image" and hit["path"].startswith(str(photo_dir)) and hit["rerank_score"] is None
    st = json.loads(run(["status", "--json"], lib).stdout)
    assert st["images_ok"] == 12 and st["models"][0]["image_vectors"] == 12 and st["default_model"] == tiny_model


def test_table_and_paths_output(tmp_path, tiny_model, photo_dir):
    lib = tmp_path / "lib"
    run(["index", str(photo_dir), "--model", tiny_model], lib)
    table = run(["search", "x", "-k", "2"], lib).stdout.splitlines()
    assert table[0].split() == ["rank", "score", "item"] and len(table) == 3
    score = table[1].split()[1]
    assert len(score.split(".")[1]) == 3  # fixed decimals
    paths = run(["search", "x", "-k", "4", "--paths"], lib).stdout.splitlines()
    assert len(paths) == 4 and all(p.startswith(str(photo_dir)) for p in paths)


def test_user_errors_are_one_line_exit_1(tmp_path, tiny_model, capsys):
    lib = tmp_path / "lib"
    for argv in (
        ["--library", str(lib), "search", "x"],  # nothing indexed
        ["--library", str(lib), "index", str(tmp_path / "nope")],
        ["--library", str(lib), "search", "x", "--model", "no-such-arch"],
        ["--library", str(lib), "search", "x", "--model", "ViT-B-32:no_such_tag"],
        ["--library", str(lib), "search", "x", "--model", "local-dir:/nonexistent/dir"],
    ):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_missing_pretrained_weights_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SystemExit):
        main(["--library", str(tmp_path / "lib"), "index", str(tmp_path), "--model", "ViT-B-32:laion2b_s34b_b79k"])
    err = capsys.readouterr().err
    assert "neither cached nor downloadable" in err and "shapes-tiny" in err and "local-dir:" in err


def test_every_command_has_help_with_example():
    runner = CliRunner()
    for name, cmd in cli.commands.items():
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0, name
        assert "Example" in res.output and f"crossfind {name}" in res.output, name


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from retrieval.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for mod in ('torch', 'open_clip', 'faiss'):\n    assert mod not in sys.modules, mod\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "crossfind index" in out.stdout


def test_user_index_and_migrations_do_not_shadow_the_package(tmp_path, tiny_model, photo_dir):
    """A working directory holding its own ``index.py`` and ``migrations/``
    (a Flask-Migrate app, say) must not shadow crossfind's modules: they install
    as ``retrieval.index`` and ``retrieval.migrations``."""
    app = tmp_path / "app"
    (app / "migrations").mkdir(parents=True)
    (app / "index.py").write_text("raise ImportError('the user index.py was imported')\n")
    (app / "migrations" / "__init__.py").write_text("raise ImportError('the user migrations/ was imported')\n")
    lib = tmp_path / "lib"
    code = (
        "import sys; sys.path.insert(0, '');"
        "from retrieval.cli import main;"
        f"main(['--library', {str(lib)!r}, 'index', {str(photo_dir)!r}, '--model', {tiny_model!r}, '--json'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=app, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["added"] == 12
    api = (
        "import sys; sys.path.insert(0, '');"
        "from retrieval import Engine;"
        f"eng = Engine.open({str(lib)!r});"
        "print(len(eng.search_text('red circle', k=3)))"
    )
    proc = subprocess.run([sys.executable, "-c", api], cwd=app, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
