"""The cross-attention reranker on a tiny random open_clip model (offline, CPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import write_tiny_model  # noqa: E402
from retrieval.encoders import load_encoder  # noqa: E402
from retrieval.errors import ModelNotAvailable  # noqa: E402
from retrieval.rerank import (  # noqa: E402
    CONFIG_NAME,
    CrossAttentionITM,
    RankedCandidate,
    Reranker,
    RerankerConfig,
    WEIGHTS_NAME,
    find_reranker,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "head_width": 24, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    return load_encoder(f"local-dir:{write_tiny_model(tmp_path_factory.mktemp('tiny-clip'), model_cfg=TINY, preprocess_cfg={})}", device="cpu")


@pytest.fixture(scope="session")
def reranker(encoder):
    torch.manual_seed(1)
    return Reranker(CrossAttentionITM(RerankerConfig.for_encoder(encoder, width=32, depth=2, heads=2)), encoder)


def _images(n: int):
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        im = Image.new("RGB", (40, 40), (30 * i % 255, 90, 160))
        ImageDraw.Draw(im).ellipse((4 + i, 6, 20 + i, 22), fill=(250, 20 * i % 255, 10))
        out.append(im)
    return out


@pytest.fixture(scope="session")
def stored_tokens(encoder):
    return encoder.encode_images(encoder.image_batch(_images(6)), with_tokens=True)[1]


def test_scores_are_probabilities_of_the_right_shape(reranker, stored_tokens):
    cfg = reranker.config

    def calibrated(logits):  # the documented mapping from logits to match probabilities
        return 1 / (1 + np.exp(-(logits.astype(np.float64) - cfg.shift) / cfg.temperature))

    p = reranker.score_images("a red circle", stored_tokens)
    assert p.shape == (6,) and p.dtype == np.float32
    np.testing.assert_allclose(p, calibrated(reranker.logits_images("a red circle", stored_tokens)), rtol=1e-5)
    assert len(set(p.tolist())) > 1  # the candidates are told apart
    texts = ["a red circle", "a blue square above a green star", "x"]
    q = reranker.score_texts(stored_tokens[0], texts)
    assert q.shape == (3,) and q.dtype == np.float32
    np.testing.assert_allclose(q, calibrated(reranker.logits_texts(stored_tokens[0], texts)), rtol=1e-5)
    assert reranker.score_images("a red circle", stored_tokens[:0]).shape == (0,)
    assert reranker.score_texts(stored_tokens[0], []).shape == (0,)


def test_batching_does_not_change_scores(reranker, stored_tokens):
    whole = reranker.score_images("a red circle", stored_tokens)
    reranker.batch_size = 4
    try:
        assert np.allclose(reranker.score_images("a red circle", stored_tokens), whole, atol=1e-6)
    finally:
        reranker.batch_size = 256
    singles = np.concatenate([reranker.score_images("a red circle", stored_tokens[i : i + 1]) for i in range(6)])
    assert np.allclose(singles, whole, atol=1e-5)


def test_stored_tokens_score_like_freshly_encoded_images(reranker, encoder, stored_tokens, tmp_path):
    # What the engine does: write float16 rows at indexing time, memory-map them at search time.
    mm = np.memmap(tmp_path / "tokens.f16", dtype=np.float16, mode="w+", shape=stored_tokens.shape)
    mm[:] = stored_tokens
    mm.flush()
    del mm
    stored = np.memmap(tmp_path / "tokens.f16", dtype=np.float16, mode="r", shape=stored_tokens.shape)
    with torch.inference_mode():
        fresh = encoder.image_tokens(encoder.image_batch(_images(6))).numpy()
    assert fresh.dtype == np.float32
    from_store = reranker.score_images("a red circle", stored[[4, 1, 5]])
    from_fresh = reranker.score_images("a red circle", fresh[[4, 1, 5]])
    assert np.array_equal(from_store, from_fresh)
    assert np.array_equal(reranker.score_texts(stored[2], ["a", "b"]), reranker.score_texts(fresh[2], ["a", "b"]))


def test_rank_orders_by_score_and_keeps_every_candidate(reranker, stored_tokens):
    ranked = reranker.rank("a red circle", stored_tokens)
    scores = reranker.score_images("a red circle", stored_tokens)
    assert all(isinstance(r, RankedCandidate) for r in ranked)
    assert sorted(r.index for r in ranked) == list(range(6))
    assert [r.score for r in ranked] == sorted(scores.tolist(), reverse=True)
    assert [r.score for r in ranked] == [float(scores[r.index]) for r in ranked]
    top = reranker.rank("a red circle", stored_tokens, top_k=2)
    assert top == ranked[:2]
    texts = ["a red circle", "a blue square", "two stars", "nothing at all"]
    by_image = reranker.rank(stored_tokens[3], texts)
    assert sorted(r.index for r in by_image) == [0, 1, 2, 3]
    assert [r.score for r in by_image] == sorted((r.score for r in by_image), reverse=True)


def test_wrong_token_shape_is_a_clear_error(reranker):
    with pytest.raises(ValueError, match="patch tokens must have shape"):
        reranker.score_images("x", np.zeros((2, 9, 48), np.float16))


def _script(name: str):
    """Import ``scripts/NAME.py`` (once; later calls get the same module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _train_script():
    return _script("train_reranker")


@pytest.mark.parametrize("features", [[], ["--image-layer", "embed", "--words", "--image-depth", "1", "--curriculum", "2",
                                                      "--image-local", "8"]])
def test_short_training_run_saves_weights_that_load_back(encoder, tmp_path, monkeypatch, features):
    from retrieval.shapes import generate

    generate(tmp_path / "data", 24, seed=5000, size=32)
    out = tmp_path / "rerankers" / encoder.spec.slug
    trained = _train_script().main(
        ["--model", encoder.spec.spec, "--data", str(tmp_path / "data"), "--out", str(out), "--steps", "3",
         "--width", "32", "--depth", "1", "--heads", "2", "--calib-fraction", "0.25", "--no-eval", "--minimal-groups", "2",
         *features]
    )
    assert (out / "reranker.safetensors").is_file() and (out / CONFIG_NAME).is_file()
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["model"] == encoder.spec.slug and config["temperature"] > 0
    layer = "embed" if features else "final"
    assert (config["image_layer"], config["text_words"], config["image_depth"]) == (layer, bool(features), 1 if features else 0)
    assert config["image_local"] == (8 if features else 0)
    stored_tokens = encoder.encode_images(encoder.image_batch(_images(6)), with_tokens=True, token_layer=layer)[1]
    loaded = Reranker.load(out, encoder)
    monkeypatch.setenv("CROSSFIND_RERANKERS", str(tmp_path / "rerankers"))
    found = find_reranker(encoder)
    assert found is not None
    want = trained.score_images("a small red circle", stored_tokens)
    assert np.array_equal(loaded.score_images("a small red circle", stored_tokens), want)
    assert np.array_equal(found.score_images("a small red circle", stored_tokens), want)


def test_patch_tokens_of_other_layers_and_word_embeddings(encoder):
    pix = encoder.image_batch(_images(3))
    final = encoder.image_tokens(pix)
    embed = encoder.image_tokens(pix, layer="embed")
    assert embed.shape == final.shape == (3, 16, 48) and not torch.allclose(embed, final)
    with torch.no_grad():  # the patch embedding is the conv1 output, patch by patch
        conv = encoder.model.visual.conv1(pix).flatten(2).transpose(1, 2)
    assert torch.allclose(embed, conv)
    assert encoder.image_tokens(pix, layer="block0").shape == (3, 16, 48)
    _, stored = encoder.encode_images(pix, with_tokens=True, token_layer="embed")
    np.testing.assert_allclose(stored.astype(np.float32), embed.numpy(), atol=2e-3)
    with pytest.raises(ValueError, match="unknown token layer 'block9'.*block0"):
        encoder.image_tokens(pix, layer="block9")
    # several layers at once: side by side, from one forward pass that also pools as usual
    two = encoder.image_tokens(pix, layer="embed+final")
    assert two.shape == (3, 16, 96) and torch.allclose(two, torch.cat([embed, final], -1))
    vec, stored2 = encoder.encode_images(pix, with_tokens=True, token_layer="embed+final")
    np.testing.assert_array_equal(vec, encoder.encode_images(pix)[0])
    np.testing.assert_allclose(stored2.astype(np.float32), two.numpy(), atol=2e-3)
    with pytest.raises(ValueError, match="unknown token layer 'bogus'"):
        encoder.image_tokens(pix, layer="embed+bogus")
    plain, mask = encoder.text_tokens(["a red circle", "a blue square left of a green star"])
    both, mask2 = encoder.text_tokens(["a red circle", "a blue square left of a green star"], words=True)
    assert both.shape == (*plain.shape[:2], 2 * plain.shape[2]) and torch.equal(mask, mask2)
    assert torch.equal(both[..., :32], plain)
    ids = encoder.tokenize(["a red circle", "a blue square left of a green star"])[:, : plain.shape[1]]
    assert torch.equal(both[..., 32:], encoder.model.token_embedding(ids).detach())


def test_reranker_reads_the_tokens_its_config_names(encoder):
    torch.manual_seed(4)
    cfg = RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2, image_layer="embed", text_words=True, image_depth=1)
    rr = Reranker(CrossAttentionITM(cfg), encoder)
    pix = encoder.image_batch(_images(4))
    embed = encoder.image_tokens(pix, layer="embed").numpy()
    text, mask = encoder.text_tokens(["a red circle"], words=True)
    with torch.inference_mode():
        want = rr.module.probability(rr.module(text, mask, torch.from_numpy(embed.astype(np.float16)))).numpy()
    np.testing.assert_allclose(rr.score_images("a red circle", embed), want, atol=1e-6)
    # grouped pairs: each image encoded once, then indexed
    with torch.inference_mode():
        idx = torch.tensor([2, 0, 2])
        grouped = rr.module(text.expand(3, -1, -1), mask.expand(3, -1), torch.from_numpy(embed), image_index=idx)
        direct = rr.module(text.expand(3, -1, -1), mask.expand(3, -1), torch.from_numpy(embed[[2, 0, 2]]))
    assert torch.allclose(grouped, direct, atol=1e-5)


