"""Run a model's ONNX exports with ONNX Runtime on the CPU: no torch at search time.

:class:`OnnxEncoder` offers the part of :class:`retrieval.encoders.Encoder`
that indexing and searching use (``encode_texts``, ``text_tokens``,
``prepare``/``batch``/``encode_images``), and :class:`OnnxReranker` the part
of :class:`retrieval.rerank.Reranker` that search uses, both over the files
:mod:`retrieval.onnx_export` writes. Each ONNX session is created on first
use, so a text query never loads the image tower. Tokenising is
:class:`retrieval.tokenizer.ClipTokenizer`, preprocessing is Pillow and numpy
with the numbers open_clip's transform was built with. The image tower runs on
OpenVINO in bfloat16 where the CPU has it and a check allows it
(:mod:`retrieval.openvino_runtime`), behind the same ``run`` call.

Set ``CROSSFIND_ONNX=0`` to use torch for everything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .encoders import ModelSpec

LOG = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

MANIFEST = "manifest.json"
#: The tokenizer's merge table, kept in an export the first time a search reads it.
TOKENIZER_CACHE = "bpe_ranks.marshal"
ONNX_OPSET = 18
#: What an export holds; part of its key, so a library's older exports are made again.
#: 2: the reranker in two graphs (image memory, cross part) instead of one.
#: 3: the image tower with ONNX Runtime's attention fusions (and, pooling the class token, a last block for it alone).
EXPORT_VERSION = 3


def onnx_enabled(device: str | None) -> bool:
    """Whether the ONNX path may be used: CPU work (or no device named) and not switched off."""
    if os.environ.get("CROSSFIND_ONNX", "1").lower() in ("0", "false", "no", "off"):
        return False
    return device is None or device == "cpu"


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process, told without importing
    torch (``/dev/nvidia0`` and the like, unless ``CUDA_VISIBLE_DEVICES`` hides them).
    Image encoding then stays on torch, which puts it on the GPU."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    return any(name[6:].isdigit() for name in _dev_names() if name.startswith("nvidia") and len(name) > 6)


def _dev_names() -> list[str]:
    try:
        return os.listdir("/dev")
    except OSError:
        return []


def export_key(spec: ModelSpec, weights: str | None) -> str:
    """The folder name of a model's export: its weights fingerprint (``weights``,
    or the spec when weights are named by a tag) and its reranker's files."""
    from .rerank_files import CONFIG_NAME, WEIGHTS_NAME, reranker_dir

    digest = hashlib.sha256(f"{spec.spec}\0{weights or ''}\0onnx{ONNX_OPSET}\0v{EXPORT_VERSION}".encode())
    where = reranker_dir(spec)
    if where is not None:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            digest.update(hashlib.sha256((where / name).read_bytes()).digest())
    return (weights or "tag")[:8] + "-" + digest.hexdigest()[:12]


def export_dir(library_dir: Path, spec: ModelSpec, key: str) -> Path:
    return Path(library_dir) / "models" / spec.slug / "onnx" / key


def find_export(library_dir: Path, spec: ModelSpec, key: str) -> Path | None:
    """The finished export of ``key`` in the library, or None."""
    where = export_dir(library_dir, spec, key)
    return where if (where / MANIFEST).is_file() else None


def _threads() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 16))


def _session(path: Path, threads: int | None = None, spin: bool = True, manifest: dict[str, Any] | None = None) -> Any:
    pre = _take_preloaded(path)
    if pre is not None:
        return pre
    return _new_session(path, threads, spin=spin, manifest=manifest)


