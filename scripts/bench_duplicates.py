#!/usr/bin/env python
"""Measure near-duplicate detection: pair precision/recall over a threshold sweep, and speed at scale.

``pairs`` (the default) builds a labelled set, indexes it with ``--model`` and
runs ``retrieval.duplicates.find_duplicates`` at each threshold of the sweep:

* sources: shapes scenes (``retrieval.shapes``, rendered at 256 px) and
  multi-octave noise JPEGs (``bench_common``'s generator, 320x240); or, with
  ``--folder``, a random sample of your own images;
* each source gets ``--copies`` transformed copies: resized to 25-100 %,
  re-encoded as JPEG at quality 40-95, and each with probability 1/2 cropped
  (up to 10 % of width and height), rotated (up to 4 degrees, then cropped
  to the largest upright rectangle inside, as photo editors do) and brightened
  or darkened (up to 20 %);
* unrelated images: more scenes and noise JPEGs (or, with ``--folder``, other
  images of the folder), none a copy of another.

A true pair is two files of one source family. Reported per threshold: the
precision and recall of the pairs ``find_duplicates`` puts in one group (what a
user sees), per subset, and of the raw pairs at or above the threshold. The
suggested threshold is the highest one whose recall is within a point of the
best recall among the settings whose grouped precision is at least
``--min-precision`` (a higher threshold leaves fewer candidate pairs to check). The sweep runs once with the embeddings
alone and once per pixel-check threshold (``--pixel-thresholds``).

``scale`` times ``find_duplicates`` over a library of N synthetic CLIP-like
512-d vectors (``bench_common.clustered_vectors``) with planted near-duplicates
(copies of 1 % of the vectors moved to cosine ~0.97), built without encoding
anything: time, peak memory (RSS), and the planted pairs found. The rows name no
real files, so the pixel check is timed apart: its cost per 4000x3000 JPEG
(it reads each image of a candidate pair once).

Examples::

    python scripts/bench_duplicates.py --model shapes-tiny                      # the default threshold's numbers
    python scripts/bench_duplicates.py --model ViT-B-32:laion2b_s34b_b79k --folder ~/Pictures --sample 100
    python scripts/bench_duplicates.py scale --n 100000
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import WORK, Monitor, _make_jpeg, fill_library, gen_jpegs, machine, say, write_json

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


# ------------------------------------------------------------------ copies


def transform(img, rng: np.random.Generator):
    """One transformed copy of a PIL image and a short description of what was done."""
    from PIL import Image, ImageEnhance

    img = img.convert("RGB")
    what = []
    w, h = img.size
    if rng.random() < 0.5:  # crop: up to 10 % of each dimension, split between the sides
        fx, fy = rng.uniform(0, 0.10, 2)
        lx, ly = rng.uniform(0, 1, 2)
        left, top = int(w * fx * lx), int(h * fy * ly)
        right, bottom = w - int(w * fx * (1 - lx)), h - int(h * fy * (1 - ly))
        img = img.crop((left, top, right, bottom))
        what.append(f"crop{max(fx, fy):.2f}")
    if rng.random() < 0.5:
        # As photo editors rotate: turn, then crop to the largest upright rectangle inside (no blank wedges).
        angle = float(rng.uniform(-4, 4))
        rw, rh = img.size
        a = np.radians(abs(angle))
        cw = (rw * np.cos(a) - rh * np.sin(a)) / np.cos(2 * a)
        ch = (rh * np.cos(a) - rw * np.sin(a)) / np.cos(2 * a)
        img = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
        dx, dy = (rw - cw) / 2, (rh - ch) / 2
        img = img.crop((int(np.ceil(dx)), int(np.ceil(dy)), int(rw - np.ceil(dx)), int(rh - np.ceil(dy))))
        what.append(f"rot{angle:.1f}")
    if rng.random() < 0.5:
        factor = float(rng.uniform(0.8, 1.2))
        img = ImageEnhance.Brightness(img).enhance(factor)
        what.append(f"bright{factor:.2f}")
    scale = float(rng.uniform(0.25, 1.0))
    img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.Resampling.LANCZOS)
    quality = int(rng.integers(40, 96))
    what.append(f"scale{scale:.2f}")
    what.append(f"q{quality}")
    return img, quality, "+".join(what)


def distinct_scenes(n: int, seed: int, same_key: bool) -> list:
    """``n`` shapes samples at 256 px; unless ``same_key``, no two with the same scene
    (same objects, colours, sizes and relations: shapes-tiny is trained to embed those alike)."""
    from retrieval.shapes import samples

    out, seen, k = [], set(), 0
    while len(out) < n:
        sample = next(iter(samples(1, seed=seed * 100_000 + k, size=256)))
        k += 1
        if same_key or sample.scene.key() not in seen:
            seen.add(sample.scene.key())
            out.append(sample)
    return out


def build_generated(out: Path, sources: int, copies: int, unrelated: int, seed: int, same_key: bool = False,
                    subsets: tuple[str, ...] = ("shapes", "noise")) -> list[dict]:
    """Sources, copies and unrelated images of both subsets under ``out``; one record per file."""
    from PIL import Image

    records: list[dict] = []
    rng = np.random.default_rng(seed)
    scenes = distinct_scenes(sources + unrelated, seed, same_key) if "shapes" in subsets else []
    for subset in subsets:
        d = out / subset
        d.mkdir(parents=True, exist_ok=True)
        for i in range(sources + unrelated):
            if subset == "shapes":
                img = scenes[i].image
                src = d / f"s{i:04d}.png"
                img.save(src)
            else:
                src = d / f"s{i:04d}.jpg"
                _make_jpeg((str(src), 320, 240, seed * 1_000_003 + i, 95))
                img = Image.open(src)
            family = f"{subset}/{i}"
            records.append({"path": str(src), "family": family, "subset": subset, "copy": None})
            if i >= sources:
                continue  # unrelated: no copies
            for c in range(copies):
                cp, quality, what = transform(img, rng)
                path = d / f"s{i:04d}_c{c}.jpg"
                cp.save(path, "JPEG", quality=quality)
                records.append({"path": str(path), "family": family, "subset": subset, "copy": what})
    return records


def build_from_folder(out: Path, folder: Path, sample: int, copies: int, unrelated: int, seed: int) -> list[dict]:
    """A sample of ``folder``'s images with copies, plus other images of it, copied under ``out``."""
    from PIL import Image, ImageOps

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if len(files) < sample + 1:
        raise SystemExit(f"{folder} holds {len(files)} images; --sample {sample} needs more")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(files))[: sample + unrelated]
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for n, k in enumerate(chosen.tolist()):
        src = files[k]
        dst = out / f"s{n:05d}{src.suffix.lower()}"
        shutil.copyfile(src, dst)
        family = f"user/{n}"
        records.append({"path": str(dst), "family": family, "subset": "user", "copy": None})
        if n >= sample:
            continue
        try:
            img = ImageOps.exif_transpose(Image.open(src))
        except OSError as exc:
            say(f"skipping {src}: {exc}")
            continue
        for c in range(copies):
            cp, quality, what = transform(img, rng)
            path = out / f"s{n:05d}_c{c}.jpg"
            cp.save(path, "JPEG", quality=quality)
            records.append({"path": str(path), "family": family, "subset": "user", "copy": what})
    return records


