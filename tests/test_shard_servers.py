"""Shards served by faiss.contrib.client_server and searched remotely (issue 19), on localhost."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from retrieval.index.compressed import CompressedIndex, Sidecar
from retrieval.index.remote import RemoteError, RemoteShards, ShardService, parse_servers

from test_scale import exact, small_plan, unit


def serve(paths, shards, of, build="b1") -> ShardService:
    svc = ShardService(paths, {"shards": shards, "of": of, "build": build}, host="127.0.0.1", port=0)
    threading.Thread(target=svc.serve_forever, daemon=True).start()
    return svc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    n, dim = 3000, 32
    xb, xq = unit(n, dim, 4), unit(15, dim, 5)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    one = CompressedIndex.build(small_plan(n, dim), ids, (xb[s : s + 1000] for s in range(0, n, 1000)), tmp / "one", xb)
    three = CompressedIndex.build(small_plan(n, dim), ids, (xb[s : s + 1000] for s in range(0, n, 1000)), tmp / "three", xb, shards=3)
    paths = [tmp / f"three.shard{i}.faiss" for i in range(3)]
    return tmp, xb, xq, ids, one, three, paths


def exact_settings(index: CompressedIndex) -> CompressedIndex:
    index.set_nprobe(16)  # every list
    index.rescore_factor = 40  # 400 candidates of 3000: the true top-10 are among them
    return index


def test_remote_shards_give_the_local_and_single_index_results(built) -> None:
    tmp, xb, xq, ids, one, three, paths = built
    a, b = serve(paths[:2], [0, 1], 3), serve(paths[2:], [2], 3)
    try:
        remote = RemoteShards(parse_servers(f"127.0.0.1:{a.port},127.0.0.1:{b.port}"), expect={"of": 3, "build": "b1"})
        assert remote.ntotal == 3000 and remote.d == 32 and remote.nlist == 16
        far = exact_settings(CompressedIndex(remote, Sidecar.open(tmp / "three")))
        assert far.nprobe == 16
        local, single = exact_settings(three), exact_settings(one)
        got, want_local, want_one = far.search(xq, 10), local.search(xq, 10), single.search(xq, 10)
        np.testing.assert_array_equal(got.ids, want_local.ids)
        np.testing.assert_array_equal(got.scores, want_local.scores)
        np.testing.assert_array_equal(got.ids, want_one.ids)
        np.testing.assert_array_equal(got.scores, want_one.scores)
        _, truth = exact(xb, ids, xq, 10)
        np.testing.assert_array_equal(got.ids, truth)
        # the PQ candidates merged by ClientIndex's heap are those IndexShards merges
        np.testing.assert_array_equal(np.sort(far.candidates(xq, 50), axis=1), np.sort(local.candidates(xq, 50), axis=1))
        # a filter runs inside each server's shards and gives what it gives locally
        allowed = ids[::5]
        np.testing.assert_array_equal(far.search(xq, 10, allowed=allowed).ids, local.search(xq, 10, allowed=allowed).ids)
        assert set(far.search(xq, 10, allowed=allowed).ids.ravel()) <= set(allowed)
        # a server gone: one clear error naming it, not a traceback from inside faiss
        b.close()
        with pytest.raises(RemoteError, match=rf"^shard server 127\.0\.0\.1:{b.port}: connection lost"):
            far.search(xq, 10)
        # the next search reconnects, and finds it down
        with pytest.raises(RemoteError, match=rf"^shard server 127\.0\.0\.1:{b.port}: .*refused.*serve-shards"):
            far.search(xq, 10)
    finally:
        a.close()
        b.close()


def test_servers_must_cover_every_shard_of_one_build(built) -> None:
    tmp, xb, xq, ids, one, three, paths = built
    a, b = serve(paths[:2], [0, 1], 3), serve(paths[1:2], [1], 3)
    c = serve(paths[2:], [2], 3, build="other")
    try:
        with pytest.raises(RemoteError, match=r"missing \[2\]; served twice \[1\]"):
            RemoteShards([("127.0.0.1", a.port), ("127.0.0.1", b.port)])
        with pytest.raises(RemoteError, match=rf"127\.0\.0\.1:{c.port} serves build 'other', not 'b1'"):
            RemoteShards([("127.0.0.1", a.port), ("127.0.0.1", c.port)], expect={"of": 3, "build": "b1"})
    finally:
        for s in (a, b, c):
            s.close()


def test_parse_servers() -> None:
    assert parse_servers("h1:9100, 10.0.0.6:9101") == [("h1", 9100), ("10.0.0.6", 9101)]
    assert parse_servers(["[::1]:9100"]) == [("::1", 9100)]
    for bad in ("h1", "h1:x", ":9100", "", "h:70000"):
        with pytest.raises(ValueError):
            parse_servers(bad)


def start_cli_server(lib, model: str, shards: str):
    """``crossfind serve-shards`` in a subprocess on a free port; returns (process, port)."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "from retrieval.cli import main; main()", "--library", str(lib), "serve-shards",
         "--target", "texts", "--shards", shards, "--port", "0", "--model", model],
        stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    found = re.search(r"on 127\.0\.0\.1:(\d+); Ctrl-C", line)
    if not found:
        proc.kill()
        raise AssertionError(f"serve-shards did not start: {line}{proc.stderr.read()}")
    return proc, int(found.group(1))


