"""The cross-attention reranker on a tiny random open_clip model (offline, CPU)."""

from __future__ import annotations

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


@pytest.mark.parametrize("features", [{}, {"image_layer": "embed", "words": True, "image_depth": 1, "image_local": 8}])
def test_short_training_run_saves_weights_that_load_back(encoder, tmp_path, monkeypatch, features):
    from retrieval.shapes import generate
    from retrieval.train import TrainOptions, train_reranker

    generate(tmp_path / "data", 40, seed=5000, size=32)
    out = tmp_path / "rerankers" / encoder.spec.slug
    train_reranker(TrainOptions(data=str(tmp_path / "data"), model=encoder.spec.spec, out=out, steps=3, batch_size=2,
                                text_groups=2, width=32, depth=1, heads=2, evaluate=False, **features))
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
    want = loaded.score_images("a small red circle", stored_tokens)
    assert 0 < want.min() and want.max() < 1
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
    # grid 4x4: patch 5 is (1, 1); its neighbours include 0 and 10, not 15. One feature moves:
    # the stem layer-normalises each token, so a shift of all its features alike would change nothing.
    nudged[0, 5, 0] += 1.0
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
    with pytest.raises(ModelNotAvailable, match=r"text width 32 vs 64.*crossfind train-reranker DATA --model"):
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
