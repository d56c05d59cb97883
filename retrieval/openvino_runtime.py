"""The image tower of an ONNX export on OpenVINO's CPU plugin, in bfloat16, where that keeps the vectors.

Indexing on a CPU is bound by the image tower's matrix products, and float32
ones already run near the CPU's peak in ONNX Runtime. On CPUs with bfloat16
units (AMX, AVX512-BF16) OpenVINO compiles the same ``image.onnx`` (ONNX
Runtime's fused ``Attention`` and ``BiasGelu`` nodes included) and runs its
products in bfloat16 with float32 accumulation: on a 2-core Xeon with AMX the
ViT-B-32 tower takes 8 ms an image against 36 in ONNX Runtime.

bfloat16 moves vectors a little, so it is used only when a check says it
keeps them: the first time an export's image tower is used on a machine,
:func:`image_session` runs a fixed batch of images through OpenVINO and
through ONNX Runtime's float32 and keeps bfloat16 only when every vector has
cosine >= :data:`MIN_COSINE` to its float32 one (and the patch tokens, for a
model with a reranker, a mean cosine as high). The verdict is kept in the
export folder (``openvino.json``, by OpenVINO version and CPU), with the tower
saved as OpenVINO IR with float16 weights that the sessions compile from
(half the bytes to read: an index run peaks about 330 MB lower), so later
runs compile one model and go. Where OpenVINO's own default is float16 (ARM),
the same check decides for float16.

Everywhere else the tower stays on ONNX Runtime in float32: where OpenVINO
would run float32 too (no bfloat16 units), where the check failed, and with
``CROSSFIND_BF16=0``. OpenVINO's float32 is no faster for a whole index run
and peaks higher. The text tower and the reranker stay on ONNX Runtime,
whose small sessions start faster.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

LOG = logging.getLogger(__name__)

#: Every bfloat16 vector of the check batch must have at least this cosine to its float32 one.
MIN_COSINE = 0.9999
VERDICTS = "openvino.json"
_OFF = ("0", "false", "no", "off")
_write_lock = threading.Lock()


def openvino_enabled() -> bool:
    """Whether the image tower may run on OpenVINO: installed, and not switched off (``CROSSFIND_BF16=0``)."""
    if os.environ.get("CROSSFIND_BF16", "1").lower() in _OFF:
        return False
    return importlib.util.find_spec("openvino") is not None


def lower_precision() -> str | None:
    """The precision below float32 that OpenVINO would run the tower in on
    this CPU (``bf16``; ``f16`` on ARM), or None where it runs float32 or is off."""
    if not openvino_enabled():
        return None
    import openvino as ov

    precision = _precision(ov.Core())
    return None if precision == "f32" else precision


class OpenVinoSession:
    """An OpenVINO compiled model behind the ``run(names, feeds)`` of an ONNX
    Runtime session, so that :class:`retrieval.onnx_runtime.OnnxEncoder` runs
    either. Outputs are looked up by their ONNX names and copied out of the
    request (the next call reuses its buffers). Callers from several threads
    take turns: each call uses every core anyway."""

    def __init__(self, compiled: Any, precision: str) -> None:
        self.precision = precision
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = compiled.outputs
        self._index = {name: i for i, out in enumerate(self._outputs) for name in out.get_names()}
        self._lock = threading.Lock()

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        wanted = range(len(self._outputs)) if names is None else [self._index[n] for n in names]
        with self._lock:
            result = self._request.infer(feeds)
            return [np.array(result[self._outputs[i]]) for i in wanted]


def _compile(core: Any, model: str, threads: int, precision: str) -> Any:
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
    return core.compile_model(model, "CPU", config)


def _precision(core: Any) -> str:
    """The precision OpenVINO's CPU plugin runs float32 models in here by default: ``bf16`` where the CPU has bfloat16 units."""
    return str(core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name())


