"""A real ``crossfind serve`` process: ``crossfind search`` hands its query to
it over the library's unix socket and prints exactly what it prints in process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="crossfind serve needs the 'serve' extra (pip install -e '.[dev]')")

from retrieval import Engine  # noqa: E402

CLI = [sys.executable, "-c", "from retrieval.cli import main; main()"]


def start_server(lib: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``crossfind serve`` on a free port; returns the process and its URL once it listens."""
    proc = subprocess.Popen([*CLI, "--library", str(lib), "serve", "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if "crossfind serve: http://" in line:
            return proc, line.split()[2]
        if not line and proc.poll() is not None:
            break
    stop_server(proc)
    raise AssertionError(f"crossfind serve did not start: {proc.stderr.read() if proc.stderr else ''}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def run(lib: Path, *args: str, server: bool) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("CROSSFIND_NO_SERVER", None)
    if not server:
        env["CROSSFIND_NO_SERVER"] = "1"
    return subprocess.run([*CLI, "--library", str(lib), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def served_lib(tmp_path, tiny_model, photo_dir):
    lib = tmp_path / "lib"
    (tmp_path / "caps.txt").write_text("a red square\na blue circle\n")
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)
        eng.add_texts(tmp_path / "caps.txt", corpus="caps")
    proc, url = start_server(lib)
    try:
        yield lib, proc, url
    finally:
        stop_server(proc)
    assert not (lib / "serve.sock").exists()  # the socket goes with the server


def test_search_through_server_prints_the_same(served_lib, photo_dir):
    lib, proc, _ = served_lib
    assert (lib / "serve.sock").is_socket()
    assert (lib / "serve.sock").stat().st_mode & 0o077 == 0  # only the owner may connect
    cases = [
        ["search", "a red square", "-k", "5", "--json"],
        ["search", "a red square", "-k", "5"],
        ["search", "circle", "--target", "texts", "--paths"],
        ["search", "--image", str(photo_dir / "a" / "img04.jpg"), "-k", "3", "--json"],
        ["search", "blue", "--add", f"2:{photo_dir / 'b' / 'img03.png'}", "--subtract", "red", "--path", "*/a/*", "--json"],
        ["search", "x", "--since", "2000-01-01", "--until", "2999-12-31", "--json"],
    ]
    for args in cases:
        alone = run(lib, *args, server=False)
        served = run(lib, *args, server=True)
        assert alone.returncode == 0, alone.stderr
        assert served.returncode == 0, served.stderr
        assert served.stdout == alone.stdout, args
        assert served.stderr == alone.stderr, args
    # The hand-over is lean: no torch, numpy, FAISS or SQLAlchemy in the client process.
    probe = ("import sys\nfrom retrieval.cli import main\ntry:\n    main(['--library', sys.argv[1], 'search', 'a red square', '--json'])\n"
             "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'numpy', 'faiss', 'sqlalchemy', 'PIL') if m in sys.modules))")
    lean = subprocess.run([sys.executable, "-c", probe, str(lib)], capture_output=True, text=True, timeout=120)
    assert lean.stdout.strip().splitlines()[-1] == "[]", lean.stdout + lean.stderr
    assert json.loads(lean.stdout.splitlines()[0])["hits"]
    n_before = json.loads(run(lib, "history", "-n", "100", "--json", server=False).stdout)["searches"]
    assert len(n_before) == 2 * len(cases) + 1  # the served searches are in the history too
    # Refusals read the same: a missing query image, a model nothing was indexed with.
    for args in (["search", "--image", "/no/such.png"], ["search", "x", "--model", "shapes-tiny"]):
        alone, served = run(lib, *args, server=False), run(lib, *args, server=True)
        assert alone.returncode == served.returncode == 1
        assert served.stderr == alone.stderr and served.stderr.startswith("crossfind: error:")


def test_second_server_refused_and_stale_socket_ignored(served_lib, tiny_model):
    lib, proc, _ = served_lib
    second = run(lib, "serve", "--port", "0", server=True)
    assert second.returncode == 1 and "already runs" in second.stderr
    stop_server(proc)
    assert not (lib / "serve.sock").exists()
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket file nobody listens on
    stale.bind(str(lib / "serve.sock"))
    stale.close()
    got = run(lib, "search", "a red square", "-k", "2", "--json", server=True)
    assert got.returncode == 0 and len(json.loads(got.stdout)["hits"]) == 2  # searched in process
    (lib / "serve.sock").unlink()


def test_non_loopback_needs_a_token(tmp_path):
    got = run(tmp_path / "lib", "serve", "--host", "0.0.0.0", "--port", "0", server=False)
    assert got.returncode == 1 and "--token" in got.stderr and "Traceback" not in got.stderr


def test_missing_extra_is_one_line(tmp_path):
    probe = ("import sys\nsys.modules['fastapi'] = None\nfrom retrieval.cli import main\n"
             f"main(['--library', {str(tmp_path / 'lib')!r}, 'serve'])\n")
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert got.returncode == 1
    assert got.stderr.strip() == ("crossfind: error: crossfind serve needs the 'serve' extra (fastapi is missing): "
                                  "pip install 'crossfind[serve]'")