def test_two_layer_reranker_reads_both_layers_of_each_patch(encoder, tmp_path):
    torch.manual_seed(5)
    cfg = RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2, image_layer="embed+final")
    assert cfg.image_features == 2 * cfg.image_width
    rr = Reranker(CrossAttentionITM(cfg), encoder)
    toks = encoder.encode_images(encoder.image_batch(_images(3)), with_tokens=True, token_layer="embed+final")[1]
    base = rr.logits_images("a red circle", toks)
    for half in (slice(0, 48), slice(48, 96)):  # a change in either layer's tokens changes the score
        other = toks.copy()
        other[..., half] = other[..., half][::-1]
        assert not np.allclose(rr.logits_images("a red circle", other), base)
    with pytest.raises(ValueError, match=r"shape \(n, 16, 96\)"):
        rr.logits_images("a red circle", toks[..., :48])
    rr.save(tmp_path / "two")
    again = Reranker.load(tmp_path / "two", encoder)
    assert again.config.image_layer == "embed+final"
    np.testing.assert_allclose(again.logits_images("a red circle", toks), base, atol=1e-3)  # saved as float16


def test_local_stem_reads_each_patch_neighbourhood_and_starts_at_zero(encoder, tmp_path):
    torch.manual_seed(6)
    plain_cfg = RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2, image_layer="embed+final")
    local_cfg = RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2, image_layer="embed+final", image_local=24)
    plain, local = CrossAttentionITM(plain_cfg), CrossAttentionITM(local_cfg)
    missing = local.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("local_in.") for k in missing)
    toks = encoder.encode_images(encoder.image_batch(_images(3)), with_tokens=True, token_layer="embed+final")[1]
    base = Reranker(plain, encoder).logits_images("a red circle", toks)
    rr = Reranker(local, encoder)
    # a new stem adds nothing until trained: the same scores as without it
    np.testing.assert_allclose(rr.logits_images("a red circle", toks), base, atol=1e-5)
    with torch.no_grad():
        torch.nn.init.normal_(local.local_in.net[-1].weight, std=0.5)
    moved = rr.logits_images("a red circle", toks)
    assert not np.allclose(moved, base, atol=1e-3)
    # the stem reads the first layer's tokens around each patch: a neighbour's token changes one patch's output
    first = torch.from_numpy(toks[:1, :, :48].astype(np.float32))
    out = local.local_in(first)
    nudged = first.clone()
    nudged[0, 5] += 1.0  # grid 4x4: patch 5 is (1, 1); its neighbours include 0 and 10, not 15
    diff = (local.local_in(nudged) - out).abs().sum(-1)[0]
    assert diff[0] > 0 and diff[10] > 0 and diff[15] == 0
    rr.save(tmp_path / "local")
    again = Reranker.load(tmp_path / "local", encoder)
    assert again.config.image_local == 24
    np.testing.assert_allclose(again.logits_images("a red circle", toks), moved, atol=2e-3)  # saved as float16


