"""Helpers shared by the benchmark scripts (not imported by the library).

* :func:`random_model` saves a random-weight open_clip architecture as a
  ``local-dir:`` model under ``/tmp`` (the weights cannot be downloaded here;
  compute cost is the same as the real model's);
* :func:`gen_jpegs` writes folders of synthetic JPEGs with the same generator
  as the rclip peer (``/work/shared/peers/rclip/rclip_peer.py``: multi-octave
  colour noise, same seeds and file names), so the files compare;
* :func:`clustered_vectors` draws unit vectors that resemble CLIP embeddings
  (a narrow cone with a few thousand Gaussian clusters);
* :func:`fill_library` puts N synthetic images (or texts) with vectors into a
  crossfind library without encoding anything;
* :func:`machine` describes the machine for the benchmark notes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Everything the benchmarks write goes under here (never into the repo).
WORK = Path(os.environ.get("CROSSFIND_BENCH_WORK", "/tmp/crossfind-bench"))
#: Image sizes by name, as the rclip peer names them.
SIZES = {"small": (640, 480), "large": (4000, 3000)}
#: The OpenAI CLIP normalisation (open_clip's defaults), written explicitly.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """CPU model, core count, RAM, torch threads, date, and whether training jobs are running."""
    cpu = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = None
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=False).stdout.rstrip()

    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "modified": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()],
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(ram_gb, 1),
        "torch_threads": threads,
        "python": platform.python_version(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_avg": os.getloadavg(),
        "busy": busy(),
        "others_cpu": others_cpu(1.0),
    }


def busy(pattern: str = "train_shapes_model|train-reranker") -> list[str]:
    """Command lines of other heavy jobs on the machine (training runs) that would distort timings."""
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False).stdout
    me = str(os.getpid())
    return [line for line in out.splitlines() if line and not line.startswith(me + " ") and "pgrep" not in line]


def _cpu_ticks() -> dict[int, tuple[int, str, int]]:
    """pid -> (user+system ticks, command line, parent pid) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(d)] = (int(fields[11]) + int(fields[12]), cmd or stat[stat.find("(") + 1 : stat.rfind(")")], int(fields[1]))
    return out


def _mine(procs: dict[int, tuple[int, str, int]]) -> set[int]:
    """This process and all its descendants."""
    mine = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (_, _, ppid) in procs.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return mine


def _others_seconds(before: dict[int, tuple[int, str, int]], after: dict[int, tuple[int, str, int]]) -> list[tuple[float, str]]:
    """(CPU seconds, command line) used between two :func:`_cpu_ticks` samples
    by each process outside this one's tree that lived through both."""
    mine = _mine(after) | _mine(before)
    hz = os.sysconf("SC_CLK_TCK")
    return [((ticks - before[pid][0]) / hz, cmd) for pid, (ticks, cmd, _) in after.items() if pid not in mine and pid in before]


def others_cpu(seconds: float = 2.0) -> list[tuple[float, str]]:
    """Processes outside this one's tree using over 10% of a core, sampled over ``seconds``."""
    a = _cpu_ticks()
    time.sleep(seconds)
    busy_procs = []
    for sec, cmd in _others_seconds(a, _cpu_ticks()):
        pct = 100.0 * sec / seconds
        if pct > 10:
            busy_procs.append((round(pct), cmd[:100]))
    return sorted(busy_procs, reverse=True)


class Monitor:
    """Samples, once a second in a thread, the CPU that processes outside this
    one's tree use; ``report()`` gives the average in cores and the worst ones.

    Use it around a measurement to show (or rule out) interference::

        with Monitor() as mon:
            ...
        print(mon.report())
    """

    def __init__(self, interval: float = 1.0) -> None:
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples: list[float] = []  # cores used by others in each interval
        self.top: dict[str, float] = {}  # command -> CPU seconds

    def _run(self) -> None:
        prev, t_prev = _cpu_ticks(), time.monotonic()
        while not self._stop.wait(self.interval):
            cur, t = _cpu_ticks(), time.monotonic()
            used = 0.0
            for sec, cmd in _others_seconds(prev, cur):
                if sec > 0:
                    used += sec
                    self.top[cmd[:80]] = self.top.get(cmd[:80], 0.0) + sec
            self.samples.append(used / max(t - t_prev, 1e-6))
            prev, t_prev = cur, t

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        """``others_cores_avg``/``max`` and the commands that used over 1 CPU-second."""
        s = self.samples or [0.0]
        top = sorted(((round(v, 1), k) for k, v in self.top.items() if v > 1.0), reverse=True)[:5]
        return {"others_cores_avg": round(sum(s) / len(s), 3), "others_cores_max": round(max(s), 2), "others_top": top}


