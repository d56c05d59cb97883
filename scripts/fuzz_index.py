"""Fuzz an index run: valid files of every format plus hundreds of malformed
mutants each (truncated at random offsets, header and body bytes flipped,
lying dimensions), indexed in one run. Passes when the run finishes and every
file is either indexed or recorded as failed with a reason.

    python scripts/fuzz_index.py --per-format 300 --model shapes-tiny

Prints a markdown table per format (files, indexed, failed, crashes) and the
totals; exits 1 on any crash or any file left without an outcome.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-format", type=int, default=300, help="mutants per format (default 300)")
    ap.add_argument("--model", default="shapes-tiny", help="model spec to index with (default shapes-tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="decoding threads")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()

    from retrieval import Engine
    from retrieval.fuzz import write_mutants, write_samples

    work = args.dir or Path(tempfile.mkdtemp(prefix="crossfind-fuzz-"))
    samples = write_samples(work / "valid", seed=args.seed)
    mutants = write_mutants(work / "files", samples, args.per_format, seed=args.seed)
    for ext, src in samples.items():  # the valid originals are indexed in the same run
        (work / "files" / src.name).write_bytes(src.read_bytes())
    total = len(mutants) + len(samples)
    t0 = time.perf_counter()
    crash = None
    try:
        with Engine.open(work / "lib", model=args.model) as eng:
            rep = eng.index_folder(work / "files", workers=args.workers)
            rows = eng.store.images_under([str(work / "files")])
    except Exception as exc:  # the point of the script: report, do not hide
        crash = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0
    if crash is not None:
        print(f"CRASH after {seconds:.1f}s: {crash}")
        return 1
    by_ext: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    no_reason = 0
    for row in rows:
        ext = os.path.splitext(row.path)[1]
        by_ext[ext][row.status] += 1
        no_reason += row.status == "failed" and not row.error
    print("| format | files | indexed | failed | left pending |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for ext in sorted(by_ext):
        c = by_ext[ext]
        print(f"| {ext[1:]} | {sum(c.values())} | {c['ok']} | {c['failed']} | {c['pending']} |")
    ok = sum(c["ok"] for c in by_ext.values())
    failed = sum(c["failed"] for c in by_ext.values())
    pending = sum(c["pending"] for c in by_ext.values())
    print(f"| **all** | {len(rows)} | {ok} | {failed} | {pending} |")
    print(f"\nfiles written {total}, scanned {rep.scanned}, indexed {ok}, failed {failed} (without a reason: {no_reason}), "
          f"pending {pending}, crashes 0, {seconds:.1f}s")
    kinds = _raw_exceptions([row.path for row in rows if row.status == "failed"])
    print("what plain Pillow raises on the failed files: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    good = len(rows) == total and pending == 0 and no_reason == 0
    return 0 if good else 1


def _raw_exceptions(paths: list[str]) -> collections.Counter[str]:
    """The exception types Pillow itself raises on ``paths`` (open + load), to show
    what an index run has to survive beyond OSError."""
    import warnings

    from PIL import Image

    out: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            try:
                with Image.open(p) as im:
                    im.load()
                out["none (refused by crossfind's own checks)"] += 1
            except Exception as exc:
                out[type(exc).__name__] += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
