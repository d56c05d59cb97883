"""Re-ranking inside search: order, thresholds, the stored-token path, the
fallback for libraries indexed before a reranker existed, and crash safety of
the token store."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import kill_indexing_when, noise_image, write_tiny_model

from retrieval import Engine, SearchQuery
from retrieval.cli import cli
from retrieval.encoders import load_encoder
from retrieval.imageio import load_image


def add_random_reranker(model_dir, seed: int = 0, **config) -> None:
    import torch

    from retrieval.rerank import CrossAttentionITM, Reranker, RerankerConfig

    enc = load_encoder(f"local-dir:{model_dir}")
    torch.manual_seed(seed)
    module = CrossAttentionITM(RerankerConfig.for_encoder(enc, width=32, depth=1, heads=2, **config))
    reranker = Reranker(module, enc)
    # Spread the probabilities over (0, 1) on noise images, as calibration
    # would, so that order and thresholds are visible.
    toks = enc.encode_images(
        enc.image_batch([noise_image(900 + i, (64, 64)) for i in range(16)]), with_tokens=True,
        token_layer=module.config.image_layer,
    )[1]
    text, mask = enc.text_tokens(["a red circle", "a green star"], words=module.config.text_words)
    with torch.no_grad():
        logits = torch.cat([module(text[j : j + 1], mask[j : j + 1], torch.from_numpy(toks)) for j in range(2)])
    module.config.shift, module.config.temperature = float(logits.mean()), float(logits.std()) / 2
    reranker.save(model_dir)


@pytest.fixture(scope="module")
def rr_model(tmp_path_factory) -> str:
    d = write_tiny_model(tmp_path_factory.mktemp("rr-model"))
    add_random_reranker(d)
    return f"local-dir:{d}"


def test_rerank_reorders_but_never_drops(tmp_path, rr_model, photo_dir):
    with Engine.open(tmp_path / "lib", model=rr_model) as eng:
        eng.index_folder(photo_dir)
        st = eng.status()["models"][0]
        assert st["image_tokens"] == st["image_vectors"] == 12  # tokens kept at index time
        dual = eng.search(SearchQuery(text="a red circle", k=12, rerank=False))
        rr = eng.search(SearchQuery(text="a red circle", k=12, candidates=12))
        assert rr.reranked and not dual.reranked
        assert {h.id for h in rr.hits} == {h.id for h in dual.hits}
        assert [h.id for h in rr.hits] != [h.id for h in dual.hits]
        probs = [h.rerank_score for h in rr.hits]
        assert probs == sorted(probs, reverse=True)
        # the hits' probabilities are the reranker's on freshly encoded images
        enc, reranker = eng.encoder, eng.state().reranker
        pix = enc.image_batch([load_image(h.path, enc.image_size).image for h in rr.hits])
        _, toks = enc.encode_images(pix, with_tokens=True)
        np.testing.assert_allclose(reranker.score_images("a red circle", toks), probs, atol=1e-3)
        # k smaller than candidates: the top of the re-ranked list
        top3 = eng.search(SearchQuery(text="a red circle", k=3, candidates=12)).hits
        assert [h.id for h in top3] == [h.id for h in rr.hits[:3]]


def test_saturated_probabilities_still_rank_by_the_reranker(tmp_path, photo_dir):
    # A sharp reranker: every probability rounds to 1.0, yet the order must be
    # the reranker's (its raw logits), not the dual encoder's tie-break.
    model_dir = write_tiny_model(tmp_path / "sharp")
    add_random_reranker(model_dir)
    cfg = json.loads((model_dir / "reranker.json").read_text())
    cfg["shift"], cfg["temperature"] = -1e4, 1e-3
    (model_dir / "reranker.json").write_text(json.dumps(cfg))
    with Engine.open(tmp_path / "lib", model=f"local-dir:{model_dir}") as eng:
        eng.index_folder(photo_dir)
        dual = eng.search(SearchQuery(text="a red circle", k=12, rerank=False))
        rr = eng.search(SearchQuery(text="a red circle", k=12, candidates=12))
        assert {h.rerank_score for h in rr.hits} == {1.0}
        assert [h.id for h in rr.hits] != [h.id for h in dual.hits]
        reranker = eng.state().reranker
        by_id = {h.id: h for h in dual.hits}
        toks = eng.image_tokens([h.id for h in rr.hits])
        logits = reranker.logits_images("a red circle", toks, np.array([by_id[h.id].score for h in rr.hits], np.float32))
        assert np.all(np.diff(logits) <= 0)  # hits in falling logit order


def test_threshold_keeps_only_probable_hits(tmp_path, rr_model, photo_dir):
    with Engine.open(tmp_path / "lib", model=rr_model) as eng:
        eng.index_folder(photo_dir)
        every = eng.search(SearchQuery(text="blue", k=12, candidates=12)).hits
        p = sorted(h.rerank_score for h in every)[6]
        kept = eng.search(SearchQuery(text="blue", k=12, candidates=12, threshold=p)).hits
        assert [h.id for h in kept] == [h.id for h in every if h.rerank_score >= p]
        assert 0 < len(kept) < 12


def test_image_query_reranks_texts(tmp_path, rr_model, photo_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"caption number {i}" for i in range(8)))
    with Engine.open(tmp_path / "lib", model=rr_model) as eng:
        eng.index_folder(photo_dir)
        eng.add_texts(corpus)
        res = eng.search(SearchQuery(image=str(photo_dir / "a" / "img00.png"), target="texts", k=8, candidates=8))
        assert res.reranked and len(res.hits) == 8
        assert [h.rerank_score for h in res.hits] == sorted((h.rerank_score for h in res.hits), reverse=True)
        # image -> image has no image-text pair to re-rank
        assert not eng.search(SearchQuery(image=str(photo_dir / "a" / "img00.png"), k=3)).reranked


def test_library_indexed_before_the_reranker_still_reranks(tmp_path, photo_dir):
    model_dir = write_tiny_model(tmp_path / "model")
    spec = f"local-dir:{model_dir}"
    lib = tmp_path / "lib"
    with Engine.open(lib, model=spec) as eng:
        eng.index_folder(photo_dir)
        res = eng.search(SearchQuery(text="x", k=5))
        assert not res.reranked and "no reranker" in res.notes[0]
        assert eng.status()["models"][0]["image_tokens"] == 0
    add_random_reranker(model_dir)
    with Engine.open(lib, model=spec) as eng:
        first = eng.search(SearchQuery(text="a green star", k=12, candidates=12))
        assert first.reranked and all(h.rerank_score is not None for h in first.hits)
        # the fallback re-encoded the candidates once and kept their tokens
        assert eng.status()["models"][0]["image_tokens"] == 12
        again = eng.search(SearchQuery(text="a green star", k=12, candidates=12))
        assert [h.id for h in again.hits] == [h.id for h in first.hits]
        np.testing.assert_allclose([h.rerank_score for h in again.hits], [h.rerank_score for h in first.hits], atol=1e-4)


@pytest.mark.parametrize("layer", ["embed", "embed+final"])
def test_reranker_of_another_layer_starts_the_token_store_over(tmp_path, photo_dir, layer):
    model_dir = write_tiny_model(tmp_path / "model")
    spec = f"local-dir:{model_dir}"
    add_random_reranker(model_dir)
    lib = tmp_path / "lib"
    with Engine.open(lib, model=spec) as eng:
        eng.index_folder(photo_dir)
        assert eng.status()["models"][0]["image_tokens"] == 12  # final-layer tokens
    add_random_reranker(model_dir, seed=1, image_layer=layer, text_words=True)
    with Engine.open(lib, model=spec) as eng:
        state = eng.state()
        assert state.token_layer == layer and state.tokens.layer == layer
        assert state.tokens.shape[1] == state.reranker.config.image_width * len(layer.split("+"))
        assert eng.status()["models"][0]["image_tokens"] == 0  # the final-layer rows no longer count
        res = eng.search(SearchQuery(text="a green star", k=12, candidates=12))
        assert res.reranked and eng.status()["models"][0]["image_tokens"] == 12
        enc, reranker = eng.encoder, state.reranker
        pix = enc.image_batch([load_image(h.path, enc.image_size).image for h in res.hits])
        _, toks = enc.encode_images(pix, with_tokens=True, token_layer=layer)
        np.testing.assert_allclose(reranker.score_images("a green star", toks), [h.rerank_score for h in res.hits], atol=1e-3)
        np.testing.assert_array_equal(state.tokens.read([h.id for h in res.hits]), toks)


def test_cli_json_shows_rerank_and_note(tmp_path, rr_model, photo_dir, tiny_model):
    lib = tmp_path / "lib"
    runner = CliRunner()
    runner.invoke(cli, ["--library", str(lib), "index", str(photo_dir), "--model", rr_model], catch_exceptions=False)
    out = json.loads(runner.invoke(cli, ["--library", str(lib), "search", "x", "-k", "2", "--json"]).stdout)
    assert out["reranked"] is True and all(isinstance(h["rerank_score"], float) for h in out["hits"])
    table = runner.invoke(cli, ["--library", str(lib), "search", "x", "-k", "2"]).stdout.splitlines()
    assert table[0].split() == ["rank", "score", "match", "item"]
    out = json.loads(runner.invoke(cli, ["--library", str(lib), "search", "x", "--no-rerank", "--json"]).stdout)
    assert out["reranked"] is False and out["hits"][0]["rerank_score"] is None
    lib2 = tmp_path / "lib2"
    runner.invoke(cli, ["--library", str(lib2), "index", str(photo_dir), "--model", tiny_model], catch_exceptions=False)
    res = runner.invoke(cli, ["--library", str(lib2), "search", "x", "--json"])
    assert json.loads(res.stdout)["reranked"] is False
    assert res.stderr.count("has no reranker") == 1


def test_token_store_survives_kill(tmp_path, rr_model):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        noise_image(5000 + i, (64, 64)).save(folder / f"{i:04d}.png")
    lib = tmp_path / "lib"

    def tokens_written() -> bool:
        files = list((lib / "models").glob("*/tokens.f16")) if (lib / "models").exists() else []
        if files and files[0].stat().st_size > 0:
            time.sleep(0.3)  # kill a little after the first token rows reach the file, mid-run
            return True
        return False

    kill_indexing_when(folder, lib, rr_model, tokens_written)
    with Engine.open(lib, model=rr_model) as eng:
        eng.index_folder(folder)
        state = eng.state()
        ids = sorted(eng.store.image_vector_map(state.row.id))
        assert len(ids) == 300 and eng.store.token_ids(state.row.id, ids) == set(ids)
        rows = eng.store.images_by_id(ids[::37])
        enc = eng.encoder
        pix = enc.image_batch([load_image(rows[i].path, enc.image_size).image for i in sorted(rows)])
        _, fresh = enc.encode_images(pix, with_tokens=True)
        np.testing.assert_allclose(state.tokens.read(sorted(rows)).astype(np.float32), fresh.astype(np.float32), atol=1e-2)


def test_damaged_reranker_is_a_clear_error(tmp_path, photo_dir):
    from retrieval import ModelNotAvailable

    model_dir = write_tiny_model(tmp_path / "model")
    add_random_reranker(model_dir)
    cfg = json.loads((model_dir / "reranker.json").read_text())
    cfg["width"] = 64  # weights saved for width 32
    (model_dir / "reranker.json").write_text(json.dumps(cfg))
    with Engine.open(tmp_path / "lib", model=f"local-dir:{model_dir}") as eng:
        with pytest.raises(ModelNotAvailable, match="do not fit"):
            eng.index_folder(photo_dir)


def test_repeated_reranked_query_needs_no_encoder(tmp_path, rr_model, photo_dir):
    lib = tmp_path / "lib"
    with Engine.open(lib, model=rr_model) as eng:
        eng.index_folder(photo_dir)
        first = eng.search(SearchQuery(text="a red circle", k=6, candidates=12))
    with Engine.open(lib, model=rr_model) as eng:
        again = eng.search(SearchQuery(text="a red circle", k=6, candidates=12))
        state = eng.state()
        assert again.reranked and state._encoder is None and state.reranker._encoder is None  # tokens from the history
        assert [(h.id, h.rerank_score) for h in again.hits] == [(h.id, h.rerank_score) for h in first.hits]
        new = eng.search(SearchQuery(text="a green star", k=6, candidates=12))
        assert new.reranked and state._encoder is not None and state.reranker.encoder is state._encoder
        # the kept tokens are the encoder's: scoring them equals scoring the text
        toks = state.tokens.read([h.id for h in again.hits])
        kept = eng.store.text_tokens(state.spec.spec, "a red circle")
        assert kept is not None
        np.testing.assert_allclose(
            state.reranker.logits_images(np.frombuffer(kept, np.float32).reshape(-1, state.reranker.config.text_features), toks),
            state.reranker.logits_images("a red circle", toks), atol=1e-5,
        )
