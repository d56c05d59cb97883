"""BLIP ITM rerankers through transformers: a tiny random BlipForImageTextRetrieval
saved with save_pretrained (and a processor built offline from a small vocab)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import noise_image

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square",
         "triangle", "left", "right", "of", "above", "below", "the", "and", "small", "big"]
TEXTS = ["a red circle", "a blue square left of a green triangle", "the big green circle", "a small square"]


def write_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """Save a random-weight BLIP ITM model with its processor as a save_pretrained folder."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=BertTokenizer(str(vocab))
    )
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=2, sep_token_id=3, eos_token_id=3, initializer_range=0.3),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.3),
        image_text_hidden_size=16,
    )
    torch.manual_seed(seed)
    BlipForImageTextRetrieval(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> str:
    """Spec of a tiny random BLIP ITM folder."""
    return f"local-dir:{write_tiny_blip(tmp_path_factory.mktemp('tiny-blip'))}"


@pytest.fixture
def blip_photos(tmp_path) -> list[Path]:
    out = []
    for i in range(6):
        p = tmp_path / "blip-photos" / f"p{i}.png"
        p.parent.mkdir(exist_ok=True)
        noise_image(100 + i, size=(40 + 4 * i, 36)).save(p)
        out.append(p)
    return out


def _items(paths: list[Path]):
    from retrieval.rerank_blip import FeatureItem

    return [FeatureItem(i + 1, f"{p.stat().st_size}-{p.stat().st_mtime_ns}", str(p)) for i, p in enumerate(paths)]


def test_scores_equal_transformers_itm_softmax(tiny_blip, blip_photos):
    import torch
    from PIL import Image
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from retrieval.rerank_blip import BlipReranker

    rr = BlipReranker.load(tiny_blip, device="cpu")
    feats, ok = rr.features(_items(blip_photos))
    assert ok.all() and feats.shape == (6, 17, 32)
    folder = tiny_blip[len("local-dir:"):]
    model = BlipForImageTextRetrieval.from_pretrained(folder).eval()
    proc = BlipProcessor.from_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in blip_photos]
    spread = []
    for text in TEXTS:
        ours = rr.score_images(text, feats)
        inputs = proc(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        with torch.no_grad():
            ref = torch.softmax(model(**inputs).itm_score, -1)[:, 1].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5)
        spread.append(ref.max() - ref.min())
        # The image -> text direction scores the same pairs.
    assert max(spread) > 0.05  # the random model tells the images apart, so the check means something
    for j in range(len(images)):
        ours_t = rr.probability(rr.margins_texts(feats[j], TEXTS))
        inputs = proc(images=[images[j]] * len(TEXTS), text=TEXTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            ref = torch.softmax(model(**inputs).itm_score, -1)[:, 1].numpy()
        np.testing.assert_allclose(ours_t, ref, atol=1e-5)


def test_cached_features_give_the_same_ranking_and_are_not_computed_again(tiny_blip, blip_photos, tmp_path):
    from retrieval.rerank_blip import BlipReranker

    rr = BlipReranker.load(tiny_blip, device="cpu")
    cache = rr.cache(tmp_path / "features")
    items = _items(blip_photos)
    computed: list[int] = []
    fresh, _ = rr.features(items, cache=None)
    first, ok1 = rr.features(items[:4], cache=cache, on_compute=computed.append)
    again, ok2 = rr.features(items, cache=cache, on_compute=computed.append)  # overlaps the first query
    assert computed == [4, 2] and ok1.all() and ok2.all()
    files = sorted(cache.dir.rglob("*.npy"))
    assert len(files) == 6 and all(np.load(f).dtype == np.float16 for f in files)
    third, _ = rr.features(items, cache=cache, on_compute=computed.append)
    assert computed == [4, 2]  # all six from the cache
    for text in TEXTS:
        a = rr.rank(text, fresh)
        b = rr.rank(text, third)
        assert [c.index for c in a] == [c.index for c in b]
        np.testing.assert_allclose([c.score for c in a], [c.score for c in b], atol=1e-2)
    # A changed file is a miss, and its old features are replaced.
    noise_image(999, size=(50, 50)).save(blip_photos[0])
    os.utime(blip_photos[0], ns=(1, 1))
    changed = _items(blip_photos)
    rr.features(changed, cache=cache, on_compute=computed.append)
    assert computed == [4, 2, 1] and len(sorted(cache.dir.rglob("*.npy"))) == 6


def test_a_damaged_cache_file_is_computed_again(tiny_blip, blip_photos, tmp_path):
    from retrieval.rerank_blip import BlipReranker

    rr = BlipReranker.load(tiny_blip, device="cpu")
    cache = rr.cache(tmp_path / "features")
    items = _items(blip_photos[:2])
    good, _ = rr.features(items, cache=cache)
    victim = next(cache.dir.rglob("1-*.npy"))
    victim.write_bytes(victim.read_bytes()[:100])
    computed: list[int] = []
    again, ok = rr.features(items, cache=cache, on_compute=computed.append)
    assert computed == [1] and ok.all()
    np.testing.assert_allclose(again, good, atol=1e-2)


def test_fused_order_and_platt_calibration(tiny_blip):
    from retrieval.rerank_blip import Calibration, fit_platt, fuse

    rng = np.random.default_rng(0)
    margins = rng.normal(0, 3, 4000)
    labels = rng.random(4000) < 1 / (1 + np.exp(-(0.5 * margins - 1.0)))
    cal = fit_platt(margins, labels)
    assert abs(cal.scale - 0.5) < 0.1 and abs(cal.bias + 1.0) < 0.15 and cal.pairs == 4000
    assert Calibration.from_json(cal.to_json()) == cal
    np.testing.assert_allclose(Calibration().probability(np.array([0.0, 2.0])), [0.5, 1 / (1 + np.exp(-2))], rtol=1e-6)
    # ITM log-odds plus the dual cosine, as BLIP adds ITM and ITC scores.
    np.testing.assert_allclose(fuse(np.array([1.0, 1.0]), np.array([0.3, 0.1])), [1.3, 1.1])
    with pytest.raises(ValueError):
        fit_platt(np.array([1.0, 2.0]), np.array([1, 1]))


def test_reranker_specs(tmp_path, tiny_blip):
    from retrieval.errors import ModelNotAvailable
    from retrieval.reranker_spec import parse_reranker_spec

    rs = parse_reranker_spec(tiny_blip)
    assert rs.kind == "blip" and rs.path is not None and rs.spec == tiny_blip
    hub = parse_reranker_spec("hf-hub:Salesforce/blip-itm-base-coco")
    assert (hub.kind, hub.repo) == ("blip", "Salesforce/blip-itm-base-coco")
    (tmp_path / "empty").mkdir()
    for bad, words in [("hf-hub:nope", "ORG/NAME"), (f"local-dir:{tmp_path / 'empty'}", "holds no reranker"),
                       (f"local-dir:{tmp_path / 'gone'}", "does not exist"), ("blip", "unknown reranker spec")]:
        with pytest.raises(ModelNotAvailable, match=words):
            parse_reranker_spec(bad)


BLOCKER = """
import sys

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return None

sys.meta_path.insert(0, _Block())
"""


def _without_transformers(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "block"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_missing_transformers_gives_one_line_naming_the_extra(tmp_path, tiny_blip, captioned, monkeypatch):
    from retrieval.errors import MissingExtra
    from retrieval.rerank_blip import BlipReranker

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when it is not installed
        with pytest.raises(MissingExtra, match=r"pip install 'crossfind\[blip\]'"):
            BlipReranker.load(tiny_blip)
    env = _without_transformers(tmp_path)
    # The command line: one line on stderr, exit status 1, before anything is indexed.
    cli = subprocess.run([sys.executable, "-m", "retrieval.cli", "eval", str(captioned), "--reranker", tiny_blip],
                         env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.count("\n") == 1 and "pip install 'crossfind[blip]'" in cli.stderr and "Traceback" not in cli.stderr


def test_eval_cli_sweep_text_and_json(captioned, tiny_model, tiny_blip):
    from click.testing import CliRunner

    from retrieval.cli import cli

    args = ["eval", str(captioned), "--model", tiny_model, "--reranker", tiny_blip, "--candidates", "4,8"]
    res = CliRunner().invoke(cli, args + ["--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [r["candidates"] for r in rep["sweep"]] == [4, 8] and rep["reranker"] == tiny_blip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "reranker R@1/5/10" in res.stdout and sum(1 for ln in lines if ln.split()[:2] in (["4", "t2i"], ["8", "i2t"])) == 2
    bad = CliRunner().invoke(cli, ["eval", str(captioned), "--candidates", "4,x"])
    assert bad.exit_code != 0 and "--candidates" in bad.output


@pytest.fixture
def captioned(tmp_path) -> Path:
    """A captioned folder as `crossfind eval` reads it: 8 images, 2 captions each."""
    import json

    root = tmp_path / "captioned"
    root.mkdir()
    lines = []
    for i in range(8):
        noise_image(200 + i).save(root / f"s{i}.png")
        for c in range(2):
            lines.append(json.dumps({"image": f"s{i}.png", "caption": TEXTS[(i + c) % len(TEXTS)] + f" {WORDS[5 + i]}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_eval_sweep_reports_dual_reranker_and_fused(captioned, tiny_model, tiny_blip):
    from retrieval.eval_rerank import evaluate_reranker

    rep = evaluate_reranker(captioned, model=tiny_model, reranker=tiny_blip, candidates=[2, 4, 8])
    assert rep["queries"] == 16 and rep["images"] == 8 and rep["reranker"] == tiny_blip
    assert [r["candidates"] for r in rep["sweep"]] == [2, 4, 8]
    cal = rep["calibration"]
    assert cal["pairs"] == 16 * 8 + 8 * 8 and 0 <= cal["ece_after"] <= 1 and 0 <= cal["ece_before"] <= 1
    for row in rep["sweep"]:
        for direction in ("t2i", "i2t"):
            r = row[direction]
            assert set(r) == {"dual", "reranker", "fused", "ms_per_query", "dual_ms_per_query"}
            assert all(0.0 <= v <= 1.0 for name in ("dual", "reranker", "fused") for v in r[name].values())
            assert r["ms_per_query"] > 0
    # The dual column does not depend on k; re-ranking all 8 images keeps R@10 (every image) at 1.
    assert len({json.dumps(r["t2i"]["dual"]) for r in rep["sweep"]}) == 1
    assert rep["sweep"][-1]["t2i"]["reranker"]["R@10"] == 1.0
    # Re-ranking only the top 2 changes nothing below them.
    top2 = rep["sweep"][0]["t2i"]
    assert top2["reranker"]["R@5"] == top2["dual"]["R@5"] and top2["fused"]["R@10"] == top2["dual"]["R@10"]


def test_library_searches_with_the_chosen_blip_reranker(tmp_path, photo_dir, tiny_model, tiny_blip, captioned):
    from click.testing import CliRunner

    from retrieval import Engine
    from retrieval.cli import cli
    from retrieval.rerank_blip import BlipReranker, FeatureItem, fuse

    lib = tmp_path / "lib"
    run = CliRunner()
    assert run.invoke(cli, ["--library", str(lib), "index", str(photo_dir), "--model", tiny_model, "--json"]).exit_code == 0
    early = run.invoke(cli, ["--library", str(lib), "index", str(photo_dir), "--model", tiny_model, "--rerank-features"])
    assert early.exit_code != 0 and "set-reranker" in early.output
    res = run.invoke(cli, ["--library", str(lib), "set-reranker", tiny_blip, "--model", tiny_model])
    assert res.exit_code == 0 and tiny_blip in res.output
    res = run.invoke(cli, ["--library", str(lib), "index", str(photo_dir), "--model", tiny_model, "--rerank-features"])
    assert res.exit_code == 0 and "12 computed" in res.stderr
    out = run.invoke(cli, ["--library", str(lib), "search", "a red circle", "--model", tiny_model, "-k", "12",
                           "--candidates", "12", "--json"])
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout)
    assert obj["reranked"] and len(obj["hits"]) == 12
    # The same scores from the standalone scorer, on features computed afresh from the files.
    rr = BlipReranker.load(tiny_blip, device="cpu")
    feats, _ = rr.features([FeatureItem(h["id"], "x", h["path"]) for h in obj["hits"]])
    margins = rr.margins_images("a red circle", feats)
    np.testing.assert_allclose([h["rerank_score"] for h in obj["hits"]], rr.probability(margins), atol=2e-3)
    keys = fuse(margins, np.array([h["score"] for h in obj["hits"]], np.float32))
    assert np.all(np.diff(keys) <= 2e-3)  # best first by ITM log-odds plus the dual cosine
    # --threshold keeps its meaning; --no-rerank and the model's own (none) rank by the dual encoder.
    cut = sorted(h["rerank_score"] for h in obj["hits"])[6]
    thr = json.loads(run.invoke(cli, ["--library", str(lib), "search", "a red circle", "--model", tiny_model, "-k", "12",
                                      "--candidates", "12", "--threshold", str(cut - 1e-6), "--json"]).stdout)
    assert {h["id"] for h in thr["hits"]} == {h["id"] for h in obj["hits"] if h["rerank_score"] >= cut - 1e-6}
    plain = json.loads(run.invoke(cli, ["--library", str(lib), "search", "a red circle", "--model", tiny_model,
                                        "--no-rerank", "--json"]).stdout)
    assert not plain["reranked"] and all(h["rerank_score"] is None for h in plain["hits"])
    assert run.invoke(cli, ["--library", str(lib), "set-reranker", "default", "--model", tiny_model]).exit_code == 0
    again = run.invoke(cli, ["--library", str(lib), "search", "a red circle", "--model", tiny_model, "--json"])
    assert not json.loads(again.stdout)["reranked"] and "has no reranker" in again.stderr
    # Per query: --reranker, and image -> text re-ranking against a corpus.
    per_query = json.loads(run.invoke(cli, ["--library", str(lib), "search", "a red circle", "--model", tiny_model, "-k", "12",
                                            "--candidates", "12", "--reranker", tiny_blip, "--json"]).stdout)
    assert [h["id"] for h in per_query["hits"]] == [h["id"] for h in obj["hits"]]
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    assert run.invoke(cli, ["--library", str(lib), "add-texts", str(tmp_path / "texts.txt"), "--model", tiny_model]).exit_code == 0
    query_image = obj["hits"][0]["path"]
    i2t = json.loads(run.invoke(cli, ["--library", str(lib), "search", "--image", query_image, "--target", "texts",
                                      "--model", tiny_model, "--reranker", tiny_blip, "--json"]).stdout)
    assert i2t["reranked"] and len(i2t["hits"]) == len(TEXTS)
    qf, _ = rr.features([FeatureItem(0, "x", query_image)])
    want_t = rr.probability(rr.margins_texts(qf[0], [h["text"] for h in i2t["hits"]]))
    np.testing.assert_allclose([h["rerank_score"] for h in i2t["hits"]], want_t, atol=2e-3)
    # calibrate-reranker keeps a Platt fit in the library; rerank_score becomes the calibrated probability.
    res = run.invoke(cli, ["--library", str(lib), "calibrate-reranker", str(captioned), "--model", tiny_model,
                           "--reranker", tiny_blip, "--candidates", "4", "--json"])
    assert res.exit_code == 0, res.output
    fit = json.loads(res.stdout)
    with Engine.open(lib, model=tiny_model) as eng:
        cal = eng.search_text("a red circle", k=12, candidates=12, reranker=tiny_blip)
    want = 1 / (1 + np.exp(-(fit["scale"] * margins + fit["bias"])))
    by_id = {h["id"]: m for h, m in zip(obj["hits"], want)}
    np.testing.assert_allclose([h.rerank_score for h in cal], [by_id[h.id] for h in cal], atol=2e-3)


def test_search_requests_carry_a_reranker_only_over_the_unix_socket(tiny_blip):
    from retrieval.errors import QueryError
    from retrieval.types import SearchQuery

    q = SearchQuery(text="a red circle", reranker=tiny_blip)
    body = q.to_request()
    assert body["reranker"] == tiny_blip and "reranker" not in SearchQuery(text="x").to_request()
    assert SearchQuery.from_request(body, str, allow_paths=True).reranker == tiny_blip
    with pytest.raises(QueryError, match="unix socket"):
        SearchQuery.from_request(body, str)