def test_no_reranker_found_is_none(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSFIND_RERANKERS", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert find_reranker(encoder) is None
    with pytest.raises(ModelNotAvailable, match="train one with"):
        Reranker.load(tmp_path / "none", encoder)


def test_reranker_for_another_model_is_a_clear_error(reranker, encoder, tmp_path, monkeypatch):
    other_cfg = {**TINY, "text_cfg": {**TINY["text_cfg"], "width": 64}}
    other = load_encoder(f"local-dir:{write_tiny_model(tmp_path / 'other-clip', model_cfg=other_cfg, preprocess_cfg={})}", device="cpu")
    reranker.save(tmp_path / "rr" / other.spec.slug)
    with pytest.raises(ModelNotAvailable, match=r"text width 32 vs 64.*train_reranker\.py --model"):
        Reranker.load(tmp_path / "rr" / other.spec.slug, other)
    monkeypatch.setenv("CROSSFIND_RERANKERS", str(tmp_path / "rr"))
    with pytest.raises(ModelNotAvailable, match="does not fit model"):
        find_reranker(other)


def test_config_round_trips_through_json(reranker):
    assert RerankerConfig.from_json(reranker.config.to_json()) == reranker.config


def test_library_import_does_not_load_the_reranker():
    code = "import sys, retrieval; assert 'retrieval.rerank' not in sys.modules; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_residual_reranker_at_init_ranks_exactly_like_the_dual_encoder(encoder, stored_tokens, tmp_path):
    torch.manual_seed(3)
    module = CrossAttentionITM(RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2, residual=True))
    assert float(module.head.weight.detach().abs().sum()) == 0.0  # the correction starts at zero
    with torch.no_grad():
        module.dual_scale.fill_(37.0)
    rr = Reranker(module, encoder)
    dual = np.array([0.31, 0.12, 0.305, -0.2, 0.45, 0.3], np.float32)
    order = [r.index for r in rr.rank("a red circle", stored_tokens, dual_scores=dual)]
    assert order == np.argsort(-dual, kind="stable").tolist()
    texts = ["a red circle", "a blue square", "two stars", "nothing at all", "x", "y"]
    by_image = [r.index for r in rr.rank(stored_tokens[2], texts, dual_scores=dual)]
    assert by_image == np.argsort(-dual, kind="stable").tolist()
    # probabilities are sigmoid((37 * cos - shift) / T)
    p = rr.score_images("a red circle", stored_tokens, dual_scores=dual)
    assert np.allclose(p, 1 / (1 + np.exp(-37.0 * dual)), atol=1e-5)
    with pytest.raises(ValueError, match="dual_scores"):
        rr.score_images("a red circle", stored_tokens, dual_scores=dual[:3])
    # a/b and the calibration shift survive save and load
    rr.config.shift, rr.config.temperature = 2.5, 1.5
    with torch.no_grad():
        module.dual_bias.fill_(0.25)
    rr.save(tmp_path / "res")
    loaded = Reranker.load(tmp_path / "res", encoder)
    assert loaded.config.residual and loaded.config.shift == 2.5
    assert np.allclose(loaded.score_images("a red circle", stored_tokens, dual_scores=dual),
                       rr.score_images("a red circle", stored_tokens, dual_scores=dual), atol=1e-3)