def wait_quiet(max_minutes: float, poll_s: float = 60.0, others: bool = True) -> bool:
    """Wait up to ``max_minutes`` for :func:`busy` to be empty (and, with ``others``,
    for no other process to use over 10% of a core); True when quiet."""
    deadline = time.monotonic() + max_minutes * 60
    while True:
        jobs = busy()
        if not jobs and others:
            jobs = [f"{pct}% {cmd}" for pct, cmd in others_cpu()]
        if not jobs:
            return True
        if time.monotonic() >= deadline:
            print(f"[bench] still busy after {max_minutes:g} min, measuring anyway: {jobs}", file=sys.stderr)
            return False
        print(f"[bench] waiting for: {'; '.join(jobs)}", file=sys.stderr, flush=True)
        time.sleep(poll_s)


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def write_json(path: str | os.PathLike[str] | None, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` (``-`` or None: stdout)."""
    text = json.dumps(obj, indent=1, default=str)
    if path in (None, "-"):
        print(text)
    else:
        Path(path).write_text(text + "\n")


# ------------------------------------------------------------------ models


def random_model(arch: str = "ViT-B-32", root: Path | None = None, seed: int = 0) -> str:
    """The spec of a random-weight open_clip ``arch`` saved as a ``local-dir:`` model (cached).

    The folder holds ``open_clip_config.json`` (``model_cfg`` from
    ``open_clip.get_model_config(arch)``, OpenAI CLIP normalisation, the
    architecture's image size) and float32 ``open_clip_model.safetensors`` from
    ``open_clip.create_model(arch)`` after ``torch.manual_seed(seed)``.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = (root or WORK / "models") / f"{arch}-random-s{seed}"
    cfg_path, weights = folder / "open_clip_config.json", folder / "open_clip_model.safetensors"
    if cfg_path.is_file() and weights.is_file():
        return f"local-dir:{folder}"
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise SystemExit(f"unknown open_clip architecture {arch!r}")
    size = model_cfg["vision_cfg"].get("image_size", 224)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "size": size}}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / weights.name))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return f"local-dir:{folder}"


# ------------------------------------------------------------------ images


def _make_jpeg(task: tuple[str, int, int, int, int]) -> int:
    """One synthetic JPEG, exactly as rclip_peer.py's ``_make_jpeg`` draws it."""
    from PIL import Image

    path, width, height, seed, quality = task
    rng = np.random.default_rng(seed)
    acc = np.full((height, width, 3), 128.0, np.float32)
    # three octaves of bicubic-upscaled colour noise (blobs, texture, fine detail) + per-pixel grain
    for div, amp in ((400, 110.0), (60, 60.0), (12, 35.0)):
        cw, ch = max(2, width // div), max(2, height // div)
        low = rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        acc += (up - 128.0) * (amp / 128.0)
    acc += rng.standard_normal((height, width, 3), dtype=np.float32) * 4.0
    img = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))
    tmp = path + ".tmp"
    img.save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)
    return os.path.getsize(path)


def gen_jpegs(n: int, size: str = "small", root: Path | None = None, seed: int = 0, quality: int = 90) -> Path:
    """A folder of ``n`` distinct synthetic JPEGs of ``size`` (``small``, ``large`` or ``WxH``); cached.

    Same generator, seeds, names and ``.complete`` marker as the rclip peer's
    ``gen-images``, so a folder made here and one made there hold the same files.
    """
    width, height = SIZES[size] if size in SIZES else tuple(int(x) for x in size.lower().split("x"))
    out = (root or WORK / "images") / f"{size}-{width}x{height}-n{n}"
    marker = out / ".complete"
    spec = f"{n} {width}x{height} seed={seed} q={quality}"
    if marker.is_file() and marker.read_text().strip() == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tasks = [(str(out / f"IMG_{i:06d}.jpg"), width, height, seed * 1_000_003 + i, quality) for i in range(n)]
    t0 = time.perf_counter()
    from multiprocessing import Pool

    with Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_make_jpeg, tasks, chunksize=max(1, n // ((os.cpu_count() or 1) * 8)))
    marker.write_text(spec + "\n")
    say(f"generated {n} {width}x{height} JPEGs in {out} ({sum(sizes) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return out


def read_files(folder: Path) -> None:
    """Read every file once so all methods start from the page cache."""
    for p in sorted(folder.iterdir()):
        if p.is_file():
            p.read_bytes()


# ----------------------------------------------------------------- vectors


def clustered_vectors(n: int, dim: int = 512, clusters: int = 4000, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """``n`` unit vectors shaped like CLIP image embeddings, float32 ``(n, dim)``.

    Each vector is ``normalise(a*m + b*c_j + g*e)``: ``m`` a direction shared
    by all (CLIP embeddings sit in a narrow cone), ``c_j`` one of ``clusters``
    random cluster directions (cluster sizes uneven: Dirichlet weights), ``e``
    per-vector Gaussian noise; with a^2=0.45, b^2=0.30, g^2=0.25, two vectors of
    one cluster have cosine ~0.75 and of different clusters ~0.45. The same
    ``seed`` gives the same cluster layout, so queries drawn with another seed
    (:func:`clustered_queries`) come from the same distribution.
    """
    layout = np.random.default_rng(seed)
    mean = layout.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = layout.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = layout.dirichlet(np.full(clusters, 2.0))
    return _draw(n, mean, centres, weights, np.random.default_rng(seed + 1), chunk)


def clustered_queries(n: int, dim: int = 512, clusters: int = 4000, seed: int = 0, query_seed: int = 12345) -> np.ndarray:
    """``n`` fresh vectors from the distribution of ``clustered_vectors(..., seed=seed)``."""
    layout = np.random.default_rng(seed)
    mean = layout.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = layout.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = layout.dirichlet(np.full(clusters, 2.0))
    return _draw(n, mean, centres, weights, np.random.default_rng(query_seed), 100_000)


def _draw(n: int, mean: np.ndarray, centres: np.ndarray, weights: np.ndarray, rng: np.random.Generator, chunk: int) -> np.ndarray:
    dim = len(mean)
    a, b, g = np.sqrt(0.45), np.sqrt(0.30), np.sqrt(0.25)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.choice(len(centres), size=m, p=weights)
        noise = rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        x = a * mean + b * centres[which] + g * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


# ----------------------------------------------------------------- library


WORDS = (
    "red blue green small large old new wooden metal shiny dark bright striped round square tall".split(),
    "dog cat car house tree boat bicycle chair table lamp horse bird flower mountain bridge train".split(),
    "on under beside behind near above in front of".split(),
    "beach street forest kitchen garden river field city park table".split(),
)


def caption(i: int) -> str:
    """A short synthetic caption, distinct per ``i``."""
    a, n, p, w = WORDS
    return f"a {a[i % len(a)]} {n[(i // 16) % len(n)]} {p[(i // 256) % len(p)]} the {w[(i // 2304) % len(w)]}, photo {i}"


def fill_library(lib: Path, spec: str, n: int, kind: str = "images", seed: int = 0, chunk: int = 50_000) -> dict[str, float]:
    """Put ``n`` synthetic images (or texts) with clustered vectors into the library at ``lib``.

    Rows go into the store with SQLAlchemy (``Image``/``TextItem`` rows, then
    vector rows through ``store.set_image_vectors``/``set_text_vectors``), the
    vectors into the model's :class:`index.VectorIndex` in chunks of ``chunk``
    as indexing would add them (so the index becomes IVF when it crosses
    ``IVF_THRESHOLD``, with the list count chosen then), and the index is saved.
    Returns timings of the build. Idempotent: a ``.filled`` marker records it.
    """
    from sqlalchemy import insert

    from retrieval import Engine
    from retrieval.store import Image, TextItem

    marker = lib / f".filled-{kind}"
    want = f"{spec} n={n} seed={seed}"
    if marker.is_file() and marker.read_text().strip() == want:
        return {}
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with Engine.open(lib, model=spec) as eng, eng.writer():
        state = eng.state()
        model_id = state.row.id
        store = eng.store
        if store.get_setting("default_model") is None:
            store.set_setting("default_model", state.spec.spec)
        index = state.images if kind == "images" else state.texts
        if len(index):
            raise SystemExit(f"{lib} already has {kind} vectors; use a fresh folder")
        vecs = clustered_vectors(n, state.dim, seed=seed)
        timings["vectors_s"] = time.perf_counter() - t0
        t_rows = t_index = 0.0
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            t = time.perf_counter()
            if kind == "images":
                rows = [
                    {
                        "path": f"/photos/{2000 + i // 100_000}/{(i // 1000) % 100:02d}/IMG_{i:07d}.jpg",
                        "size": 2_000_000 + i,
                        "mtime_ns": 1_500_000_000_000_000_000 + i,
                        "content_hash": f"{seed:04x}{i:028x}",
                        "status": "ok",
                        "width": 4000,
                        "height": 3000,
                        "taken_at": dt.datetime(2020, 1, 1) + dt.timedelta(minutes=i),
                    }
                    for i in range(start, start + m)
                ]
                ids = list(store.session.scalars(insert(Image).returning(Image.id, sort_by_parameter_order=True), rows))
                store.set_image_vectors(
                    model_id, [(i, r["content_hash"], False) for i, r in zip(ids, rows)], vecs[start : start + m]
                )
            else:
                rows = [
                    {"corpus": "bench", "ext_id": str(i), "text": caption(i), "content_hash": f"{seed:04x}{i:028x}"}
                    for i in range(start, start + m)
                ]
                ids = list(store.session.scalars(insert(TextItem).returning(TextItem.id, sort_by_parameter_order=True), rows))
                store.set_text_vectors(model_id, [(i, r["content_hash"]) for i, r in zip(ids, rows)], vecs[start : start + m])
            store.session.flush()
            t_rows += time.perf_counter() - t
            t = time.perf_counter()
            index.add(np.asarray(ids, np.int64), vecs[start : start + m])
            t_index += time.perf_counter() - t
            say(f"{kind}: {start + m}/{n} rows and vectors ({index.kind})")
        t = time.perf_counter()
        state.save_images() if kind == "images" else state.save_texts()
        store.commit()
        timings.update(rows_s=t_rows, index_add_s=t_index, save_s=time.perf_counter() - t, total_s=time.perf_counter() - t0)
        timings["index_kind"] = index.kind  # type: ignore[assignment]
    marker.write_text(want + "\n")
    return timings


def used_export(spec: str, lib: Path, folder: Path) -> tuple[Path, float | None]:
    """The ONNX export of ``spec`` in library ``lib`` as a library holds it after
    its first ``crossfind index``: made now by one (of ``folder``, a new
    process) when missing or of an older export version, with OpenVINO's
    precision verdict for this CPU. Returns the export folder and the wall
    seconds of that first run (None when the export was there)."""
    from retrieval.encoders import parse_spec, weights_fingerprint
    from retrieval.onnx_runtime import OnnxEncoder, export_key, find_export

    ms = parse_spec(spec)
    key = export_key(ms, weights_fingerprint(ms))
    wall = None
    if find_export(lib, ms, key) is None:
        shutil.rmtree(lib, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("crossfind")), "--library", str(lib), "index", str(folder),
                        "--model", spec, "--json"], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
    where = find_export(lib, ms, key)
    assert where is not None
    OnnxEncoder(where, ms).session("image")  # the verdict and IR, also for an export made by an older crossfind
    return where, wall


def seed_library(lib: Path, export_from: Path) -> None:
    """A fresh library holding the ONNX exports of library ``export_from`` (as after their first use), hard-linked."""
    shutil.rmtree(lib, ignore_errors=True)
    for src in export_from.glob("models/*/onnx"):
        shutil.copytree(src, lib / src.relative_to(export_from), copy_function=os.link)