def _openvino_session(path: Path, threads: int | None, manifest: dict[str, Any]) -> Any:
    """The image tower at ``path`` on OpenVINO in bfloat16 (see
    :mod:`retrieval.openvino_runtime`), or None where ONNX Runtime runs it in
    float32: OpenVINO off or missing, no bfloat16 here, the check failed, or
    OpenVINO failing on this graph (said once per export and process). Not for
    the 8-bit tower, which is ONNX Runtime's own quantisation."""
    from .openvino_runtime import openvino_enabled

    if path.name != manifest.get("image") or ".int8." in path.name or not openvino_enabled():
        return None
    from .openvino_runtime import image_session

    try:
        return image_session(path, threads or _threads(), functools.partial(calibration_pixels, manifest),
                             functools.partial(_new_session, path, threads, spin=False))
    except Exception as exc:  # noqa: BLE001 - any failure of OpenVINO leaves the tower to ONNX Runtime
        key = str(path)
        if key not in _openvino_failed:
            _openvino_failed.add(key)
            LOG.warning("OpenVINO cannot run %s (%s); ONNX Runtime encodes the images", path, exc)
        return None


_openvino_failed: set[str] = set()


def _spins(part: str) -> bool:
    """Whether the session of export part ``part`` spins its threads between
    operators: all but the image tower (see :func:`_new_session`)."""
    return part != "image"


def _new_session(path: Path, threads: int | None = None, prepack: bool = True, spin: bool = True,
                 manifest: dict[str, Any] | None = None) -> Any:
    """A CPU session of the graph at ``path``: on OpenVINO when it is the image
    tower of the export whose ``manifest`` is given and runs in bfloat16 here (see
    :func:`_openvino_session`), else on ONNX Runtime.

    Without ``prepack`` the weights stay where ONNX Runtime mapped them
    instead of being copied into packed matrices: a session of the ViT-B-32
    text tower starts in 0.04 s instead of 0.18 s and then runs a query as
    fast, the right trade for a process that encodes one text (not for
    indexing, whose batches gain from packing). Without ``spin`` the intra-op
    threads sleep between operators instead of spinning: for the image tower,
    whose operators are long, so that the cycles go to the loader threads
    decoding beside it."""
    if manifest is not None:
        ov = _openvino_session(path, threads, manifest)
        if ov is not None:
            return ov
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or _threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# Sessions a search process starts loading before it has opened the library
# (see :func:`preload`), by file: each is handed out once.
_preloaded: dict[str, Any] = {}
_pending: dict[str, threading.Event] = {}


def preload(library_dir: Path, spec: str, parts: Sequence[str] = ("text",),
            then: Callable[[], object] | None = None) -> threading.Thread | None:
    """Start creating the sessions of ``parts`` of ``spec``'s export in
    ``library_dir`` in a thread, and return it (None when there is no such
    export, or ONNX is off).

    ONNX Runtime builds a session without holding the GIL, so a search
    process does this while it imports SQLAlchemy and FAISS and opens the
    store; :func:`_session` then takes the session instead of making one
    (waiting for it when it is still loading). It changes nothing else: a
    session the process never asks for goes with the process, and a failure
    here is left for the ordinary path to meet, and report, again. The text
    session is made for the one text such a process encodes: one thread and no
    weight prepacking (see :func:`_new_session`), which starts it and runs the
    query in 0.1 s instead of 0.15-0.26 s for ViT-B-32 on two busy cores.
    ``then``, when given, runs in the same thread after the sessions (its
    exceptions are dropped): more of what the process will need next.
    """
    if not onnx_enabled(None):
        return None
    from .encoders import parse_spec, weights_fingerprint

    ms = parse_spec(spec)
    where = find_export(Path(library_dir), ms, export_key(ms, weights_fingerprint(ms)))
    if where is None:
        return None
    return preload_export(where, parts, then)