# ------------------------------------------------------------------ scoring


def pair_set(groups: list[list[str]]) -> set[tuple[str, str]]:
    out = set()
    for g in groups:
        for a, b in itertools.combinations(sorted(g), 2):
            out.add((a, b))
    return out


def score(pred: set[tuple[str, str]], truth: set[tuple[str, str]], subset_of: dict[str, str], subsets: list[str]) -> dict:
    """Precision/recall overall and per subset (a predicted pair across subsets counts against both)."""
    def pr(p: set, t: set) -> dict:
        tp = len(p & t)
        return {"precision": round(tp / len(p), 4) if p else 1.0, "recall": round(tp / len(t), 4) if t else 1.0,
                "predicted": len(p), "true": len(t), "tp": tp}

    out = {"all": pr(pred, truth)}
    for s in subsets:
        ps = {x for x in pred if subset_of[x[0]] == s or subset_of[x[1]] == s}
        ts = {x for x in truth if subset_of[x[0]] == s}
        out[s] = pr(ps, ts)
    return out


def run_pairs(args: argparse.Namespace) -> dict:
    from retrieval import Engine
    from retrieval import duplicates
    from retrieval.duplicates import find_duplicates

    work = args.work / ("folder" if args.folder else "generated-" + args.subsets.replace(",", "-"))
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    if args.folder:
        records = build_from_folder(work / "images", args.folder.expanduser(), args.sample, args.copies, args.unrelated, args.seed)
    else:
        records = build_generated(work / "images", args.sources, args.copies, args.unrelated, args.seed, args.same_key_scenes,
                                  tuple(args.subsets.split(",")))
    say(f"built {len(records)} files in {time.perf_counter() - t0:.1f}s under {work / 'images'}")
    family = {r["path"]: r["family"] for r in records}
    subset_of = {r["path"]: r["subset"] for r in records}
    subsets = sorted(set(subset_of.values()))
    by_family: dict[str, list[str]] = {}
    for r in records:
        by_family.setdefault(r["family"], []).append(r["path"])
    truth = pair_set(list(by_family.values()))

    thresholds = [round(float(t), 4) for t in np.arange(args.t_min, args.t_max + 1e-9, args.t_step)]
    rows = []
    with Engine.open(work / "library", model=args.model) as eng:
        t = time.perf_counter()
        rep = eng.index_folder(work / "images", progress=True)
        say(f"indexed {rep.encoded} images with {args.model} in {time.perf_counter() - t:.1f}s ({rep.failed} failed)")
        ids, vecs = eng.state().images.vectors()
        paths = {i: r.path for i, r in eng.store.images_by_id(ids.tolist()).items()}
        sims = vecs @ vecs.T
        iu = np.triu_indices(len(ids), 1)
        flat = sims[iu]
        raw_scores = {}
        for th in thresholds:
            hit = flat >= th
            raw = {tuple(sorted((paths[int(ids[a])], paths[int(ids[b])]))) for a, b in zip(iu[0][hit], iu[1][hit])}
            raw_scores[th] = score(raw, truth, subset_of, subsets)
        for pixel in args.pixel_thresholds.split(","):
            verify = pixel != "none"
            if verify:
                duplicates.PIXEL_THRESHOLD = float(pixel)
            for th in thresholds:
                res = find_duplicates(eng, threshold=th, verify=verify)
                grouped = pair_set([[it.path for it in g.items] for g in res.groups])
                rows.append({"pixel": pixel, "threshold": th, "groups": len(res.groups), "seconds": round(res.seconds, 3),
                             "grouped": score(grouped, truth, subset_of, subsets), "raw": raw_scores[th]})
        # Similarities of true pairs and of the nearest unrelated image, per subset: where the two overlap.
        spread = {}
        for s in subsets:
            idx = [k for k, i in enumerate(ids.tolist()) if subset_of[paths[i]] == s]
            fam = np.array([family[paths[int(ids[k])]] for k in idx])
            sub = sims[np.ix_(idx, idx)]
            same = fam[:, None] == fam[None, :]
            np.fill_diagonal(same, False)
            tri = np.triu(np.ones_like(same), 1)
            pos, neg = sub[same & tri], sub[~same & tri.astype(bool)]
            spread[s] = {"true_pairs_p05": round(float(np.percentile(pos, 5)), 4) if len(pos) else None,
                         "true_pairs_min": round(float(pos.min()), 4) if len(pos) else None,
                         "other_pairs_max": round(float(neg.max()), 4) if len(neg) else None,
                         "other_pairs_p999": round(float(np.percentile(neg, 99.9)), 4) if len(neg) else None}
        # Each copy's similarity with its source, by what was done to it: which transforms the model resists.
        row_of = {p: k for k, p in ((k, paths[int(i)]) for k, i in enumerate(ids.tolist()))}
        source_of = {r["family"]: r["path"] for r in records if r["copy"] is None}
        by_kind: dict[str, list[float]] = {}
        for r in records:
            if r["copy"] is None or r["path"] not in row_of:
                continue
            sim = float(sims[row_of[r["path"]], row_of[source_of[r["family"]]]])
            kinds = [re.sub(r"[-0-9.]+$", "", w) for w in r["copy"].split("+") if not w.startswith(("scale", "q"))]
            for kind in kinds or ["resize+jpeg only"]:
                by_kind.setdefault(f"{r['subset']}:{kind}", []).append(sim)
        transforms = {k: {"copies": len(v), "mean": round(float(np.mean(v)), 4), "p05": round(float(np.percentile(v, 5)), 4),
                          "min": round(float(np.min(v)), 4)} for k, v in sorted(by_kind.items())}
    # Among the settings with precision >= min: the best recall, then the highest threshold whose
    # recall is within a point of it (a higher threshold means fewer candidate pairs to check).
    ok = [r for r in rows if r["grouped"]["all"]["precision"] >= args.min_precision]
    top = max(ok, key=lambda r: r["grouped"]["all"]["recall"]) if ok else None
    near = [r for r in ok if top and r["pixel"] == top["pixel"] and r["grouped"]["all"]["recall"] >= top["grouped"]["all"]["recall"] - 0.01]
    best = max(near, key=lambda r: r["threshold"]) if near else None
    return {"model": args.model, "files": len(records), "true_pairs": len(truth), "subsets": subsets,
            "sweep": rows, "similarity": spread, "copy_vs_source": transforms, "suggested_threshold": best["threshold"] if best else None,
            "suggested": best, "machine": machine()}


