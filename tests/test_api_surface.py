"""The package's small public surface: version, typed history, eval's own library."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from click.testing import CliRunner

import retrieval
from retrieval.cli import cli, main


def test_version_comes_from_the_installed_package():
    assert retrieval.__version__ == importlib.metadata.version("crossfind")
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and retrieval.__version__ in res.output


def test_version_of_a_source_tree_that_was_never_installed(monkeypatch):
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert retrieval.__version__ == "0+unknown"


def test_history_is_typed_and_matches_the_cli(tmp_path, photo_dir, tiny_model):
    from retrieval import Engine, HistoryEntry

    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        eng.search_text("first", k=3)
        eng.search_text("second", k=2, path_glob="*/a/*")
        entries = eng.history(10)
    assert all(isinstance(e, HistoryEntry) for e in entries)
    assert [(e.text, e.k, e.target, e.model) for e in entries] == [("second", 2, "images", tiny_model), ("first", 3, "images", tiny_model)]
    assert entries[0].filters == {"path": "*/a/*"} and entries[1].filters is None
    res = CliRunner().invoke(cli, ["--library", str(lib), "history", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"searches": [e.to_json() for e in entries]}
    res = CliRunner().invoke(cli, ["--library", str(lib), "history"])
    assert res.exit_code == 0 and res.output.splitlines()[0].split()[0] == str(entries[0].id)
    assert "second" in res.output.splitlines()[0] and 'filters={"path": "*/a/*"}' in res.output


def test_eval_refuses_library_instead_of_ignoring_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--library", str(tmp_path / "lib"), "eval", str(tmp_path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "temporary library" in err and "--library" in err and "Traceback" not in err
    assert not (tmp_path / "lib").exists()
