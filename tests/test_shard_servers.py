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
