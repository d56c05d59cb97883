#!/usr/bin/env python
"""The image tower alone on each CPU runtime: milliseconds per image and cosines to float32.

One export of random-weight ``ViT-B-32-256`` (made in a scratch library the
first time), one batch of real 640x480 JPEGs preprocessed once, then each
runtime in turn, interleaved ``--rounds`` times so that a slow spell of the
machine hits them all:

* ``ort-f32``: ONNX Runtime, float32 (where the CPU has no bfloat16 units, or ``CROSSFIND_BF16=0``);
* ``ov-f32``: OpenVINO, float32 (never used: no faster for a whole run, and it peaks higher);
* ``ov-native``: OpenVINO in its own precision for this CPU (bfloat16 with
  AMX or AVX512-BF16), compiled from the float16-weight IR as indexing does;
* ``ort-int8``: ONNX Runtime, 8-bit weights (``index --int8``).

Each gets the median of its rounds, the best round, and the minimum and mean
cosine of its vectors to ``ort-f32``'s.

Example::

    python scripts/bench_runtimes.py --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from bench_common import WORK, machine, random_model, say, write_json


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="images per encoder call (crossfind's CPU default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--arch", default="ViT-B-32-256")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import openvino as ov
    from bench_common import gen_jpegs
    from PIL import Image

    from retrieval import Engine
    from retrieval.encoders import parse_spec, weights_fingerprint
    from retrieval.onnx_quant import int8_image
    from retrieval.onnx_runtime import OnnxEncoder, _new_session, _threads, export_key, find_export
    from retrieval.openvino_runtime import OpenVinoSession, _compile, _half_ir, _precision

    spec = random_model(args.arch)
    ms = parse_spec(spec)
    lib = WORK / "runtimes-lib"
    folder = gen_jpegs(args.batch, "small")
    if find_export(lib, ms, export_key(ms, weights_fingerprint(ms))) is None:
        say("exporting the model (once)")
        with Engine.open(lib, model=spec) as eng:
            eng.index_folder([folder])
    where = find_export(lib, ms, export_key(ms, weights_fingerprint(ms)))
    assert where is not None
    enc = OnnxEncoder(where, ms)
    pixels = enc.image_batch([Image.open(f) for f in sorted(Path(folder).glob("*.jpg"))[: args.batch]])
    core = ov.Core()
    native = _precision(core)
    onnx = where / "image.onnx"
    half = _half_ir(core, onnx) or onnx
    sessions = {
        "ort-f32": _new_session(onnx, spin=False),
        "ov-f32": OpenVinoSession(_compile(core, str(onnx), _threads(), "f32"), "f32"),
        f"ov-native ({native})": OpenVinoSession(_compile(core, str(half), _threads(), native), native),
        "ort-int8": _new_session(where / int8_image(where, "image.onnx"), spin=False),
    }
    times: dict[str, list[float]] = {k: [] for k in sessions}
    vectors: dict[str, np.ndarray] = {}
    for name, sess in sessions.items():  # one untimed call each: weight packing, first allocations
        vectors[name] = sess.run(["vector"], {"pixels": pixels})[0]
    for r in range(args.rounds):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(["vector"], {"pixels": pixels})
            times[name].append((time.perf_counter() - t) / len(pixels) * 1e3)
        say(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in times.items()))
    ref = vectors["ort-f32"] / np.linalg.norm(vectors["ort-f32"], axis=1, keepdims=True)
    rows = {}
    print(f"image tower alone, {args.arch}, batches of {len(pixels)} 640x480 JPEGs, {args.rounds} interleaved rounds")
    print(f"{'runtime':<22} {'ms/img median':>14} {'best':>8} {'x ort-f32':>10} {'cos min':>10} {'cos mean':>10}")
    base = statistics.median(times["ort-f32"])
    for name, ts in times.items():
        v = vectors[name] / np.linalg.norm(vectors[name], axis=1, keepdims=True)
        cos = (v * ref).sum(1)
        med = statistics.median(ts)
        rows[name] = {"ms_per_image": med, "best": min(ts), "speed_vs_ort_f32": base / med,
                      "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
        print(f"{name:<22} {med:14.2f} {min(ts):8.2f} {base / med:9.2f}x {cos.min():10.6f} {cos.mean():10.6f}")
    if args.json:
        write_json(args.json, {"machine": machine(), "model": spec, "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