def test_old_configs_without_the_new_fields_still_parse():
    old = {"model": "m", "text_width": 32, "image_width": 48, "image_tokens": 16, "max_text_tokens": 16,
           "width": 32, "depth": 1, "heads": 2, "mlp_ratio": 4.0, "dropout": 0.0, "temperature": 0.8}
    cfg = RerankerConfig.from_json(json.dumps(old))
    assert cfg.shift == 0.0 and cfg.residual is False and cfg.temperature == 0.8


def test_minimal_groups_train_each_image_against_its_swapped_captions(encoder, tmp_path):
    from retrieval.shapes import Scene, generate

    train = _train_script()
    records = generate(tmp_path / "data", 12, seed=5001, size=32)
    pool = train.build_pool(encoder, tmp_path / "data", records, perturb=True, seed=1, hard_k=3, canonical=True)
    groups = train.minimal_groups(pool)
    assert len(groups) >= 6
    for group in groups:
        keys = {pool.scenes[t] for t in group}
        assert len(keys) == 4 and all(Scene.from_key(k) for k in keys)
        assert all(set(group) - {t} == set(pool.partners[t]) for t in group)
    torch.manual_seed(5)
    module = CrossAttentionITM(RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2))
    loss = train.group_loss(module, pool, groups[:3])
    # the same 4x4 scores pair by pair: image j of the group against caption k
    caps = groups[:3]
    with torch.no_grad():
        direct = torch.stack([
            torch.stack([
                module(pool.txt_tok[caps[g]], pool.txt_mask[caps[g]], pool.img_tok[[pool.txt_img[caps[g, j]]]]) for j in range(4)
            ]) for g in range(3)
        ])  # [group, image, caption]
    target = torch.arange(4).repeat(3)
    want = (torch.nn.functional.cross_entropy(direct.reshape(-1, 4), target)
            + torch.nn.functional.cross_entropy(direct.transpose(1, 2).reshape(-1, 4), target))
    assert torch.allclose(loss, want, atol=1e-4)
    loss.backward()  # it trains the module
    assert module.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0
    # canonical captions: the scene keys' tokens stand in for the captions
    canon = train.group_loss(module, pool, groups[:3], canonical=np.ones(3, bool))
    pool.txt_tok, pool.txt_mask = pool.canon_tok, pool.canon_mask
    assert torch.allclose(canon, train.group_loss(module, pool, groups[:3]), atol=1e-5)
    assert not torch.allclose(canon, loss.detach(), atol=1e-3)


