"""Model specs and loading through open_clip's factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.encoders import bundled_models, load_encoder, parse_spec
from retrieval.errors import ModelNotAvailable


def test_spec_forms(tmp_path):
    assert parse_spec("ViT-B-32:laion2b_s34b_b79k").model_name == "ViT-B-32"
    assert parse_spec("ViT-B-32:laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"
    ck = parse_spec(f"ViT-B-32:{tmp_path}/w.safetensors")
    assert (ck.model_name, ck.pretrained) == ("ViT-B-32", f"{tmp_path}/w.safetensors")
    ld = parse_spec(f"local-dir:{tmp_path}")
    assert ld.model_name == f"local-dir:{tmp_path}" and ld.local_dir == tmp_path
    assert parse_spec("hf-hub:org/repo").model_name == "hf-hub:org/repo"
    if "shapes-tiny" in bundled_models():
        assert parse_spec("shapes-tiny").local_dir.name == "shapes-tiny"
    with pytest.raises(ModelNotAvailable, match="names no weights"):
        parse_spec("ViT-B-32")


def test_loaded_weights_match_a_plain_open_clip_load(tiny_model):
    import open_clip
    import torch

    enc = load_encoder(tiny_model)
    ref, _, preprocess = open_clip.create_model_and_transforms(tiny_model)
    ref.eval()
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    with torch.no_grad():
        want_i = torch.nn.functional.normalize(ref.encode_image(preprocess(img)[None]), dim=-1).numpy()
        want_t = torch.nn.functional.normalize(ref.encode_text(open_clip.get_tokenizer(tiny_model)(["a red thing"])), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_pil([img]), want_i, atol=1e-5)
    np.testing.assert_allclose(enc.encode_texts(["a red thing"]), want_t, atol=1e-5)
    assert enc.encode_texts(["a", "b", "c"], batch_size=2).shape == (3, enc.dim)
    v = enc.encode_texts(["x"])
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5 and v.dtype == np.float32


def test_checkpoint_path_spec(tmp_path, tiny_model):
    import json

    folder = Path(tiny_model[len("local-dir:"):])
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_encoder(f"ViT-B-32:{tmp_path}/missing.safetensors")
    with pytest.raises(ModelNotAvailable, match="unknown architecture"):
        load_encoder(f"NoSuchArch:{tmp_path}/x.safetensors")


def test_local_dir_without_weights_is_refused(tmp_path, tiny_model):
    folder = Path(tiny_model[len("local-dir:"):])
    (tmp_path / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    with pytest.raises(ModelNotAvailable, match="no weights"):
        load_encoder(f"local-dir:{tmp_path}")


def test_prepare_and_batch_equal_open_clips_transform(tiny_model):
    import torch

    enc = load_encoder(tiny_model)
    imgs = [Image.new("RGB", (50, 37), (i * 40, 255 - i * 30, 7)) for i in range(3)]
    imgs.append(Image.new("L", (20, 64), 90))
    want = torch.stack([enc.preprocess(im) for im in imgs])
    prepared = [enc.prepare(im) for im in imgs]
    assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 for p in prepared)
    torch.testing.assert_close(enc.batch(prepared), want, atol=1e-6, rtol=0)


def test_text_encoding_cut_to_longest_text_is_exact(tiny_model):
    import open_clip
    import torch

    enc = load_encoder(tiny_model)
    texts = ["a", "a red circle left of a blue square", "x y"]
    ids = open_clip.get_tokenizer(tiny_model)(texts)
    assert int((ids != 0).sum(1).max()) < ids.shape[1]  # the cut really happens
    with torch.no_grad():
        want = torch.nn.functional.normalize(enc.model.encode_text(ids), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_texts(texts), want, atol=1e-6)
