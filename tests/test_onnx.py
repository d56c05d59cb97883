"""The torch-free query path: the BPE tokenizer against open_clip's, ONNX
exports against the torch towers and reranker (vectors, tokens, logits), equal
rankings through the engine, what a search process imports, the fallback when
an export cannot be made, the cheap schema check and memory-mapped indexes."""

from __future__ import annotations

import json
import logging
import random
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image
from PIL import Image

from retrieval import Engine
from retrieval.encoders import load_encoder, weights_fingerprint
from retrieval.openvino_runtime import lower_precision
from retrieval.types import SearchQuery

TEXTS = [
    "a photo of a dog",
    "a red circle left of a blue square",
    "A RED Circle LEFT of a BLUE square!!",
    "two green triangles above a yellow star",
    "Café crème brûlée — naïve façade",
    "日本語のテキスト 和 中文",
    "emoji 🐶🏖️ on the beach",
    "&amp;lt;b&amp;gt; html &quot;quoted&quot; &#39;x&#39;",
    "  lots   of\t\twhitespace\n\nand newlines ",
    "it's we'll they'd I'M you've",
    "numbers 12345 and 3.14159",
    "mojibake: Ã©tÃ© â€œquotesâ€\x9d",
    "\x00control\x07chars\x1b",
    "<start_of_text>inside<end_of_text>",
    "ＦＵＬＬＷＩＤＴＨ ﬁ ligature",
    "",
    "x",
    "word " * 120,
    "supercalifragilisticexpialidocious " * 30,
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,!?'\"&;:-()éüßñø中文日本🙂👍\t\n"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 160))) for _ in range(n)]


@pytest.mark.parametrize("context", [77, 16])
def test_tokenizer_matches_open_clip(context):
    from open_clip.tokenizer import SimpleTokenizer

    from retrieval.tokenizer import ClipTokenizer

    texts = TEXTS + random_texts(400)
    want = SimpleTokenizer(context_length=context)(texts).numpy()
    got = ClipTokenizer(context)(texts)
    assert got.dtype == np.int64 and got.shape == want.shape
    bad = [t for t, a, b in zip(texts, want, got) if (a != b).any()]
    assert not bad, bad[:3]
    long = got[TEXTS.index("word " * 120)]
    assert long[-1] == ClipTokenizer(context).eot and (long != 0).all()  # truncated, ends with end-of-text


def test_tokenizer_cache_gives_the_same_ids(tmp_path):
    from retrieval.tokenizer import ClipTokenizer

    texts = TEXTS + random_texts(50, seed=1)
    want = ClipTokenizer(77)(texts)
    cache = tmp_path / "ranks"
    first = ClipTokenizer(77, cache=cache)  # reads the vocabulary, writes the cache
    assert cache.is_file() and not list(tmp_path.glob("*.tmp"))
    cache_bytes = cache.read_bytes()
    second = ClipTokenizer(77, cache=cache)  # reads the cache
    assert second.ranks == first.ranks and (second(texts) == want).all() and (first(texts) == want).all()
    cache.write_bytes(cache_bytes[: len(cache_bytes) // 2])  # cut off: read the vocabulary again
    assert (ClipTokenizer(77, cache=cache)(texts) == want).all() and cache.read_bytes() == cache_bytes
    unwritable = tmp_path / "missing-folder" / "ranks"
    assert (ClipTokenizer(77, cache=unwritable)(texts) == want).all() and not unwritable.exists()


def test_tokenizer_module_does_not_import_torch():
    code = ("import sys; from retrieval.tokenizer import ClipTokenizer; ClipTokenizer(77)(['a dog', 'Café ☕']);"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def sample_images() -> list[Image.Image]:
    """Odd sizes and modes: portrait, landscape, smaller than the model, grey, RGBA, palette."""
    ims = [noise_image(i, size) for i, size in enumerate([(64, 48), (48, 64), (200, 90), (17, 33), (32, 32), (300, 300)])]
    ims.append(noise_image(7, (50, 40)).convert("L"))
    ims.append(noise_image(8, (40, 50)).convert("RGBA"))
    ims.append(noise_image(9, (45, 45)).convert("P"))
    return ims


def export(spec: str, lib: Path):
    from retrieval.onnx_export import export_model
    from retrieval.onnx_runtime import OnnxEncoder, OnnxReranker, export_key
    from retrieval.rerank import find_reranker

    enc = load_encoder(spec, device="cpu")
    reranker = find_reranker(enc)
    where = export_model(enc, lib, export_key(enc.spec, weights_fingerprint(enc.spec)), reranker)
    onnx = OnnxEncoder(where, enc.spec)
    return enc, reranker, onnx, (OnnxReranker(onnx) if reranker is not None else None)


#: What runs an export's image tower here: OpenVINO where it runs bfloat16 (see retrieval/openvino_runtime.py).
IMAGE_SESSION = "OpenVinoSession" if lower_precision() is not None else "InferenceSession"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module", params=["tiny", "shapes-tiny"])
def exported(request, tiny_model, tmp_path_factory):
    spec = tiny_model if request.param == "tiny" else "shapes-tiny"
    return export(spec, tmp_path_factory.mktemp("onnx-lib"))


def test_onnx_vectors_equal_torch(exported):
    enc, reranker, onnx, _ = exported
    texts = TEXTS + random_texts(40, seed=1)
    assert cosines(enc.encode_texts(texts), onnx.encode_texts(texts)).min() >= 0.9999
    ims = sample_images()
    pixels_t = enc.image_batch(ims).numpy()
    pixels_o = onnx.image_batch(ims)
    np.testing.assert_array_equal(pixels_o, pixels_t)  # same resize, crop, mode and normalisation, bit for bit
    assert cosines(enc.encode_pil(ims), onnx.encode_pil(ims)).min() >= 0.9999
    if reranker is not None:  # patch tokens at the reranker's layer, as stored while indexing
        layer = reranker.config.image_layer
        _, tok_t = enc.encode_images(enc.image_batch(ims), with_tokens=True, token_layer=layer)
        vec_o, tok_o = onnx.encode_images(pixels_o, with_tokens=True, token_layer=layer)
        assert tok_o is not None and tok_t is not None and tok_o.dtype == np.float16 and tok_o.shape == tok_t.shape
        flat_t, flat_o = tok_t.reshape(-1, tok_t.shape[-1]).astype(np.float32), tok_o.reshape(-1, tok_o.shape[-1]).astype(np.float32)
        assert cosines(flat_t, flat_o).min() >= 0.9999


def test_onnx_reranker_equals_torch(exported):
    enc, reranker, onnx, onnx_reranker = exported
    if reranker is None:
        pytest.skip("this model has no reranker")
    ims = sample_images()
    layer = reranker.config.image_layer
    _, tokens = enc.encode_images(enc.image_batch(ims), with_tokens=True, token_layer=layer)
    dual = np.linspace(0.1, 0.9, len(ims)).astype(np.float32)
    for text in ["a red circle left of a blue square", "a small green triangle", "x"]:
        q_t, q_o = reranker.query_tokens(text), onnx_reranker.query_tokens(text)
        np.testing.assert_allclose(q_o, q_t, atol=1e-4)
        want = reranker.logits_images(q_t, tokens, dual_scores=dual)
        got = onnx_reranker.logits_images(text, tokens, dual_scores=dual)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
        assert list(np.argsort(-got)) == list(np.argsort(-want))
        np.testing.assert_allclose(onnx_reranker.probability(got), reranker.probability(want), atol=1e-4)
    texts = ["a red circle", "two blue squares left of a star", "a yellow triangle above a green circle"]
    want = reranker.logits_texts(tokens[0], texts, dual_scores=dual[:3])
    got = onnx_reranker.logits_texts(tokens[0], texts, dual_scores=dual[:3])
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)


def test_onnx_cached_memory_scores_like_torch(exported):
    """The ONNX reranker's two parts, the image memory rounded to float16 as
    cached, against torch's whole reranker: the same order (but near-ties),
    probabilities within 1e-4; ONNX and torch memory alike."""
    from test_rerank_memory import same_order_but_ties

    enc, reranker, onnx, onnx_reranker = exported
    if reranker is None:
        pytest.skip("this model has no reranker")
    assert onnx_reranker.fingerprint == reranker.fingerprint  # both runtimes share one cache
    _, tokens = enc.encode_images(enc.image_batch(sample_images()), with_tokens=True, token_layer=reranker.config.image_layer)
    memory = onnx_reranker.image_memory(tokens)
    assert memory.dtype == np.float16 and memory.shape == (len(tokens), *reranker.memory_shape)
    np.testing.assert_allclose(memory.astype(np.float32), reranker.image_memory(tokens).astype(np.float32), atol=2e-2)
    dual = np.linspace(0.1, 0.9, len(tokens)).astype(np.float32)
    for text in ["a red circle left of a blue square", "a small green triangle", "x"]:
        want = reranker.logits_images(text, tokens, dual_scores=dual)
        got = onnx_reranker.logits_memory(text, memory, dual_scores=dual)
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-3)
        assert same_order_but_ties(want, got)
        np.testing.assert_allclose(onnx_reranker.probability(got), reranker.probability(want), atol=1e-4)
        np.testing.assert_array_equal(onnx_reranker.logits_images(text, tokens, dual_scores=dual), got)


def _hits(res) -> list[tuple[int, float, float | None]]:
    return [(h.id, h.score, h.rerank_score) for h in res]


@pytest.mark.parametrize("bf16", ["0", "1"])
@pytest.mark.parametrize("which", ["tiny", "shapes-tiny"])
def test_same_rankings_onnx_and_torch(tmp_path, tiny_model, photo_dir, monkeypatch, which, caplog, bf16):
    """One library searched through the exports and, in a copy, through torch:
    the same hits in the same order, scores equal to float precision. With
    bfloat16 allowed (where the CPU runs it, the image tower moves each vector
    by a cosine of at most 1e-4: see openvino_runtime), an image query's scores
    move by as much, the text queries' (ONNX Runtime, float32) do not."""
    spec = tiny_model if which == "tiny" else "shapes-tiny"
    monkeypatch.setenv("CROSSFIND_BF16", bf16)
    lib = tmp_path / "lib"
    monkeypatch.setenv("CROSSFIND_ONNX", "0")
    with Engine.open(lib, model=spec) as eng:
        eng.index_folder(photo_dir)  # torch vectors: both copies search the same index
    shutil.copytree(lib, tmp_path / "lib-torch")
    queries = ["a photo of noise", "a red circle left of a blue square", "two yellow stars"]
    query_image = photo_dir / "a" / "img04.jpg"
    with Engine.open(tmp_path / "lib-torch", model=spec) as eng:
        want = [_hits(eng.search_text(q, k=6, candidates=12)) for q in queries]
        want.append(_hits(eng.search_image(query_image, k=6)))
        assert eng.state().onnx is None
    monkeypatch.setenv("CROSSFIND_ONNX", "1")
    with caplog.at_level(logging.INFO, logger="retrieval.slot"), Engine.open(lib, model=spec) as eng:
        got = [_hits(eng.search_text(q, k=6, candidates=12)) for q in queries]
        got.append(_hits(eng.search_image(query_image, k=6)))
        assert eng.state().onnx is not None
        if which == "shapes-tiny":
            assert type(eng.state().reranker).__name__ == "OnnxReranker"
    assert sum("exporting" in r.getMessage() for r in caplog.records) == 1
    for n, (w, g) in enumerate(zip(want, got)):
        assert [i for i, _, _ in g] == [i for i, _, _ in w]
        image_query = n == len(queries)
        np.testing.assert_allclose([s for _, s, _ in g], [s for _, s, _ in w], atol=2e-3 if image_query and bf16 == "1" else 1e-5)
        if which == "shapes-tiny" and w[0][2] is not None:
            np.testing.assert_allclose([r for _, _, r in g], [r for _, _, r in w], atol=1e-4)


def test_indexing_through_onnx_equals_torch(tmp_path, tiny_model, photo_dir, monkeypatch):
    """Vectors written while indexing with ONNX Runtime are the torch ones (cosine >= 0.9999)."""
    vecs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("CROSSFIND_ONNX", flag)
        with Engine.open(tmp_path / f"lib{flag}", model=tiny_model) as eng:
            rep = eng.index_folder(photo_dir)
            assert (rep.encoded, rep.failed) == (12, 0)
            assert (eng.state().onnx is not None) == (flag == "1")
            index = eng.state().images
            ids = np.sort(index.ids())
            paths = {r.id: r.path for r in eng.store.images_by_id(ids.tolist()).values()}
            vecs[flag] = {paths[i]: v for i, v in zip(ids.tolist(), index.reconstruct(ids))}
    assert vecs["0"].keys() == vecs["1"].keys()
    paths = sorted(vecs["0"])
    assert cosines(np.stack([vecs["0"][p] for p in paths]), np.stack([vecs["1"][p] for p in paths])).min() >= 0.9999


def _indexed_vectors(eng) -> dict[str, np.ndarray]:
    index = eng.state().images
    ids = np.sort(index.ids())
    paths = {r.id: r.path for r in eng.store.images_by_id(ids.tolist()).values()}
    return {paths[i]: v for i, v in zip(ids.tolist(), index.reconstruct(ids))}


def test_int8_indexing_is_opt_in_and_close(tmp_path, tiny_model, photo_dir, monkeypatch):
    """--int8 encodes with a quantised twin of the image export, made in the export
    folder on first use; vectors stay close to float32 ones; the default never makes it;
    with torch encoding the images it is an error, not a silent float32 run."""
    from retrieval.errors import LibraryError
    from retrieval.onnx_quant import INT8_IMAGE

    vecs = {}
    for int8 in (False, True):
        with Engine.open(tmp_path / f"lib{int8}", model=tiny_model) as eng:
            rep = eng.index_folder(photo_dir, int8=int8)
            assert (rep.encoded, rep.failed) == (12, 0)
            made = list((tmp_path / f"lib{int8}").rglob(INT8_IMAGE))
            assert len(made) == int(int8) and all((m.parent / (INT8_IMAGE + ".data")).is_file() for m in made)
            vecs[int8] = _indexed_vectors(eng)
    paths = sorted(vecs[False])
    assert sorted(vecs[True]) == paths
    # A library whose export is hard-linked from another (cp -l): onnx refuses such weight files; it still works.
    shutil.copytree(tmp_path / "libFalse" / "models", tmp_path / "linked" / "models", copy_function=os.link)
    with Engine.open(tmp_path / "linked", model=tiny_model) as eng:
        assert eng.index_folder(photo_dir, int8=True).encoded == 12
        assert sorted(_indexed_vectors(eng)) == paths and list((tmp_path / "linked").rglob(INT8_IMAGE))
    cos = cosines(np.stack([vecs[False][p] for p in paths]), np.stack([vecs[True][p] for p in paths]))
    assert cos.min() >= 0.98 and cos.max() < 1.0 - 1e-7  # close, and really another tower
    monkeypatch.setenv("CROSSFIND_ONNX", "0")
    with Engine.open(tmp_path / "torch", model=tiny_model) as eng, pytest.raises(LibraryError, match="int8"):
        eng.index_folder(photo_dir, int8=True)


def test_images_go_to_torch_where_a_gpu_is_visible(tmp_path, tiny_model, photo_dir, monkeypatch):
    """With a GPU visible and no device named, indexing encodes on torch (which
    puts it on the GPU); text queries stay on ONNX Runtime."""
    from retrieval import onnx_runtime

    monkeypatch.setattr(onnx_runtime, "_dev_names", lambda: ["null", "nvidiactl", "nvidia0", "nvidia-uvm"])
    assert onnx_runtime.gpu_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not onnx_runtime.gpu_visible()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CROSSFIND_ONNX", "1")
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        slot = eng.state()
        assert slot.runtime("image") is slot.encoder
        assert slot.runtime("text") is slot.onnx is not None
        assert eng.index_folder(photo_dir).encoded == 12
    monkeypatch.setattr(onnx_runtime, "_dev_names", lambda: ["null", "nvidiactl"])
    with Engine.open(tmp_path / "lib2", model=tiny_model) as eng:
        assert eng.state().runtime("image") is eng.state().onnx


def test_gpu_index_leaves_the_export_to_a_search_which_makes_it_on_the_cpu(tmp_path, tiny_model, photo_dir, monkeypatch):
    """Where a GPU is visible, ``index`` does not stop to export (its vectors come
    from torch); the first search exports, from a CPU copy of the model when the
    loaded encoder is on a GPU (an export traced on the GPU fails: ONNX Runtime
    runs it on the CPU), and its text query then runs on ONNX Runtime."""
    from retrieval import onnx_runtime, slot as slot_mod
    from retrieval.onnx_runtime import OnnxEncoder

    monkeypatch.setattr(onnx_runtime, "_dev_names", lambda: ["nvidiactl", "nvidia0"])
    monkeypatch.setenv("CROSSFIND_ONNX", "1")
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        assert eng.index_folder(photo_dir).encoded == 12
        slot = eng.state()
        assert slot.onnx_loaded is None
        assert not list(slot.dir.glob("onnx*")) and not (lib / "models" / "onnx").exists()
    loads = []
    real = slot_mod.load_encoder

    def spy(spec, device=None):
        loads.append(device)
        return real(spec, device=device)

    monkeypatch.setattr(slot_mod, "load_encoder", spy)
    with Engine.open(lib, model=tiny_model) as eng:
        slot = eng.state()
        slot.encoder.device = "cuda:0"  # as if the loaded encoder were on the GPU
        assert len(eng.search_text("a photo of noise", k=3)) == 3
        assert isinstance(slot.onnx, OnnxEncoder) and slot.runtime("text") is slot.onnx
        assert loads == [None, "cpu"]


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_search_process_imports_no_torch(tmp_path, tiny_model, photo_dir):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        eng.index_folder(photo_dir)  # makes the export
    probe = (
        "import sys, json, io, contextlib\nfrom retrieval.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n        main({args})\n    except SystemExit as e:\n        assert not e.code, e.code\n"
        "print(json.dumps({{m: m in sys.modules for m in ('torch', 'open_clip', 'onnxruntime', 'openvino', 'alembic', 'faiss')}}))\n"
    )
    search = _run(probe.format(args=repr(["--library", str(lib), "search", "a brand new text", "-k", "3", "--json"])))
    assert search == {**search, "torch": False, "open_clip": False, "alembic": False, "onnxruntime": True, "openvino": False}
    for args in (["--help"], ["--library", str(lib), "status"]):
        mods = _run(probe.format(args=repr(args)))
        assert mods == {**mods, "torch": False, "onnxruntime": False, "openvino": False, "alembic": False}, args


def test_preloaded_session_asked_for_before_it_is_ready(tmp_path, photo_dir, monkeypatch):
    """A search that asks for the text session while the preload thread is
    still building it waits for it and gets it (it used to hang for good:
    the thread looked its event up again after the search had taken it)."""
    import threading

    from retrieval import onnx_runtime as rt

    lib = tmp_path / "lib"
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(photo_dir)
    new, started, release = rt._new_session, threading.Event(), threading.Event()

    def slow(path, threads=None, prepack=True, spin=True, manifest=None):
        started.set()
        release.wait(10)
        return new(path, threads, prepack, spin, manifest)

    monkeypatch.setattr(rt, "_new_session", slow)
    thread = rt.preload(lib, "shapes-tiny")
    assert thread is not None and started.wait(10)
    (key,) = [k for k in rt._pending if "text" in k]
    got: list = []
    taker = threading.Thread(target=lambda: got.append(rt._take_preloaded(Path(key))))
    taker.start()  # pops the event, then waits on it
    while key in rt._pending:
        threading.Event().wait(0.01)
    release.set()
    taker.join(10)
    thread.join(10)
    assert not taker.is_alive() and not thread.is_alive()
    assert got and got[0] is not None and got[0].get_inputs()


@pytest.mark.parametrize("rerank", [False, True])
def test_search_process_preloads_the_sessions_it_runs(tmp_path, photo_dir, rerank):
    """A CLI search starts the ONNX sessions it needs before it opens the library,
    uses them (each created once), and prints what a search without the head start prints."""
    lib = tmp_path / "lib"
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(photo_dir)  # makes the export; the library's default model
    probe = (
        "import sys, json, io, contextlib, threading\nimport retrieval.cli as cli, retrieval.onnx_runtime as rt\n"
        "made = []\nnew = rt._new_session\n"
        "def counted(path, threads=None, prepack=True, spin=True, manifest=None):\n"
        "    made.append([path.name, threading.current_thread().name])\n    return new(path, threads, prepack, spin, manifest)\n"
        "rt._new_session = counted\n"
        "{patch}\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n        cli.main({args})\n    except SystemExit as e:\n        assert not e.code, e.code\n"
        "print(json.dumps({{'made': made, 'left': len(rt._preloaded) + len(rt._pending), 'out': json.loads(buf.getvalue())}}))\n"
    )
    twin = tmp_path / "twin"
    shutil.copytree(lib, twin)

    def search(where, patch=""):
        args = ["--library", str(where), "search", "a red circle", "-k", "3", "--json"] + ([] if rerank else ["--no-rerank"])
        return _run(probe.format(args=repr(args), patch=patch))

    with_preload = search(lib)
    without = search(twin, patch="cli._preload_sessions = lambda *a: None\nimport os\nos.environ['CROSSFIND_QUICK'] = '0'")
    assert with_preload["out"]["hits"] and with_preload["out"] == without["out"]
    parts = ["text.onnx", "rerank_cross.onnx", "rerank_image.onnx"] if rerank else ["text.onnx"]
    assert sorted(with_preload["made"]) == sorted([p, "crossfind-onnx-preload"] for p in parts)
    assert with_preload["left"] == 0
    assert sorted(p for p, _ in without["made"]) == sorted(parts)
    assert all(t != "crossfind-onnx-preload" for _, t in without["made"])
    # The same text again: its vector (and tokens) are kept, so the text tower is not loaded at all.
    again = search(lib)
    assert again["out"] == with_preload["out"] and again["left"] == 0
    # The candidates' image memory is cached now: the reranker's image part is not loaded either.
    assert again["made"] == ([["rerank_cross.onnx", "crossfind-onnx-preload"]] if rerank else [])


_INDEX_PROBE = (
    "import sys, json, atexit, threading\nimport retrieval.cli as cli, retrieval.onnx_runtime as rt\n"
    "made = []\nnew = rt._new_session\n"
    "def counted(path, threads=None, prepack=True, spin=True, manifest=None):\n"
    "    if {hold!r} and path.name == 'image.onnx':  # slow to be ready; -1: never\n"
    "        threading.Event().wait({hold!r} if {hold!r} > 0 else None)\n"
    "    made.append([path.name, threading.current_thread().name, prepack, spin])\n"
    "    session = new(path, threads, prepack, spin, manifest)\n"
    "    made[-1].append(type(session).__name__)\n"
    "    return session\n"
    "rt._new_session = counted\n"
    "faiss_in = []\nwarm = cli._import_faiss\n"
    "cli._import_faiss = lambda: (faiss_in.append(threading.current_thread().name), warm())\n"
    "def report():\n    print('TEARDOWN')\n"
    "atexit.register(report)\n"
    "def note():\n    alive = [t.name for t in threading.enumerate() if t.name == 'crossfind-onnx-preload']\n"
    "    print(json.dumps({{'made': made, 'faiss_in': faiss_in, 'alive': alive}}), flush=True)\n"
    "sys.argv = ['crossfind'] + {args!r}\n"
    "try:\n    cli.main()\nfinally:\n    note()\n"
)


def test_index_process_preloads_the_image_session_and_ends_without_teardown(tmp_path, photo_dir):
    """``crossfind index`` as the program: the image session comes from the
    preload thread (spinning off), FAISS is imported there too, every row is
    committed, and the process ends with ``os._exit`` (no interpreter teardown)."""
    lib = tmp_path / "lib"
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(photo_dir / "a")  # makes the export; the library's default model
    args = ["--library", str(lib), "index", str(photo_dir), "--json"]
    out = subprocess.run([sys.executable, "-c", _INDEX_PROBE.format(args=args, hold=0)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TEARDOWN" not in out.stdout  # os._exit: atexit handlers never ran
    assert json.loads(out.stdout.strip().splitlines()[0])["added"] == 6
    # The probe's own note does not run either (os._exit inside main): what
    # was made is seen from a second run below; the rows are in the library.
    with Engine.open(lib) as eng:
        assert sum(1 for r in eng.search(SearchQuery(text="a red circle", k=20)).hits) == 12
    probe = _INDEX_PROBE.replace("cli.main()", "cli.main(sys.argv[1:])")  # in process: returns, then notes
    (photo_dir / "c").mkdir()
    noise_image(40).save(photo_dir / "c" / "new.jpg")
    out = subprocess.run([sys.executable, "-c", probe.format(args=args, hold=0)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[0])["added"] == 1 and lines[-1] == "TEARDOWN"
    got = json.loads(lines[-2])
    assert got["made"] == [["image.onnx", "crossfind-onnx-preload", True, False, IMAGE_SESSION]]
    assert got["faiss_in"] == ["crossfind-onnx-preload"]


def test_index_process_with_nothing_to_encode_does_not_wait_for_the_image_session(tmp_path, photo_dir):
    """An index run that finds nothing new ends as the program without waiting
    for the image session it started loading (here: one never ready); in
    process it waits for it, so that no thread is left running."""
    lib = tmp_path / "lib"
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(photo_dir)
    args = ["--library", str(lib), "index", str(photo_dir), "--json"]
    out = subprocess.run([sys.executable, "-c", _INDEX_PROBE.format(args=args, hold=-1)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[0])["unchanged"] == 12
    probe = _INDEX_PROBE.replace("cli.main()", "cli.main(sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", probe.format(args=args, hold=8)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-2])
    assert got["made"] == [["image.onnx", "crossfind-onnx-preload", True, False, IMAGE_SESSION]] and got["alive"] == []


def test_export_failure_falls_back_to_torch_and_says_so_once(tmp_path, tiny_model, photo_dir, caplog):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=tiny_model) as eng:
        slug_dir = eng.state().dir
    slug_dir.mkdir(parents=True, exist_ok=True)
    (slug_dir / "onnx").write_text("not a folder")  # the export has nowhere to go
    with caplog.at_level(logging.WARNING, logger="retrieval.slot"):
        with Engine.open(lib, model=tiny_model) as eng:
            eng.index_folder(photo_dir)
            hits = eng.search_text("a photo of noise", k=3)
            assert len(hits) == 3 and eng.state().onnx is None
        with Engine.open(lib, model=tiny_model) as eng:
            assert len(eng.search_text("another new text", k=3)) == 3
    warnings = [r.getMessage() for r in caplog.records if "could not export" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_head_revision_is_alembics():
    from alembic.script import ScriptDirectory

    from retrieval.store import alembic_config, head_revision

    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_library_behind_head_is_still_upgraded(tmp_path):
    from sqlalchemy import text

    from retrieval.store import head_revision, make_engine, open_store, upgrade

    engine = make_engine(tmp_path / "library.db")
    upgrade(engine, "0003")
    engine.dispose()
    store = open_store(tmp_path / "library.db")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
        cols = {row[1] for row in conn.execute(text("PRAGMA table_info(queries)"))}
    assert "text_tokens" in cols  # added by 0004
    store.close()


@pytest.mark.parametrize("n", [500, 60_000])
def test_mmap_index_searches_like_loaded(tmp_path, n):
    from retrieval.index import VectorIndex

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = VectorIndex(32)
    index.add(np.arange(n) * 3 + 1, vecs)
    index.save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss", 32)
    mapped = VectorIndex.load(tmp_path / "x.faiss", 32, mmap=True)
    assert mapped.kind == loaded.kind and len(mapped) == n
    q = vecs[:5] + 0.01
    a, b = loaded.search(q, 10), mapped.search(q, 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores)
    allowed = np.arange(n)[::7] * 3 + 1
    np.testing.assert_array_equal(loaded.search(q, 5, allowed=allowed).ids, mapped.search(q, 5, allowed=allowed).ids)


def test_eval_int8_reports_recall_of_the_8bit_tower(tmp_path, tiny_model, monkeypatch):
    """`crossfind eval --int8` indexes the gallery with the 8-bit image tower and
    reports its recall; with a reranker list or --reranker it is refused."""
    from click.testing import CliRunner

    from retrieval import onnx_quant
    from retrieval.cli import cli
    from retrieval.shapes import generate

    made: list[str] = []
    real = onnx_quant.int8_image
    monkeypatch.setattr(onnx_quant, "int8_image", lambda folder, name: made.append(name) or real(folder, name))
    generate(tmp_path / "g", 12, seed=5)
    runner = CliRunner()
    args = ["eval", str(tmp_path / "g"), "--model", tiny_model, "--no-rerank", "--json"]
    plain = json.loads(runner.invoke(cli, args, catch_exceptions=False).output)
    assert made == []
    int8 = json.loads(runner.invoke(cli, args + ["--int8"], catch_exceptions=False).output)
    assert made == ["image.onnx"]  # the gallery went through the 8-bit tower
    assert int8["queries"] == plain["queries"] == 12
    assert set(int8["t2i"]) == {"R@1", "R@5", "R@10"} and int8["t2i"]["R@10"] >= int8["t2i"]["R@1"]
    refused = runner.invoke(cli, ["eval", str(tmp_path / "g"), "--model", tiny_model, "--int8", "--candidates", "8,16"])
    assert refused.exit_code != 0 and "--int8" in refused.output


def test_image_export_is_fused(tmp_path, photo_dir):
    """The image tower is exported in the form ONNX Runtime's optimizer fuses:
    one Attention node per transformer block and fused BiasGelu (an optimizer
    that failed or found nothing would leave the slower plain graph)."""
    import collections

    import onnx

    with Engine.open(tmp_path / "lib", model="shapes-tiny") as eng:
        eng.index_folder(photo_dir)
        blocks = len(eng.state().encoder.model.visual.transformer.resblocks)
    (path,) = (tmp_path / "lib").rglob("image.onnx")
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load(path, load_external_data=False).graph.node)
    assert ops[("com.microsoft", "Attention")] == blocks and ops[("com.microsoft", "BiasGelu")] == blocks


def test_int8_is_remembered_until_told_otherwise(tmp_path, tiny_model, photo_dir, monkeypatch):
    """`index --int8` is remembered for the model: later runs without the flag stay
    8-bit (one tower per library), --no-int8 goes back to float32 and forgets it;
    what cannot run 8-bit is refused before anything is remembered."""
    from retrieval import onnx_runtime
    from retrieval.errors import LibraryError

    used: list[int] = []
    real = onnx_runtime.OnnxEncoder.int8
    monkeypatch.setattr(onnx_runtime.OnnxEncoder, "int8", lambda self: used.append(1) or real(self))
    runs = [(True, 1), (None, 2), (False, 2), (None, 2), (True, 3)]  # (asked, 8-bit runs so far)
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        for n, (asked, expected) in enumerate(runs):
            noise_image(100 + n).save(photo_dir / f"new{n}.png")  # something to encode each run
            assert eng.index_folder(photo_dir, int8=asked).encoded == (13 if n == 0 else 1)
            assert len(used) == expected, (n, asked)
        assert eng.store.get_setting(f"int8:{eng.model_spec}") == "1"
    with Engine.open(tmp_path / "ray", model=tiny_model) as eng, pytest.raises(LibraryError, match="not through Ray"):
        eng.index_folder(photo_dir, int8=True, ray="auto")
    monkeypatch.setenv("CROSSFIND_ONNX", "0")
    with Engine.open(tmp_path / "torch", model=tiny_model) as eng:
        with pytest.raises(LibraryError, match="--no-int8"):
            eng.index_folder(photo_dir, int8=True)
        assert eng.store.get_setting(f"int8:{eng.model_spec}") is None