def test_library_searches_its_shards_on_servers(tmp_path, tiny_model, capsys) -> None:
    from click.testing import CliRunner

    from retrieval import Engine, QueryError
    from retrieval.cli import cli, main
    from retrieval.scale import apply_index_memory

    lib = tmp_path / "lib"
    corpus = tmp_path / "words.txt"
    corpus.write_text("".join(f"caption number {i} of a {['red', 'blue', 'green'][i % 3]} thing {i * 7 % 13}\n" for i in range(400)))
    queries = ["caption number 17 of a blue thing", "a green thing 5", "number 300"]
    with Engine.open(lib, model=tiny_model) as eng:
        eng.add_texts(corpus)
        full = [[(h.id, h.score) for h in eng.search_text(q, k=8, target="texts")] for q in queries]
        with eng.writer():
            (rep,) = apply_index_memory(eng.state(), "80K", shards=3, kinds=("texts",))
        assert rep.compressed and rep.shards == 3
    with Engine.open(lib, model=tiny_model) as eng:
        assert eng.state().search_index("texts").kind == "ivfpq"
        local = [[(h.id, h.score) for h in eng.search_text(q, k=8, target="texts")] for q in queries]
    assert [[i for i, _ in r] for r in local] == [[i for i, _ in r] for r in full]  # 64 lists probed of 64: exact
    a, port_a = start_cli_server(lib, tiny_model, "0,1")
    b, port_b = start_cli_server(lib, tiny_model, "2")
    try:
        ok = CliRunner().invoke(cli, ["--library", str(lib), "set-shard-servers", f"127.0.0.1:{port_a},127.0.0.1:{port_b}",
                                      "--target", "texts", "--model", tiny_model])
        assert ok.exit_code == 0 and f"127.0.0.1:{port_a},127.0.0.1:{port_b}" in ok.output, ok.output
        with Engine.open(lib, model=tiny_model) as eng:
            index = eng.state().search_index("texts")
            assert type(index).__name__ == "RemoteCompressedIndex" and len(index) == 400
            remote = [[(h.id, h.score) for h in eng.search_text(q, k=8, target="texts")] for q in queries]
            assert remote == local  # the same ids and the same scores
            b.kill()
            b.wait()
            with pytest.raises(QueryError, match=rf"^shard server 127\.0\.0\.1:{port_b}: connection lost"):
                eng.search_text(queries[0], k=8, target="texts")
        # a fresh process: one line naming the server that is down, no traceback
        with pytest.raises(SystemExit):
            main(["--library", str(lib), "search", queries[0], "--target", "texts", "--model", tiny_model])
        err = capsys.readouterr().err
        assert f"shard server 127.0.0.1:{port_b}: " in err and "set-shard-servers none" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        # only shards 0 and 1 up: refused, not searched partially
        ok = CliRunner().invoke(cli, ["--library", str(lib), "set-shard-servers", f"127.0.0.1:{port_a}", "--target", "texts", "--model", tiny_model])
        assert ok.exit_code == 0
        with Engine.open(lib, model=tiny_model) as eng, pytest.raises(Exception, match=r"missing \[2\]"):
            eng.search_text(queries[0], k=8, target="texts")
        CliRunner().invoke(cli, ["--library", str(lib), "set-shard-servers", "none", "--target", "texts", "--model", tiny_model])
        with Engine.open(lib, model=tiny_model) as eng:
            assert [[(h.id, h.score) for h in eng.search_text(q, k=8, target="texts")] for q in queries] == local
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait()