def test_reranker_saved_with_the_old_mask_token_loads_and_scores_the_same(reranker, encoder, stored_tokens, tmp_path):
    # rerankers saved while masked word prediction was a training option (the bundled
    # one among them) carry an unused mask token; loading drops it
    from safetensors.torch import load_file, save_file

    reranker.save(tmp_path / "rr")
    weights = tmp_path / "rr" / WEIGHTS_NAME
    state = load_file(str(weights))
    assert "mask_token" not in state
    want = Reranker.load(tmp_path / "rr", encoder).logits_images("a red circle", stored_tokens)
    save_file({**state, "mask_token": torch.zeros(reranker.config.width, dtype=torch.float16)}, str(weights))
    loaded = Reranker.load(tmp_path / "rr", encoder)
    np.testing.assert_array_equal(loaded.logits_images("a red circle", stored_tokens), want)
    np.testing.assert_allclose(want, reranker.logits_images("a red circle", stored_tokens), atol=1e-3)  # float16 weights


def test_tune_dual_keeps_a_weight_that_does_not_cost_ordinary_recall(encoder, tmp_path):
    from argparse import Namespace

    train = _train_script()
    torch.manual_seed(7)
    module = CrossAttentionITM(RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2, residual=True))
    # head at zero: re-ranking by s * cosine is the dual encoder's order for every weight s
    info = train.tune_dual_scale(module, encoder, Namespace(tune_n=40), tmp_path / "work")
    assert info["ordinary_r1"] == pytest.approx([info["ordinary_dual_r1"]] * len(info["grid"]))
    assert info["minimal_r1"] == pytest.approx([info["minimal_dual_r1"]] * len(info["grid"]))
    assert info["dual_scale"] == info["grid"][0] == float(module.dual_scale.detach())
    # a head that disagrees: the kept weight never ranks ordinary scenes below the dual encoder when one exists
    with torch.no_grad():
        module.head.weight.normal_(0, 5.0)
    info = train.tune_dual_scale(module, encoder, Namespace(tune_n=40), tmp_path / "work")
    kept = info["grid"].index(info["dual_scale"])
    ok = [r >= info["ordinary_dual_r1"] for r in info["ordinary_r1"]]
    assert (not any(ok)) or ok[kept]
    assert float(module.dual_scale.detach()) == info["dual_scale"]


