"""Shared fixtures: a tiny random-weight open_clip model saved as a local-dir:
model (the loading path real models use), real image files in many formats,
and CLI helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
from PIL import Image

TINY_CFG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}


def write_tiny_model(folder: Path, seed: int = 0, model_cfg: dict | None = None, preprocess_cfg: dict | None = None) -> Path:
    """Save a random-weight open_clip model as a ``local-dir:`` folder (config
    and safetensors): ``TINY_CFG`` unless ``model_cfg``/``preprocess_cfg`` say otherwise."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = {
        "model_cfg": TINY_CFG["model_cfg"] if model_cfg is None else model_cfg,
        "preprocess_cfg": TINY_CFG["preprocess_cfg"] if preprocess_cfg is None else preprocess_cfg,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Spec of a tiny random-weight ViT CLIP saved as a local-dir: model."""
    return f"local-dir:{write_tiny_model(tmp_path_factory.mktemp('tiny-model'))}"


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> str:
    """A second tiny model (other weights), for models-side-by-side tests."""
    return f"local-dir:{write_tiny_model(tmp_path_factory.mktemp('tiny-model-b'), seed=1)}"


def noise_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A distinct image per seed: blocky colour noise so encodings differ clearly."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.NEAREST)


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """12 distinct JPEG/PNG images in a small tree."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(12):
        sub = "a" if i % 2 == 0 else "b"
        ext = "jpg" if i % 3 else "png"
        noise_image(i).save(root / sub / f"img{i:02d}.{ext}")
    return root


def vector_rows(db: Path) -> int:
    """Committed image vector rows in the SQLite store ``db`` (0 before its tables exist)."""
    import sqlite3

    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return con.execute("select count(*) from image_vectors").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def kill_indexing_when(folder: Path, lib: Path, model: str, ready: Callable[[], bool], timeout: float = 120.0,
                       extra: Sequence[str] = ()) -> None:
    """Run ``crossfind index`` on ``folder`` (with ``extra`` options) in a subprocess and kill -9 it once ``ready()``.

    Batches of 4 with a checkpoint after each, so the kill lands between
    durable steps; fails the test when indexing ends before ``ready()`` holds.
    """
    cmd = [sys.executable, "-c", "from retrieval.cli import main; main()", "--library", str(lib), "index", str(folder),
           "--model", model, "--batch-size", "4", "--workers", "1", "--checkpoint-seconds", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "indexing finished before it could be killed; make the folder larger"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def _torch_unless_onnx_test(request, monkeypatch):
    """Tests outside tests/test_onnx.py run the torch encoders (CROSSFIND_ONNX=0):
    an ONNX export per test library would add seconds to each. test_onnx.py
    checks the ONNX path against torch, end to end."""
    if request.module.__name__.rpartition(".")[2] not in ("test_onnx", "test_quick"):
        monkeypatch.setenv("CROSSFIND_ONNX", "0")


# ------------------------------------------------------------------ PostgreSQL
@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the session (tests/pgserver.py); the tests
    that need it skip, saying why, only when none can be started here."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests need psycopg: pip install -e '.[dev]'")
    from pgserver import PgServer

    try:
        server = PgServer()
    except Exception as exc:  # noqa: BLE001 - any reason it cannot start is a reason to skip
        pytest.skip(f"no PostgreSQL server could be started: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_url(pg_server) -> str:
    """The URL of the session server's maintenance database (``postgres``)."""
    return pg_server.url()


@pytest.fixture
def pg_db(pg_server) -> str:
    """The URL of a new, empty database on the session's server."""
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, monkeypatch) -> str | None:
    """Run a test on both stores: None for SQLite in the library folder, or the
    URL of a new PostgreSQL database, set as $CROSSFIND_DATABASE_URL so that
    ``Engine.open`` and ``crossfind`` subprocesses use it."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_db")
        monkeypatch.setenv("CROSSFIND_DATABASE_URL", url)
        return url
    monkeypatch.delenv("CROSSFIND_DATABASE_URL", raising=False)
    return None
