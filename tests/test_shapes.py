"""The generated shapes dataset and a tiny training run of the shapes model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.shapes import (
    COLORS,
    RELATIONS,
    SHAPES,
    Obj,
    Scene,
    generate,
    relation_holds,
    reverse_relation,
    samples,
    swap_colors,
    swap_shapes,
)

ROOT = Path(__file__).resolve().parent.parent
RED_CIRCLE = Obj("small", "red", "circle")
BLUE_SQUARE = Obj("large", "blue", "square")
GREEN_STAR = Obj("large", "green", "star")


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_vocabulary_is_big_enough():
    assert len(COLORS) >= 8 and len(SHAPES) >= 5


def test_generate_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", 12, seed=3)
    b = generate(tmp_path / "b", 12, seed=3)
    c = generate(tmp_path / "c", 12, seed=4)
    assert a == b and a != c
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    lines = [json.loads(x) for x in (tmp_path / "a" / "captions.jsonl").read_text().splitlines()]
    assert lines == a
    assert lines[0]["image"] == "images/000000.png" and (tmp_path / "a" / lines[0]["image"]).is_file()
    for rec in lines:
        assert Scene.from_key(rec["scene"]).key() == rec["scene"]
    from PIL import Image

    with Image.open(tmp_path / "a" / "images" / "000003.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_shorter_run_is_a_prefix():
    short = [(s.caption, s.scene.key()) for s in samples(5, seed=11)]
    long = [(s.caption, s.scene.key()) for s in samples(9, seed=11)]
    assert long[:5] == short


def test_equivalent_descriptions_share_a_key():
    left = Scene((RED_CIRCLE, BLUE_SQUARE), ((0, "left of", 1),))
    right = Scene((BLUE_SQUARE, RED_CIRCLE), ((0, "right of", 1),))
    assert left.key() == right.key() == "small red circle left-of large blue square"
    above = Scene((RED_CIRCLE, BLUE_SQUARE), ((0, "above", 1),))
    below = Scene((RED_CIRCLE, BLUE_SQUARE), ((1, "below", 0),))
    assert above.key() == below.key() and above == below
    assert left != above
    three_a = Scene((RED_CIRCLE, BLUE_SQUARE, GREEN_STAR), ((0, "left of", 1), (2, "above", 1)))
    three_b = Scene((GREEN_STAR, BLUE_SQUARE, RED_CIRCLE), ((1, "below", 0), (1, "right of", 2)))
    assert three_a.key() == three_b.key()


def test_from_key_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = Scene.random(rng)
        back = Scene.from_key(scene.key())
        assert back == scene and back.key() == scene.key()


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="colour"):
        Obj("small", "teal", "circle")
    with pytest.raises(ValueError):
        Scene((RED_CIRCLE, RED_CIRCLE), ((0, "left of", 1),))
    with pytest.raises(ValueError):
        Scene((RED_CIRCLE, BLUE_SQUARE))


def test_captions_name_every_object():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = Scene.random(rng)
        caption = scene.caption(rng)
        for obj in scene.objects:
            assert obj.phrase in caption
        assert sum(rel in caption for rel in RELATIONS + ("under",)) >= len(scene.relations)
    two = Scene((RED_CIRCLE, BLUE_SQUARE), ((0, "left of", 1),))
    phrasings = {two.caption(rng) for _ in range(60)}
    assert "a small red circle left of a large blue square" in phrasings
    assert "a large blue square to the right of a small red circle" in phrasings
    assert len(phrasings) >= 6


def test_layout_satisfies_relations():
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = Scene.random(rng)
        boxes = scene.layout(64, rng)
        for x, y, r in boxes:
            assert r <= x <= 64 - r and r <= y <= 64 - r
        for s, rel, o in scene.relations:
            assert relation_holds(boxes[s], rel, boxes[o]), (scene.key(), boxes)


@pytest.mark.parametrize("minimal_pairs", [False, True])
def test_samples_record_where_objects_were_drawn(minimal_pairs):
    """A sample's boxes are the ones its image was drawn with: relations hold
    for them and the pixel at each box centre has that object's colour."""
    for item in samples(24, 5, minimal_pairs=minimal_pairs):
        assert len(item.boxes) == len(item.scene.objects)
        for s, rel, o in item.scene.relations:
            assert relation_holds(item.boxes[s], rel, item.boxes[o])
        im = np.asarray(item.image, dtype=np.int32)
        for obj, (x, y, _) in zip(item.scene.objects, item.boxes):
            pixel = im[int(y), int(x)]
            assert np.abs(pixel - np.array(COLORS[obj.color])).max() <= 40, (item.caption, obj, pixel)