def print_table(out: dict) -> None:
    subsets = out["subsets"]
    head = f"{'pixel':>5}  {'T':>6}  {'groups':>6}  {'P':>6} {'R':>6}" + "".join(f"  {s + ' P':>9} {s + ' R':>9}" for s in subsets) + f"  {'raw P':>6} {'raw R':>6}"
    print(head, file=sys.stderr)
    for r in out["sweep"]:
        g = r["grouped"]
        line = f"{r['pixel']:>5}  {r['threshold']:>6.3f}  {r['groups']:>6}  {g['all']['precision']:>6.3f} {g['all']['recall']:>6.3f}"
        line += "".join(f"  {g[s]['precision']:>9.3f} {g[s]['recall']:>9.3f}" for s in subsets)
        line += f"  {r['raw']['all']['precision']:>6.3f} {r['raw']['all']['recall']:>6.3f}"
        print(line, file=sys.stderr)
    print(f"similarity spread: {json.dumps(out['similarity'])}", file=sys.stderr)
    for k, v in out["copy_vs_source"].items():
        print(f"copy vs source {k:<22} {json.dumps(v)}", file=sys.stderr)
    best = out["suggested"]
    print(f"suggested (best recall at precision >= min): threshold {out['suggested_threshold']}, "
          f"pixel check {best['pixel'] if best else None}", file=sys.stderr)