def preload_export(where: Path, parts: Sequence[str] = ("text",),
                   then: Callable[[], object] | None = None) -> threading.Thread:
    """:func:`preload` of the export folder ``where``."""
    manifest = json.loads((where / MANIFEST).read_text())
    keys = {p: str(where / manifest[p]) for p in parts if manifest.get(p)}
    # The thread keeps its own references: _take_preloaded may pop an event
    # from _pending before the session is ready, and waits on that event.
    events = {key: threading.Event() for key in keys.values()}
    _pending.update(events)

    def load() -> None:
        for part, key in keys.items():
            try:
                one_text = part == "text"
                _preloaded[key] = _new_session(Path(key), 1 if one_text else None, prepack=not one_text,
                                               spin=_spins(part), manifest=manifest if part == "image" else None)
            except Exception:  # noqa: BLE001 - the ordinary path tries again and reports it
                pass
            finally:
                events[key].set()
        if then is not None:
            try:
                then()
            except Exception:  # noqa: BLE001 - only a head start
                pass

    thread = threading.Thread(target=load, name="crossfind-onnx-preload", daemon=True)
    thread.start()
    return thread


def _take_preloaded(path: Path) -> Any:
    key = str(path)
    done = _pending.pop(key, None)
    if done is None:
        return None
    done.wait()
    return _preloaded.pop(key, None)