def test_lab_model_saved_as_a_reranker_scores_the_same(tmp_path):
    lab = _script("reranker_lab")
    # the script itself refuses to save when the converted model's logits differ (> 1e-3)
    lab.main(["--variant", "cross", "--words", "--layer", "embed", "--image-depth", "1", "--n", "64", "--val", "64",
              "--steps", "2", "--every", "2", "--save", str(tmp_path / "rr")])
    reranker = Reranker.load(tmp_path / "rr", load_encoder("shapes-tiny", device="cpu"))
    assert (reranker.config.image_layer, reranker.config.text_words, reranker.config.image_depth) == ("embed", True, 1)
    # --init starts from saved weights: no steps, saved again, the same weights
    lab.main(["--variant", "cross", "--words", "--layer", "embed", "--image-depth", "1", "--n", "64", "--val", "64",
              "--steps", "0", "--init", str(tmp_path / "rr"), "--save", str(tmp_path / "again")])
    from safetensors.torch import load_file

    first, again = load_file(str(tmp_path / "rr" / WEIGHTS_NAME)), load_file(str(tmp_path / "again" / WEIGHTS_NAME))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # residual on the dual encoder, with ordinary and mined groups: saved residual, its dual weight kept
    lab.main(["--variant", "cross", "--words", "--layer", "embed", "--image-depth", "1", "--n", "64", "--val", "64",
              "--steps", "2", "--every", "2", "--init", str(tmp_path / "rr"), "--residual", "20", "--ordinary", "64",
              "--ordinary-groups", "2", "--mined-groups", "2", "--save", str(tmp_path / "residual")])
    residual = Reranker.load(tmp_path / "residual", load_encoder("shapes-tiny", device="cpu"))
    assert residual.config.residual and abs(float(residual.module.dual_scale.detach()) - 20) < 0.1
    # a second layer's tokens (embed+final) from a one-layer reranker: it starts out scoring exactly like it
    lab.main(["--variant", "cross", "--words", "--layer", "embed+final", "--image-depth", "1", "--n", "64", "--val", "64",
              "--steps", "0", "--init", str(tmp_path / "residual"), "--residual", "20", "--save", str(tmp_path / "two")])
    two = Reranker.load(tmp_path / "two", residual.encoder)
    assert two.config.image_layer == "embed+final"
    pix = two.encoder.image_batch(_images(4))
    one_toks = two.encoder.encode_images(pix, with_tokens=True, token_layer="embed")[1]
    two_toks = two.encoder.encode_images(pix, with_tokens=True, token_layer="embed+final")[1]
    dual = np.linspace(0.1, 0.4, 4, dtype=np.float32)
    np.testing.assert_allclose(two.logits_images("a red circle left of a blue square", two_toks, dual),
                               residual.logits_images("a red circle left of a blue square", one_toks, dual), atol=1e-4)
    # a local stem on top (--local): saved with it, and at the start scoring exactly like the model without it
    lab.main(["--variant", "cross", "--words", "--layer", "embed+final", "--image-depth", "1", "--n", "64", "--val", "64",
              "--steps", "0", "--init", str(tmp_path / "two"), "--residual", "20", "--local", "16",
              "--save", str(tmp_path / "local")])
    local = Reranker.load(tmp_path / "local", residual.encoder)
    assert local.config.image_local == 16 and local.module.local_in is not None
    np.testing.assert_allclose(local.logits_images("a red circle left of a blue square", two_toks, dual),
                               two.logits_images("a red circle left of a blue square", two_toks, dual), atol=1e-4)
    # trained with the auxiliary shape loss: the stem moves, the lab-only shape head is not saved
    result = lab.main(["--variant", "cross", "--words", "--layer", "embed+final", "--image-depth", "1", "--n", "64",
                       "--val", "64", "--steps", "2", "--every", "2", "--init", str(tmp_path / "local"), "--residual", "20",
                       "--local", "16", "--shape-aux", "1", "--save", str(tmp_path / "aux")])
    assert "stem_shape_accuracy" in result  # the shape loss reports how well the stem reads shape
    aux = load_file(str(tmp_path / "aux" / WEIGHTS_NAME))
    assert not any(k.startswith("shape_head.") for k in aux)
    assert not torch.equal(aux["local_in.net.4.weight"], load_file(str(tmp_path / "local" / WEIGHTS_NAME))["local_in.net.4.weight"])


def test_lab_ordinary_groups_hold_alike_scenes_with_distinct_keys():
    lab = _script("reranker_lab")
    pool = lab.Ordinary(load_encoder("shapes-tiny", device="cpu"), 200, 9, "embed", k=6)
    groups = pool.groups(np.arange(50), np.random.default_rng(0))
    assert groups.shape == (50, 4) and (groups[:, 0] == np.arange(50)).all()
    assert all(len(set(pool.key[g])) == 4 for g in groups)
    # the others come from the anchor's mined near misses, ranked above most items by the dual encoder
    assert all(set(g[1:]) <= set(pool.near[g[0]]) for g in groups)
    dual = pool.dual_accuracy(groups)
    assert 0.0 < dual["t2i"] < 1.0 and 0.0 < dual["i2t"] < 1.0
