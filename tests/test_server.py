"""The HTTP API of ``crossfind serve`` through the framework's test client, on a
library indexed with the tiny model: answers equal the CLI's ``--json``, files
only by id, limits and refusals as JSON 4xx, index jobs one at a time."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi", reason="crossfind serve needs the 'serve' extra (pip install -e '.[dev]')")

from fastapi.testclient import TestClient  # noqa: E402

from retrieval import Engine  # noqa: E402
from retrieval.cli import cli  # noqa: E402
from retrieval.server.app import MAX_UPLOAD_BYTES, create_app  # noqa: E402
from retrieval.server.service import Service  # noqa: E402

from conftest import noise_image  # noqa: E402


@pytest.fixture
def lib(tmp_path, tiny_model, photo_dir) -> Path:
    lib = tmp_path / "lib"
    (tmp_path / "caps.txt").write_text("a red square\na blue circle\na green triangle\n")
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        eng.add_texts(tmp_path / "caps.txt", corpus="caps")
    return lib


@pytest.fixture
def service(lib, tiny_model):
    svc = Service(lib, model=tiny_model)
    yield svc
    svc.close()


@pytest.fixture
def client(service):
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        yield c


def cli_json(lib: Path, *args: str) -> dict:
    res = CliRunner().invoke(cli, ["--library", str(lib), *args, "--json"], env={"CROSSFIND_NO_SERVER": "1"})
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def image_id(lib: Path, name: str) -> int:
    with Engine.open(lib) as eng:
        return next(r.id for r in eng.store.images_under([str(lib.parent / "photos")]) if r.path.endswith(name))


def test_get_search_is_search_json(client, lib, tiny_model):
    got = client.get("/api/search", params={"q": "a red square", "k": 5})
    assert got.status_code == 200, got.text
    want = cli_json(lib, "search", "a red square", "-k", "5", "--model", tiny_model)
    assert got.json() == want
    assert len(want["hits"]) == 5 and want["hits"][0]["kind"] == "image"


def test_search_filters_and_texts(client, lib, tiny_model):
    got = client.get("/api/search", params={"q": "circle", "path": "*/a/*", "k": 20}).json()
    assert got["hits"] and all("/a/" in h["path"] for h in got["hits"])
    texts = client.get("/api/search", params={"q": "circle", "target": "texts", "corpus": "caps"}).json()
    assert {h["text"] for h in texts["hits"]} == {"a red square", "a blue circle", "a green triangle"}
    assert texts == cli_json(lib, "search", "circle", "--target", "texts", "--corpus", "caps", "--model", tiny_model)


def test_more_like_this_by_image_id_equals_cli_image_search(client, lib, tiny_model):
    iid = image_id(lib, "img04.jpg")
    got = client.post("/api/search", json={"image_id": iid, "k": 5})
    assert got.status_code == 200, got.text
    path = str(lib.parent / "photos" / "a" / "img04.jpg")
    want = cli_json(lib, "search", "--image", path, "-k", "5", "--model", tiny_model)
    assert got.json() == want
    assert iid not in [h["id"] for h in want["hits"]]  # the query image itself is left out


def test_terms_with_image_ids(client, lib):
    iid = image_id(lib, "img03.png")
    plain = client.post("/api/search", json={"q": "a red square", "k": 11}).json()
    moved = client.post("/api/search", json={"q": "a red square", "k": 11, "terms": [{"weight": 2.0, "image_id": iid}]}).json()
    assert moved["hits"][0]["id"] == iid  # pulled to the top by the added image
    assert [h["id"] for h in plain["hits"]] != [h["id"] for h in moved["hits"]]
    again = client.get("/api/history/1").status_code
    assert again == 200


def test_upload_searches_without_adding_to_library(client, lib, tmp_path):
    before = client.get("/api/status").json()["images"]
    buf = io.BytesIO()
    noise_image(3).save(buf, "PNG")  # the same picture as img03.png, uploaded
    got = client.post("/api/search", files={"file": ("q.png", buf.getvalue(), "image/png")}, data={"k": "3"})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["query"]["image"] == "<PIL image>" and len(body["hits"]) == 3
    assert body["hits"][0]["path"].endswith("img03.png") and body["hits"][0]["score"] > 0.999
    assert client.get("/api/status").json()["images"] == before
    assert not list(lib.glob("upload-*"))  # the temporary file is gone


def test_upload_limits_and_bad_files(client):
    big = client.post("/api/search", files={"file": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 1), "image/png")})
    assert big.status_code == 413 and "too large" in big.json()["error"]
    junk = client.post("/api/search", files={"file": ("x.png", b"not an image", "image/png")})
    assert junk.status_code == 400 and "cannot use the uploaded image" in junk.json()["error"]
    buf = io.BytesIO()
    Image.new("L", (20000, 10000)).save(buf, "PNG")  # 200 megapixels, a few hundred KB compressed
    bomb = client.post("/api/search", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert bomb.status_code == 400 and "too large" in bomb.json()["error"]


@pytest.mark.parametrize("params, words", [
    ({"q": "x", "k": "0"}, "k"),
    ({"q": "x", "target": "sounds"}, "target"),
    ({"q": "x", "since": "yesterday"}, "since"),
    ({"q": "x", "bogus": "1"}, "unknown search field"),
    ({}, "a search needs"),
    ({"image_id": "999999"}, "no image with id"),
])
def test_bad_searches_are_4xx_json(client, params, words):
    got = client.get("/api/search", params=params)
    assert 400 <= got.status_code < 500
    assert words in got.json()["error"]


def test_image_paths_refused_over_tcp(client, lib):
    got = client.post("/api/search", json={"image": str(lib.parent / "photos" / "a" / "img00.png")})
    assert got.status_code == 400 and "unix socket" in got.json()["error"]
    assert client.post("/api/search", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
    missing = client.get("/api/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()


def test_items(client, lib):
    iid = image_id(lib, "img01.jpg")
    im = client.get(f"/api/items/images/{iid}").json()
    assert im["path"].endswith("img01.jpg") and im["size"] > 0 and im["status"] == "ok" and im["date"]
    t = client.get("/api/items/texts/1").json()
    assert t["corpus"] == "caps" and t["text"] == "a red square"
    assert client.get("/api/items/images/99999").status_code == 404
    assert client.get("/api/items/sounds/1").status_code == 404


def test_thumbnails_cached_with_etag_and_exif_orientation(client, lib, service):
    iid = image_id(lib, "img01.jpg")
    got = client.get(f"/api/thumbs/{iid}", params={"size": 32})
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert "max-age" in got.headers["cache-control"]
    with Image.open(io.BytesIO(got.content)) as im:
        assert max(im.size) == 32 and im.size == (32, 24)  # 64x48 scaled
    assert list((lib / "thumbs").rglob("*-32.jpg"))
    again = client.get(f"/api/thumbs/{iid}", params={"size": 32}, headers={"If-None-Match": got.headers["etag"]})
    assert again.status_code == 304
    assert client.get(f"/api/thumbs/{iid}", params={"size": 5000}).status_code == 400


def test_thumbnail_follows_exif_orientation(tmp_path, tiny_model):
    folder = tmp_path / "rot"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    noise_image(1, (80, 40)).save(folder / "r.jpg", exif=exif)
    lib = tmp_path / "lib2"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(folder)
    svc = Service(lib, model=tiny_model)
    try:
        with TestClient(create_app(svc)) as c:
            got = c.get("/api/thumbs/1", params={"size": 64})
            with Image.open(io.BytesIO(got.content)) as im:
                assert im.size == (32, 64)  # portrait, as shown
    finally:
        svc.close()


def test_files_by_id_only(client, lib, tmp_path):
    iid = image_id(lib, "img02.jpg")
    got = client.get(f"/api/files/{iid}")
    assert got.status_code == 200
    assert got.content == (lib.parent / "photos" / "a" / "img02.jpg").read_bytes()
    for bad in ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "-1", "1.0", "0x1"]:
        r = client.get(f"/api/files/{bad}")
        assert r.status_code == 404, bad
        assert "root:" not in r.text


def test_files_refuse_symlinks_out_of_library_and_removed_ids(client, lib, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    noise_image(99).save(outside / "private.jpg")
    iid = image_id(lib, "img06.png")
    target = lib.parent / "photos" / "a" / "img06.png"
    target.unlink()
    target.symlink_to(outside / "private.jpg")  # swapped after indexing
    assert client.get(f"/api/files/{iid}").status_code == 404
    assert client.get(f"/api/thumbs/{iid}").status_code == 404
    gone = image_id(lib, "img08.jpg")
    res = CliRunner().invoke(cli, ["--library", str(lib), "remove", str(lib.parent / "photos" / "a" / "img08.jpg")])
    assert res.exit_code == 0, res.output
    assert client.get(f"/api/files/{gone}").status_code == 404
    inside = image_id(lib, "img10.jpg")  # a symlink within the library's folders is fine
    (lib.parent / "photos" / "a" / "img10.jpg").rename(lib.parent / "photos" / "b" / "moved.jpg")
    (lib.parent / "photos" / "a" / "img10.jpg").symlink_to(lib.parent / "photos" / "b" / "moved.jpg")
    assert client.get(f"/api/files/{inside}").status_code == 200


def test_status_and_history_are_cli_json(client, lib, tiny_model):
    client.get("/api/search", params={"q": "green"})
    client.get("/api/search", params={"q": "blue", "target": "texts"})
    assert client.get("/api/status").json() == cli_json(lib, "status")
    hist = client.get("/api/history", params={"limit": 5}).json()
    assert hist == cli_json(lib, "history", "-n", "5")
    assert [s["text"] for s in hist["searches"][:2]] == ["blue", "green"]
    qid = hist["searches"][0]["id"]
    assert client.get(f"/api/history/{qid}").json() == cli_json(lib, "show", str(qid))
    assert client.get("/api/history/424242").status_code == 404


def test_duplicates_is_duplicates_json(tmp_path, tiny_model, photo_dir):
    copies = photo_dir / "copies"
    copies.mkdir()
    noise_image(4).resize((48, 36), Image.Resampling.LANCZOS).save(copies / "img04_small.jpg", quality=70)
    shutil.copyfile(photo_dir / "a" / "img04.jpg", copies / "img04_copy.jpg")
    later = (photo_dir / "a" / "img04.jpg").stat().st_mtime + 60
    os.utime(copies / "img04_copy.jpg", (later, later))  # the original is the older one
    lib = tmp_path / "duplib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
    svc = Service(lib, model=tiny_model)
    try:
        with TestClient(create_app(svc), raise_server_exceptions=False) as c:
            got = c.get("/api/duplicates")
            assert got.status_code == 200, got.text
            body = got.json()
            assert body == cli_json(lib, "duplicates", "--model", tiny_model)
            assert body["images"] == 14 and body["threshold"] == 0.94 and body["rule"]
            group = next(g for g in body["groups"] if any(it["path"].endswith("img04_small.jpg") for it in g["items"]))
            by_name = {Path(it["path"]).name: it for it in group["items"]}
            assert set(by_name) == {"img04.jpg", "img04_small.jpg", "img04_copy.jpg"}
            assert group["keep"] == by_name["img04.jpg"]["id"] and group["items"][0]["id"] == group["keep"]
            assert by_name["img04_copy.jpg"]["exact"] and not by_name["img04_small.jpg"]["exact"]
            assert (by_name["img04_small.jpg"]["width"], by_name["img04_small.jpg"]["height"]) == (48, 36)
            assert by_name["img04_small.jpg"]["bytes"] == (copies / "img04_small.jpg").stat().st_size
            # Parameters as the CLI's options; bad ones are 4xx JSON.
            only = c.get("/api/duplicates", params={"path": "*/copies/*", "threshold": 0.95}).json()
            assert only == cli_json(lib, "duplicates", "--path", "*/copies/*", "--threshold", "0.95", "--model", tiny_model)
            assert only["images"] == 2 and only["threshold"] == 0.95
            assert [Path(it["path"]).name for g in only["groups"] for it in g["items"]] == ["img04_copy.jpg", "img04_small.jpg"]
            for params, words in [({"threshold": "0"}, "threshold"), ({"threshold": "1.5"}, "threshold"),
                                  ({"threshold": "high"}, "threshold"), ({"model": "local-dir:/nowhere"}, "")]:
                bad = c.get("/api/duplicates", params=params)
                assert 400 <= bad.status_code < 500, (params, bad.text)
                assert words in bad.json()["error"]
            assert "/api/duplicates" in c.get("/openapi.json").json()["paths"]
    finally:
        svc.close()


def test_index_job_one_writer_and_searches_answer_meanwhile(client, lib, tmp_path):
    new = tmp_path / "more"
    new.mkdir()
    for i in range(5):
        noise_image(200 + i).save(new / f"n{i}.png")
    from retrieval.lock import WriterLock

    gate = WriterLock(lib)  # another writer holds the library: the job waits for it, so it is surely running
    assert gate.acquire(wait=False)
    started = client.post("/api/index", json={"path": str(new)})
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["state"] == "running"
    second = client.post("/api/index", json={"path": str(new)})
    assert second.status_code == 409 and "already running" in second.json()["error"]
    during = client.get("/api/search", params={"q": "a red square", "k": 3})
    assert during.status_code == 200 and len(during.json()["hits"]) == 3
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"

    gate.release()
    gate.close()
    for _ in range(600):
        st = client.get(f"/api/jobs/{job['id']}").json()
        if st["state"] != "running":
            break
        threading.Event().wait(0.05)
    assert st["state"] == "done", st
    assert st["report"]["added"] == 5 and st["report"]["failed"] == 0
    assert st["done"] == 5 and st["total"] == 5 and st["failed"] == 0
    after = client.post("/api/search", json={"q": "x", "k": 100, "path": str(new) + "/*"}).json()
    assert {Path(h["path"]).name for h in after["hits"]} == {f"n{i}.png" for i in range(5)}
    assert client.post("/api/index", json={"path": "relative/dir"}).status_code == 400
    assert client.get("/api/jobs/99").status_code == 404


def test_token_and_cors(service):
    with TestClient(create_app(service, token="s3cret")) as c:
        assert c.get("/api/status").status_code == 401
        assert c.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/status", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = c.get("/?token=s3cret", follow_redirects=False)
        assert page.status_code == 303 and "crossfind_token" in page.headers["set-cookie"]
    with TestClient(create_app(service)) as c:
        r = c.get("/api/status", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(service, cors=("http://app.example",))) as c:
        r = c.get("/api/status", headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_loopback_server_refuses_foreign_host_names_and_simple_posts(service):
    with TestClient(create_app(service, allowed_hosts=("127.0.0.1", "localhost", "::1")), base_url="http://127.0.0.1:8756") as c:
        assert c.get("/api/status").status_code == 200
        assert c.get("/api/status", headers={"Host": "localhost:8756"}).status_code == 200
        rebound = c.get("/api/status", headers={"Host": "evil.example:8756"})
        assert rebound.status_code == 400 and "Host" in rebound.json()["error"]
        # A cross-site form may POST text/plain without a preflight: it starts nothing.
        form = c.post("/api/index", content=b'{"path": "/"}', headers={"Content-Type": "text/plain"})
        assert form.status_code == 415 and c.get("/api/jobs").json() == {"jobs": []}


def test_docs_and_page_are_served_offline(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    for url in [u for u in __import__("re").findall(r'(?:src|href)="([^"]+)"', docs.text) if u.startswith("/")]:
        assert client.get(url).status_code == 200, url
    spec = client.get("/openapi.json").json()
    assert "/api/search" in spec["paths"] and "/api/thumbs/{image_id}" in spec["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "crossfind" in page.text
    for url in __import__("re").findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(url).status_code == 200, url


def test_connections_are_accepted_with_nodelay():
    """Keep-alive clients would wait for a delayed ACK on every response (Nagle)
    unless the server's connections carry TCP_NODELAY."""
    import socket

    from retrieval.server.app import _bind_tcp

    listener = _bind_tcp("127.0.0.1", 0)
    try:
        client_sock = socket.create_connection(listener.getsockname()[:2])
        conn, _ = listener.accept()
        try:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            conn.close()
            client_sock.close()
    finally:
        listener.close()