# ------------------------------------------------------------------- scale


def tiny_model_512(root: Path) -> str:
    """A local-dir: model with 512-d embeddings and tiny towers: gives the library its dimension, encodes nothing here."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = root / "tiny512"
    if (folder / "open_clip_model.safetensors").is_file():
        return f"local-dir:{folder}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": {"embed_dim": 512,
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def plant(lib: Path, spec: str, fraction: float, cos: float, seed: int) -> list[tuple[int, int]]:
    """Add a near-copy (cosine ~``cos``) of ``fraction`` of the library's vectors as new image rows."""
    from sqlalchemy import insert

    from retrieval import Engine
    from retrieval.store import Image

    marker = lib / ".planted"
    if marker.is_file():
        return [tuple(p) for p in json.loads(marker.read_text())]
    rng = np.random.default_rng(seed)
    with Engine.open(lib, model=spec) as eng:
        state, store = eng.state(), eng.store
        index = state.images
        ids, vecs = index.vectors()
        pick = rng.choice(len(ids), int(len(ids) * fraction), replace=False)
        src = vecs[pick]
        noise = rng.standard_normal(src.shape).astype(np.float32)
        noise -= (noise * src).sum(1, keepdims=True) * src  # orthogonal to the source
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        new = cos * src + np.sqrt(1 - cos**2) * noise
        rows = [{"path": f"/photos/copies/COPY_{int(ids[k]):07d}.jpg", "size": 500_000, "mtime_ns": 1_600_000_000_000_000_000,
                 "content_hash": f"copy{int(ids[k]):028x}", "status": "ok", "width": 1000, "height": 750} for k in pick]
        new_ids = list(store.session.scalars(insert(Image).returning(Image.id, sort_by_parameter_order=True), rows))
        store.set_image_vectors(state.row.id, [(i, r["content_hash"], False) for i, r in zip(new_ids, rows)])
        index.add(np.asarray(new_ids, np.int64), new.astype(np.float32))
        state.save_images()
        store.commit()
    pairs = [(int(ids[k]), int(n)) for k, n in zip(pick, new_ids)]
    marker.write_text(json.dumps(pairs))
    return pairs