def resize_and_crop(w: int, h: int, p: dict[str, Any]) -> tuple[int, int, int, int]:
    """open_clip's geometry for a ``w`` x ``h`` image: the size it is resized to
    and the top-left corner of the centre crop in it, ``(new_w, new_h, left, top)``;
    ``p`` is an export manifest's ``preprocess``. Raises ValueError when the
    resized image is smaller than the crop (open_clip pads; never happens after resize)."""
    size = p["resize"]
    if len(size) == 1:  # the shorter side to size[0], as torchvision computes it
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size[0], int(size[0] * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = size
    ch, cw = p["crop"]
    if cw > new_w or ch > new_h:
        raise ValueError("image smaller than the crop after resizing")
    return new_w, new_h, int(round((new_w - cw) / 2.0)), int(round((new_h - ch) / 2.0))


def prepare_pixels(image: Image.Image, p: dict[str, Any]) -> np.ndarray:
    """open_clip's resize, centre crop and RGB conversion of ``image``, as a uint8
    ``(H, W, 3)`` array; ``p`` is an export manifest's ``preprocess`` (numbers only)."""
    from PIL import Image as PILImage

    w, h = image.size
    new_w, new_h, left, top = resize_and_crop(w, h, p)
    if (new_w, new_h) != (w, h):
        resample = PILImage.Resampling.BICUBIC if p["interpolation"] == "bicubic" else PILImage.Resampling.BILINEAR
        image = image.resize((new_w, new_h), resample)
    ch, cw = p["crop"]
    if (cw, ch) != image.size:
        image = image.crop((left, top, left + cw, top + ch))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def mean_std(p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel mean and std of an export manifest's ``preprocess``, as float32."""
    return np.asarray(p["mean"], np.float32), np.asarray(p["std"], np.float32)


def normalise(prepared: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """:meth:`OnnxEncoder.batch`: uint8 ``(H, W, 3)`` arrays to one normalised float32 ``(n, 3, H, W)`` batch."""
    x = np.stack(prepared)
    out = np.empty((len(x), 3, *x.shape[1:3]), np.float32)
    for c in range(3):
        channel = out[:, c]
        np.divide(x[..., c], np.float32(255.0), out=channel, dtype=np.float32)
        channel -= mean[c]
        channel /= std[c]
    return out


def calibration_pixels(manifest: dict[str, Any]) -> np.ndarray:
    """A fixed batch of 8 images in the export's input form, for checking a
    lower precision against float32: four rendered shapes scenes and four
    photo-like fields (smooth colour with grain)."""
    from PIL import Image as PILImage

    from .shapes import samples

    p = manifest["preprocess"]
    side = max(p["crop"]) + 32
    images = [s.image for s in samples(4, seed=0, size=side)]
    g = np.random.default_rng(0)
    for _ in range(4):
        coarse = PILImage.fromarray(g.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((side, side), PILImage.Resampling.BICUBIC)
        grain = g.normal(0.0, 12.0, (side, side, 3))
        images.append(PILImage.fromarray(np.clip(np.asarray(coarse, np.float64) + grain, 0, 255).astype(np.uint8)))
    return normalise([prepare_pixels(im, p) for im in images], *mean_std(p))


class OnnxEncoder:
    """A model's exported towers; see the module docstring."""

    device = "cpu"
    dtype = np.float32

    def __init__(self, folder: Path, spec: ModelSpec, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.spec = spec
        self.manifest: dict[str, Any] = json.loads((self.folder / MANIFEST).read_text())
        self.dim: int = int(self.manifest["dim"])
        self.image_size: int = int(self.manifest["image_size"])
        self.threads = threads
        self._sessions: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.spec.spec

    @property
    def has_image(self) -> bool:
        return bool(self.manifest.get("image"))

    @property
    def tokens_layer(self) -> str | None:
        """The layer whose patch tokens the image export returns (the reranker's), or None."""
        return self.manifest.get("image_tokens_layer")

    @property
    def has_tokens(self) -> bool:
        return self.tokens_layer is not None

    def session(self, part: str) -> Any:
        """The ONNX Runtime session of ``text``, ``image``, ``reranker_image`` or
        ``reranker_cross`` (created on first use)."""
        if part not in self._sessions:
            name = self.manifest.get(part)
            if not name:
                raise KeyError(f"the ONNX export in {self.folder} has no {part} part")
            manifest = self.manifest if part == "image" else None
            self._sessions[part] = _session(self.folder / name, self.threads, spin=_spins(part), manifest=manifest)
        return self._sessions[part]

    def int8(self) -> OnnxEncoder:
        """This export with its image tower's weights in 8 bits (made on first
        use; see :mod:`retrieval.onnx_quant`): for index runs that ask for it."""
        import copy

        from .onnx_quant import int8_image

        if not self.has_image:
            raise KeyError(f"the ONNX export in {self.folder} has no image part")
        other = copy.copy(self)
        other.manifest = {**self.manifest, "image": int8_image(self.folder, self.manifest["image"])}
        other._sessions = {k: v for k, v in self._sessions.items() if k != "image"}
        return other

    def release(self) -> None:
        """Close every session (each is created again on its next use)."""
        self._sessions.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (sent to Ray workers) without its sessions and tokenizer: each
        process opens its own from the export folder on first use."""
        state = dict(self.__dict__)
        state["_sessions"] = {}
        state.pop("tokenizer", None)
        return state

    # ------------------------------------------------------------------ texts
    @functools.cached_property
    def tokenizer(self) -> Any:
        from .tokenizer import ClipTokenizer

        return ClipTokenizer(self.manifest["tokenizer"]["context_length"], cache=self.folder / TOKENIZER_CACHE)

    def _run_text(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if "text" not in self._sessions and "tokenizer" not in self.__dict__:
            # ONNX Runtime builds the session without the GIL: read the vocabulary meanwhile.
            import threading

            starter = threading.Thread(target=self.session, args=("text",), daemon=True)
            starter.start()
            self.tokenizer
            starter.join()
        ids = self.tokenizer(list(texts))
        mask = ids != 0
        if self.manifest.get("text_cut") and mask.any():
            length = int(mask.sum(1).max())
            ids, mask = ids[:, :length], mask[:, :length]
        vec, tokens, words = self.session("text").run(None, {"ids": ids})
        return vec, tokens, words, mask

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Normalised float32 vectors of ``texts``."""
        out = [self._run_text(texts[s : s + batch_size])[0] for s in range(0, len(texts), batch_size)]
        if not out:
            return np.empty((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def text_tokens(self, texts: Sequence[str], words: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Tokens after ``ln_final`` (with the input word embeddings beside them when
        ``words``) and the padding mask, as :meth:`Encoder.text_tokens` gives them."""
        _, tokens, emb, mask = self._run_text(texts)
        if words:
            tokens = np.concatenate([tokens, emb], axis=-1)
        return tokens, mask

    # ----------------------------------------------------------------- images
    def prepare(self, image: Image.Image) -> np.ndarray:
        """open_clip's resize, centre crop and RGB conversion, as a uint8 ``(H, W, 3)`` array."""
        return prepare_pixels(image, self.manifest["preprocess"])

    def batch(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        """Stack :meth:`prepare` outputs into one normalised float32 ``(n, 3, H, W)`` batch.

        Each channel is ``(v / 255 - mean) / std`` in float32, the operations of
        open_clip's ``ToTensor`` and ``Normalize`` in their order (so the same
        values), written straight into the channel-first batch: 6-7 ms for a
        batch of 32 on this project's CPU, against 18-27 ms through a 256-entry
        lookup table, in the thread that then runs the encoder."""
        return normalise(prepared, *self._mean_std)

    @functools.cached_property
    def _mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        return mean_std(self.manifest["preprocess"])

    def image_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.batch([self.prepare(im) for im in images])

    def encode_images(
        self, pixels: np.ndarray, with_tokens: bool = False, token_layer: str = "final"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(normalised vectors, patch tokens as float16 or None), as :meth:`Encoder.encode_images`."""
        sess = self.session("image")
        if with_tokens and self.tokens_layer is not None:
            if token_layer != self.tokens_layer:
                raise ValueError(f"the ONNX export holds tokens of layer {self.tokens_layer}, not {token_layer}")
            vec, tok = sess.run(None, {"pixels": np.asarray(pixels, np.float32)})
            return np.ascontiguousarray(vec, np.float32), tok.astype(np.float16)
        (vec,) = sess.run(["vector"], {"pixels": np.asarray(pixels, np.float32)})
        return np.ascontiguousarray(vec, np.float32), None

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_images(self.image_batch(images))[0]


@dataclass(frozen=True)
class RerankerInfo:
    """The fields of a reranker's config that search reads (``reranker.json``)."""

    text_width: int
    image_width: int
    image_tokens: int
    image_layer: str
    text_words: bool
    temperature: float
    shift: float
    width: int

    @property
    def text_features(self) -> int:
        return self.text_width * (2 if self.text_words else 1)

    @property
    def image_features(self) -> int:
        return self.image_width * len(self.image_layer.split("+"))


class OnnxReranker:
    """The exported reranker: what :class:`retrieval.rerank.Reranker` does at search time.

    It runs in two graphs: ``reranker_image`` turns candidate patch tokens
    into image memory (:meth:`image_memory`, independent of the query, so
    search caches it per image), ``reranker_cross`` scores a query against
    that memory (:meth:`logits_memory`). The memory goes between them as
    float16, cached or not, so both give the same numbers.
    """

    def __init__(self, encoder: OnnxEncoder, batch_size: int = 256) -> None:
        cfg = encoder.manifest["reranker_config"]
        self.encoder = encoder
        self.batch_size = batch_size
        self.fingerprint: str = str(encoder.manifest["reranker_fingerprint"])
        self.config = RerankerInfo(
            int(cfg["text_width"]), int(cfg["image_width"]), int(cfg["image_tokens"]), str(cfg.get("image_layer", "final")),
            bool(cfg.get("text_words", False)), float(cfg.get("temperature", 1.0)), float(cfg.get("shift", 0.0)),
            int(cfg.get("width", 128)),
        )

    @property
    def memory_shape(self) -> tuple[int, int]:
        """Shape of one image's memory: ``(patches, width)``."""
        return (self.config.image_tokens, self.config.width)

    def score_images(self, text: str | np.ndarray, image_tokens: np.ndarray, dual_scores: np.ndarray | None = None) -> np.ndarray:
        """Match probabilities of one text query against candidate patch tokens."""
        return self.probability(self.logits_images(text, image_tokens, dual_scores))

    def score_texts(self, image_tokens: np.ndarray, texts: Sequence[str], dual_scores: np.ndarray | None = None) -> np.ndarray:
        """Match probabilities of one image query against candidate texts."""
        return self.probability(self.logits_texts(image_tokens, texts, dual_scores))

    def probability(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated match probabilities of raw logits."""
        z = (np.asarray(logits, np.float32) - np.float32(self.config.shift)) / np.float32(self.config.temperature)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def query_tokens(self, text: str) -> np.ndarray:
        """The query's text tokens as the reranker reads them, float32 ``(length, text_features)``."""
        tok, mask = self.encoder.text_tokens([text], words=self.config.text_words)
        return np.ascontiguousarray(tok[0][mask[0]], dtype=np.float32)

    def image_memory(self, image_tokens: np.ndarray) -> np.ndarray:
        """Candidate patch tokens ``(n, patches, image_features)`` as the text
        sees them: float16 image memory ``(n, patches, width)``."""
        tokens = np.asarray(image_tokens)
        sess = self.encoder.session("reranker_image")
        out = [np.asarray(sess.run(None, {"image": np.ascontiguousarray(tokens[s : s + self.batch_size], np.float16)})[0])
               .astype(np.float16) for s in range(0, len(tokens), self.batch_size)]
        return np.concatenate(out) if out else np.empty((0, *self.memory_shape), np.float16)

    def _run(self, text: np.ndarray, mask: np.ndarray, memory: np.ndarray, dual: np.ndarray) -> np.ndarray:
        n = len(dual)  # the graph takes n pairs: the query side is repeated
        feeds = {
            "text": np.ascontiguousarray(np.broadcast_to(text.astype(np.float32), (n, *text.shape[1:]))),
            "mask": np.ascontiguousarray(np.broadcast_to(mask.astype(bool), (n, *mask.shape[1:]))),
            "memory": np.ascontiguousarray(np.broadcast_to(memory.astype(np.float16), (n, *memory.shape[1:]))),
            "dual": np.ascontiguousarray(dual, dtype=np.float32),
        }
        return np.asarray(self.encoder.session("reranker_cross").run(None, feeds)[0], np.float32)

    def logits_memory(self, text: str | np.ndarray, memory: np.ndarray, dual_scores: np.ndarray | None = None) -> np.ndarray:
        """Raw logits of one text query (or its :meth:`query_tokens`) against candidates' :meth:`image_memory`."""
        kept = self.query_tokens(text) if isinstance(text, str) else np.asarray(text, np.float32)
        memory = np.asarray(memory)
        n = len(memory)
        dual = np.zeros(n, np.float32) if dual_scores is None else np.asarray(dual_scores, np.float32).reshape(-1)
        mask = np.ones((1, len(kept)), bool)
        out = [self._run(kept[None], mask, memory[s : s + self.batch_size], dual[s : s + self.batch_size])
               for s in range(0, n, self.batch_size)]
        return np.concatenate(out) if out else np.empty(0, np.float32)

    def logits_images(self, text: str | np.ndarray, image_tokens: np.ndarray, dual_scores: np.ndarray | None = None) -> np.ndarray:
        """Raw logits of one text query (or its :meth:`query_tokens`) against candidate patch tokens."""
        return self.logits_memory(text, self.image_memory(image_tokens), dual_scores)

    def logits_texts(self, image_tokens: np.ndarray, texts: Sequence[str], dual_scores: np.ndarray | None = None) -> np.ndarray:
        """Raw logits of one image query (its patch tokens) against candidate texts."""
        memory = self.image_memory(np.asarray(image_tokens)[None])  # once for all the texts
        dual = np.zeros(len(texts), np.float32) if dual_scores is None else np.asarray(dual_scores, np.float32).reshape(-1)
        out = []
        for s in range(0, len(texts), self.batch_size):
            tok, mask = self.encoder.text_tokens(list(texts[s : s + self.batch_size]), words=self.config.text_words)
            out.append(self._run(tok, mask, memory, dual[s : s + self.batch_size]))
        return np.concatenate(out) if out else np.empty(0, np.float32)
