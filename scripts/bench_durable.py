"""What durable vectors cost: database size, opening a clean library, and
rebuilding a lost index from the store (no encoding).

Fills a library with ``--n`` synthetic 512-d image vectors (no encoding, see
``bench_common.fill_library``), then times: opening it and loading the image
index when it is in step (sidecar generation, CRC-32 and count checks), and
opening it after ``images.faiss`` was deleted (rebuilt from the vectors kept
in ``library.db``).

    python scripts/bench_durable.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench_common import fill_library, machine, random_model, say


def open_and_load(lib: Path, spec: str) -> tuple[float, int]:
    from retrieval import Engine

    t = time.perf_counter()
    with Engine.open(lib, model=spec) as eng:
        n = len(eng.state().images)
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/crossfind-durable-bench"), help="where the library goes")
    args = ap.parse_args()
    spec = random_model("ViT-B-32")
    lib = args.work / f"lib-{args.n}"
    shutil.rmtree(lib, ignore_errors=True)
    fill = fill_library(lib, spec, args.n)
    say(f"filled in {fill.get('total_s', 0):.1f}s")
    db_mb = (lib / "library.db").stat().st_size / 2**20
    faiss_file = next((lib / "models").glob("*/images.faiss"))
    faiss_mb = faiss_file.stat().st_size / 2**20
    clean = min(open_and_load(lib, spec)[0] for _ in range(args.repeat))
    rebuilds = []
    for _ in range(args.repeat):
        faiss_file.unlink()
        s, n = open_and_load(lib, spec)
        assert n == args.n, n
        rebuilds.append(s)
    out = {"n": args.n, "dim": 512, "library_db_mb": round(db_mb, 1), "images_faiss_mb": round(faiss_mb, 1),
           "open_clean_s": round(clean, 3), "open_rebuild_s": round(min(rebuilds), 3), "machine": machine()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