def run_scale(args: argparse.Namespace) -> dict:
    from retrieval import Engine
    from retrieval.duplicates import find_duplicates

    spec = tiny_model_512(args.work / "models")
    lib = args.work / f"scale-n{args.n}"
    fill_library(lib, spec, args.n)
    planted = plant(lib, spec, 0.01, 0.97, args.seed)
    with Engine.open(lib, model=spec) as eng:
        index = eng.state().images
        kind, size, nprobe = index.kind, len(index), index.nprobe
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        index.vectors()  # load the index from disk before timing
        with Monitor() as mon:
            t, cpu = time.perf_counter(), time.process_time()
            rep = find_duplicates(eng, threshold=args.threshold, verify=False)  # the rows name no real files
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The pixel check reads each image of a candidate pair once: its cost per 12-megapixel JPEG.
    from retrieval.duplicates import thumbnail

    big = sorted(gen_jpegs(16, "large").glob("*.jpg"))
    t = time.perf_counter()
    for f in big:
        assert thumbnail(str(f)) is not None
    thumb_ms = 1000 * (time.perf_counter() - t) / len(big)
    found = {tuple(sorted((g.keep, it.id))) for g in rep.groups for it in g.items if it.id != g.keep}
    want = {tuple(sorted(p)) for p in planted}
    return {"n": size, "index": kind, "nprobe": nprobe, "threshold": args.threshold, "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),
            "peak_rss_mb_before": round(rss0), "peak_rss_mb_after": round(rss1), "groups": len(rep.groups),
            "planted_pairs": len(want), "planted_found": len(want & found), "other_pairs": len(found - want),
            "pixel_check_ms_per_4000x3000_jpeg": round(thumb_ms, 1), "interference": mon.report(), "machine": machine()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python scripts/bench_duplicates.py --model shapes-tiny")
    p.add_argument("mode", nargs="?", choices=["pairs", "scale"], default="pairs")
    p.add_argument("--model", default="shapes-tiny", help="model spec to measure (pairs)")
    p.add_argument("--folder", type=Path, help="your own images: sample sources from here instead of generating")
    p.add_argument("--sample", type=int, default=100, help="sources sampled from --folder")
    p.add_argument("--sources", type=int, default=60, help="generated sources per subset (shapes, noise)")
    p.add_argument("--copies", type=int, default=4, help="transformed copies per source")
    p.add_argument("--unrelated", type=int, default=200, help="unrelated images per subset (or from --folder)")
    p.add_argument("--same-key-scenes", action="store_true",
                   help="let unrelated shapes scenes repeat a scene (same objects and relations, other layout)")
    p.add_argument("--subsets", default="shapes,noise", help="generated subsets to use (shapes, noise)")
    p.add_argument("--pixel-thresholds", default="none,0.62,0.66,0.70,0.74,0.78",
                   help="pixel-check thresholds to sweep ('none': embeddings alone)")
    p.add_argument("--t-min", type=float, default=0.80)
    p.add_argument("--t-max", type=float, default=0.99)
    p.add_argument("--t-step", type=float, default=0.01)
    p.add_argument("--min-precision", type=float, default=0.95)
    p.add_argument("--n", type=int, default=100_000, help="library size (scale)")
    p.add_argument("--threshold", type=float, default=0.94, help="threshold (scale)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--work", type=Path, default=WORK / "duplicates", help="where sets and libraries are written")
    p.add_argument("--json", dest="json_out", default="-", help="write the results here (default: stdout)")
    args = p.parse_args(argv)
    if args.mode == "scale":
        out = run_scale(args)
    else:
        out = run_pairs(args)
        print_table(out)
    write_json(args.json_out, out)


if __name__ == "__main__":
    main()
