#!/usr/bin/env python
"""Write a folder of generated shape scenes: images/NNNNNN.png and captions.jsonl.

Examples::

    python scripts/make_shapes.py --out data/shapes-eval --n 1000 --seed 7
    python scripts/make_shapes.py --out data/shapes-pairs --n 1000 --seed 8 --minimal-pairs

Seeds 7 (held-out scenes), 8 (held-out minimal pairs) and 9 (monitoring) are
kept out of training; training uses seeds 1000 and up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from retrieval.shapes import generate  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Generate the shapes dataset (images + captions.jsonl).",
        epilog="example: python scripts/make_shapes.py --out data/shapes --n 1000 --seed 7",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, required=True, help="seed; same seed, same bytes")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--minimal-pairs", action="store_true", help="groups of four: scene, colours swapped, shapes swapped, relation reversed")
    args = p.parse_args(argv)
    if args.n < 1 or args.size < 16:
        p.error("--n must be >= 1 and --size >= 16")

    from tqdm import tqdm

    with tqdm(total=args.n, unit="img", file=sys.stderr, disable=args.n < 500) as bar:
        records = generate(args.out, args.n, args.seed, size=args.size, minimal_pairs=args.minimal_pairs, progress=bar.update)
    print(f"wrote {len(records)} images and captions.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