def _signature(core: Any) -> str:
    """What a verdict holds for: this OpenVINO and this CPU (its name and the
    precisions OpenVINO runs natively on it)."""
    import openvino as ov

    caps = ",".join(sorted(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
    text = f"{ov.get_version()}\0{core.get_property('CPU', 'FULL_DEVICE_NAME')}\0{caps}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_verdicts(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / VERDICTS).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _keep_verdict(folder: Path, file: str, signature: str, verdict: dict[str, Any]) -> None:
    """Add ``verdict`` to the export's ``openvino.json`` (atomically; skipped
    where the library is read-only: the check is then made again next time)."""
    with _write_lock:
        data = _read_verdicts(folder)
        data[f"{file}:{signature}"] = verdict
        tmp = folder / f".{VERDICTS}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, folder / VERDICTS)
        except OSError as exc:
            LOG.debug("could not keep the OpenVINO verdict in %s: %s", folder, exc)
            tmp.unlink(missing_ok=True)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def compare(low: OpenVinoSession, exact: Any, pixels: np.ndarray) -> dict[str, float]:
    """Cosines of ``low``'s outputs to ``exact``'s on ``pixels``: the vectors'
    minimum and, when there are patch tokens, their mean."""
    got, want = low.run(None, {"pixels": pixels}), exact.run(None, {"pixels": pixels})
    out = {"vector_min": float(_cosines(got[0], want[0]).min())}
    if len(got) > 1:
        out["tokens_mean"] = float(_cosines(got[1], want[1]).mean())
    return out


def _half_path(onnx: Path) -> Path:
    return onnx.with_name(onnx.stem + ".f16.xml")


def _half_ir(core: Any, onnx: Path) -> Path | None:
    """The tower at ``onnx`` saved once as OpenVINO IR with float16 weights
    (``image.f16.xml`` and ``.bin`` beside it), which a bfloat16 session
    compiles from: its weights are read as 175 MB instead of mapping 350 MB
    of float32 (a ViT-B-32 index run peaks about 330 MB lower). None when it
    cannot be written (a read-only library)."""
    import openvino as ov

    target = _half_path(onnx)
    if target.is_file() and target.with_suffix(".bin").is_file():
        return target
    tmp = onnx.parent / f".{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        tmp.mkdir()
        ov.save_model(core.read_model(str(onnx)), str(tmp / target.name), compress_to_fp16=True)
        os.replace(tmp / target.with_suffix(".bin").name, target.with_suffix(".bin"))
        os.replace(tmp / target.name, target)  # the .xml last: it marks the pair complete
        return target
    except (OSError, RuntimeError) as exc:
        LOG.debug("could not save %s: %s", target, exc)
        return None
    finally:
        for leftover in tmp.glob("*") if tmp.is_dir() else ():
            leftover.unlink(missing_ok=True)
        if tmp.is_dir():
            tmp.rmdir()


def image_session(path: Path, threads: int, calibration: Callable[[], np.ndarray],
                  reference: Callable[[], Any]) -> OpenVinoSession | None:
    """The image tower at ``path`` compiled by OpenVINO in this CPU's lower
    precision, when the kept (or now made) check passed: ``calibration()``'s
    pixels through it and through ``reference()`` (ONNX Runtime's float32
    session of the same graph). None where float32 is to run instead, on ONNX
    Runtime. Raises what OpenVINO raises when it cannot read or compile the graph."""
    import openvino as ov

    path = Path(path)
    core = ov.Core()
    precision = _precision(core)
    if precision == "f32":
        return None
    signature = _signature(core)
    verdict = _read_verdicts(path.parent).get(f"{path.name}:{signature}")
    half = _half_path(path)
    if verdict is not None and verdict.get("precision") == "f32":
        return None
    if verdict is not None and half.is_file():
        return OpenVinoSession(_compile(core, str(half), threads, precision), precision)
    if not os.access(path.parent, os.W_OK):
        return None  # a read-only library: a check kept nowhere would be made again by every process
    saved = _half_ir(core, path)
    low = OpenVinoSession(_compile(core, str(saved or path), threads, precision), precision)
    cos = compare(low, reference(), calibration())
    ok = cos["vector_min"] >= MIN_COSINE and cos.get("tokens_mean", 1.0) >= MIN_COSINE
    _keep_verdict(path.parent, path.name, signature, {"precision": precision if ok else "f32", "checked": precision, **cos})
    if ok:
        return low
    if saved is not None:
        saved.unlink(missing_ok=True)
        saved.with_suffix(".bin").unlink(missing_ok=True)
    LOG.info("OpenVINO's %s moved the vectors of %s too far (cosine %.6f); float32 is used",
             precision, path, cos["vector_min"])
    return None
