"""kill -9 trials and concurrent writers: does every crash leave a consistent library?

Each trial starts one writing command as a separate process (``index`` of a
folder, ``add-texts``, ``remove`` of a folder, or a search that must rebuild a
deleted index file), kills it with SIGKILL at a random moment, then checks the
library twice:

* right after the kill (opening it repairs what the crash left): the vector
  rows in the store and the ids in each FAISS index are the same set, with no
  id twice, and every vector is found first by itself;
* after the same command is run again to completion: the same, and the items
  are exactly the ones the commands asked for (every image of the indexed
  folders not removed since, every text of the added corpora), each
  searchable exactly once.

Then two ``index`` runs on different folders and two ``add-texts`` run at
once, and the same checks follow.

    python scripts/crash_trials.py --trials 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import machine  # noqa: E402

CLI = [sys.executable, "-c", "from retrieval.cli import main; main()"]
FOLDERS = 6


def noise_image(seed: int, size: tuple[int, int] = (96, 96)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.NEAREST)


def make_data(root: Path, per_folder: int, texts: int) -> None:
    for f in range(FOLDERS):
        d = root / "photos" / f"f{f}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            noise_image(f * 10_000 + i).save(d / f"{i:04d}.png")
    for c in range(3):
        (root / f"corpus{c}.txt").write_text("".join(f"corpus {c} caption {j} of a scene\n" for j in range(texts)))


def run(lib: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "--library", str(lib), *args], capture_output=True, text=True, timeout=timeout)


def check(lib: Path, model: str, expect_images: set[str] | None, expect_texts: int | None) -> list[str]:
    """What is wrong with the library (empty: consistent)."""
    from retrieval import Engine

    problems: list[str] = []
    with Engine.open(lib, model=model) as eng:
        state = eng.state()
        if eng.store.find_model(state.spec.spec) is None:
            return [] if not expect_images and not expect_texts else ["model has no rows"]
        for kind in ("images", "texts"):
            index = state.images if kind == "images" else state.texts
            ids = index.ids()
            rows = eng.store.image_vector_map(state.row.id) if kind == "images" else eng.store.text_vector_map(state.row.id)
            if len(ids) != len(set(ids.tolist())):
                problems.append(f"{kind}: an id twice in the index")
            if set(ids.tolist()) != set(rows):
                problems.append(f"{kind}: index holds {len(ids)} ids, store {len(rows)} rows, not the same set")
            if len(ids):
                top = index.search(index.reconstruct(ids), 1).ids[:, 0]
                if not (top == ids).all():
                    problems.append(f"{kind}: {(top != ids).sum()} vectors not found first by themselves")
        ok = set(eng.store.image_ids("ok"))
        if ok - set(eng.store.image_vector_map(state.row.id)) and expect_images is not None:
            problems.append("images: an ok image without a vector")
        if expect_images is not None:
            paths = {r.path for r in eng.store.images_by_id(sorted(ok)).values()}
            if paths != expect_images:
                problems.append(f"images: {len(paths)} searchable, expected {len(expect_images)}")
        if expect_texts is not None and len(eng.store.text_vector_map(state.row.id)) != expect_texts:
            problems.append(f"texts: {len(eng.store.text_vector_map(state.row.id))} searchable, expected {expect_texts}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="kill -9 trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="shapes-tiny", help="model spec (default: the bundled shapes-tiny, with its reranker)")
    ap.add_argument("--per-folder", type=int, default=120, help="images in each of the 6 folders")
    ap.add_argument("--texts", type=int, default=2000, help="texts in each of the 3 corpora")
    ap.add_argument("--work", type=Path, default=Path("/tmp/crossfind-crash-trials"))
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    make_data(args.work, args.per_folder, args.texts)
    lib = args.work / "lib"
    photos = args.work / "photos"
    assert run(lib, "set-default-model", args.model).returncode == 0

    indexed: set[int] = set()  # folders whose images should be searchable
    corpora: set[int] = set()
    durations: dict[str, float] = {}
    rows = []
    t_start = time.perf_counter()
    batch = ["--batch-size", "8", "--checkpoint-seconds", "0"]

    def command(op: str, arg: int) -> list[str]:
        if op == "index":
            return ["index", str(photos / f"f{arg}"), *batch]
        if op == "add-texts":
            return ["add-texts", str(args.work / f"corpus{arg}.txt")]
        if op == "remove":
            return ["remove", str(photos / f"f{arg}")]
        return ["search", "a scene", "-k", "1", "--no-rerank"]  # rebuild: the search repairs the deleted index

    def expected() -> tuple[set[str], int]:
        paths = {str(p) for f in indexed for p in (photos / f"f{f}").iterdir()}
        return paths, len(corpora) * args.texts

    for trial in range(args.trials):
        choices = ["index", "add-texts"]
        if indexed:
            choices += ["remove", "rebuild"]
        op = rng.choice(choices)
        if op == "index":
            arg = rng.choice([f for f in range(FOLDERS) if f not in indexed] or list(range(FOLDERS)))
        elif op == "add-texts":
            arg = rng.choice([c for c in range(3) if c not in corpora] or [0, 1, 2])
        elif op == "remove":
            arg = rng.choice(sorted(indexed))
        else:
            arg = 0
            for f in (lib / "models").glob("*/images.faiss"):
                f.unlink()
        cmd = command(op, arg)
        # Kill somewhere between start-up and the time the whole command takes
        # (measured on its first uninterrupted run; 8 s before that).
        span = durations.get(op, 8.0)
        delay = rng.uniform(0.2 * span, 0.95 * span)
        proc = subprocess.Popen([*CLI, "--library", str(lib), *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        alive = proc.poll() is None
        if alive:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        after_kill = check(lib, args.model, None, None)
        t = time.perf_counter()
        done = run(lib, *cmd)
        durations.setdefault(op, time.perf_counter() - t)
        if op == "index":
            indexed.add(arg)
        elif op == "add-texts":
            corpora.add(arg)
        elif op == "remove":
            indexed.discard(arg)
        want_images, want_texts = expected()
        after_rerun = check(lib, args.model, want_images, want_texts)
        if done.returncode != 0:
            after_rerun.append(f"rerun failed: {done.stderr.strip().splitlines()[-1:]}")
        row = {"trial": trial, "op": op, "kill_after_s": round(delay, 2), "killed_mid_run": alive,
               "after_kill": after_kill, "after_rerun": after_rerun}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Two writers at once on different folders, and two add-texts.
    for f in range(FOLDERS):
        if f not in indexed:
            run(lib, "remove", str(photos / f"f{f}"))
    free = [f for f in range(FOLDERS) if f not in indexed][:2]
    concurrent: dict[str, object] = {}
    if len(free) == 2:
        procs = [subprocess.Popen([*CLI, "--library", str(lib), *command("index", f)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for f in free]
        outs = [p.communicate(timeout=900) for p in procs]
        indexed.update(free)
        concurrent["index_exit"] = [p.returncode for p in procs]
        concurrent["a_writer_waited"] = any("waiting for another" in e for _, e in outs)
    run(lib, "remove-texts", "--corpus", "corpus0")
    run(lib, "remove-texts", "--corpus", "corpus1")
    corpora.difference_update({0, 1})
    procs = [subprocess.Popen([*CLI, "--library", str(lib), *command("add-texts", c)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    corpora.update({0, 1})
    concurrent["add_texts_exit"] = [p.returncode for p in procs]
    want_images, want_texts = expected()
    concurrent["problems"] = check(lib, args.model, want_images, want_texts)
    concurrent["images"], concurrent["texts"] = len(want_images), want_texts
    print(json.dumps({"concurrent": concurrent}), flush=True)

    by_op: dict[str, dict[str, int]] = {}
    for r in rows:
        o = by_op.setdefault(str(r["op"]), {"trials": 0, "killed_mid_run": 0, "consistent_after_kill": 0, "complete_after_rerun": 0})
        o["trials"] += 1
        o["killed_mid_run"] += bool(r["killed_mid_run"])
        o["consistent_after_kill"] += not r["after_kill"]
        o["complete_after_rerun"] += not r["after_rerun"]
    summary = {"by_op": by_op, "concurrent": concurrent, "seconds": round(time.perf_counter() - t_start, 1),
               "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print("\n| operation | trials | killed mid-run | consistent after the kill | complete after rerun |")
    print("|---|---:|---:|---:|---:|")
    for op, o in sorted(by_op.items()):
        print(f"| {op} | {o['trials']} | {o['killed_mid_run']} | {o['consistent_after_kill']} | {o['complete_after_rerun']} |")
    print(f"\nconcurrent writers: {json.dumps(concurrent)}")
    print(f"total {summary['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    bad = [r for r in rows if r["after_kill"] or r["after_rerun"]] or concurrent["problems"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