def test_render_puts_colours_where_the_layout_says():
    scene = Scene((Obj("large", "red", "square"), Obj("large", "blue", "square")), ((0, "left of", 1),))
    im = np.asarray(scene.render(64, np.random.default_rng(5)), dtype=np.int32)
    redness = im[..., 0] - im[..., 2]
    cols = np.nonzero(redness.max(axis=0) > 120)[0]
    blues = np.nonzero((im[..., 2] - im[..., 0]).max(axis=0) > 120)[0]
    assert cols.size and blues.size and cols.mean() < blues.mean()


def test_perturbations_change_the_key():
    base = Scene((RED_CIRCLE, BLUE_SQUARE), ((0, "left of", 1),))
    colors, shapes_, reverse = swap_colors(base), swap_shapes(base), reverse_relation(base)
    assert colors is not None and colors.key() == "small blue circle left-of large red square"
    assert shapes_ is not None and shapes_.key() == "small red square left-of large blue circle"
    assert reverse is not None and reverse.key() == "large blue square left-of small red circle"
    assert len({base.key(), colors.key(), shapes_.key(), reverse.key()}) == 4
    same_color = Scene((Obj("small", "red", "circle"), Obj("large", "red", "square")), ((0, "above", 1),))
    assert swap_colors(same_color) is None
    assert swap_colors(Scene((RED_CIRCLE,))) is None and reverse_relation(Scene((RED_CIRCLE,))) is None
    rng = np.random.default_rng(3)
    for _ in range(100):
        scene = Scene.random(rng, n_objects=3)
        for f in (swap_colors, swap_shapes, reverse_relation):
            new = f(scene)
            assert new is None or new.key() != scene.key()


def test_minimal_pairs_groups(tmp_path):
    records = generate(tmp_path, 16, seed=8, minimal_pairs=True)
    assert len(records) == 16 and len(list((tmp_path / "images").glob("*.png"))) == 16
    for g in range(4):
        keys = [r["scene"] for r in records[4 * g : 4 * g + 4]]
        assert len(set(keys)) == 4
        base = Scene.from_key(keys[0])
        assert len(base.objects) == 2
        assert [swap_colors(base).key(), swap_shapes(base).key(), reverse_relation(base).key()] == keys[1:]  # type: ignore[union-attr]


def test_make_shapes_script(tmp_path, capsys):
    mod = _load_script("make_shapes")
    assert mod.main(["--out", str(tmp_path / "d"), "--n", "3", "--seed", "1", "--size", "32"]) == 0
    assert len((tmp_path / "d" / "captions.jsonl").read_text().splitlines()) == 3
    assert "wrote 3 images" in capsys.readouterr().out


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_tiny_training_run_loads_through_encoders(tmp_path):
    train = _load_script("train_shapes_model")
    out = tmp_path / "tiny"
    cfg = train.TrainConfig(
        out=out, steps=3, batch_size=16, pool=48, eval_n=16, monitor_n=16, monitor_every=2, log_every=1, warmup=1,
        vision_width=32, vision_layers=1, vision_head_width=16, text_width=16, text_heads=2, text_layers=1, embed_dim=16,
    )
    summary = train.train(cfg)
    assert summary["steps"] == 3
    assert {"heldout_t2i_R@5", "heldout_i2t_R@5", "pairs_t2i_R@1"} <= set(summary["metrics"])
    assert {p.name for p in out.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors", "README.md"}
    from safetensors import safe_open

    with safe_open(str(out / "open_clip_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype.is_floating_point and f.get_tensor(k).element_size() == 2 for k in f.keys())

    from retrieval.encoders import load_encoder

    enc = load_encoder(f"local-dir:{out}", device="cpu")
    sample = next(iter(samples(1, seed=7)))
    img = enc.encode_pil([sample.image])
    txt = enc.encode_texts([sample.caption, "a large blue square"])
    assert img.shape == (1, 16) and txt.shape == (2, 16) and img.dtype == np.float32
    assert np.allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-4)
    assert "Held-out evaluation" in (out / "README.md").read_text()

    # continuing from the saved weights loads them instead of starting afresh
    again = train.TrainConfig(**{**cfg.__dict__, "out": tmp_path / "again", "init": out, "steps": 1, "monitor_every": 0})
    assert train.train(again)["steps"] == 1
    assert "initialised from" in (tmp_path / "again" / "README.md").read_text()


def test_shapes_module_does_not_import_torch():
    import subprocess

    code = "import sys, retrieval.shapes; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
