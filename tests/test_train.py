"""``crossfind train-reranker`` and retrieval.train on the tiny random test model (offline, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from retrieval.encoders import load_encoder  # noqa: E402
from retrieval.rerank import CrossAttentionITM, Reranker, RerankerConfig  # noqa: E402
from retrieval.train import TrainingError, TrainOptions, train_reranker  # noqa: E402
from retrieval.train import data as D  # noqa: E402
from retrieval.train.calibration import tune_dual  # noqa: E402
from retrieval.train.losses import group_logits, group_loss  # noqa: E402
from retrieval.train.mining import Alike  # noqa: E402
from retrieval.train.perturb import perturbed, reverse_relation, swap_words  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(width=32, depth=1, heads=2, val_n=32, tune_n=24, calib_n=100, eval_n=24, candidates=10)


def _pairwise(module: CrossAttentionITM, pool: D.Pool, groups: np.ndarray) -> float:
    """How often an image of a held-out group of four scores its own caption
    above each of the other three captions."""
    module.eval()
    with torch.no_grad():
        s = group_logits(module, pool, groups.reshape(-1))  # [group, image, caption]
    own = s.diagonal(dim1=1, dim2=2)
    wrong = ~torch.eye(4, dtype=torch.bool)
    return float((own[:, :, None] > s)[:, wrong].float().mean())


def test_a_few_dozen_steps_beat_the_untrained_reranker_on_held_out_pairs(tiny_model, tmp_path):
    out = tmp_path / "rr"
    opts = TrainOptions(data="shapes:ordinary=400", model=tiny_model, out=out, steps=40, batch_size=16, lr=2e-3,
                        residual="off", words=True, image_layer="embed+final", evaluate=False, **SMALL)
    report = train_reranker(opts)
    assert report.steps == 40 and (out / "reranker.safetensors").is_file()
    encoder = load_encoder(tiny_model, device="cpu")
    trained = Reranker.load(out, encoder).module.float()
    held = D.shapes_pool(encoder, 200, 77, False, "embed+final", True)  # a seed never trained on
    groups = np.random.default_rng(0).permutation(200).reshape(-1, 4)
    torch.manual_seed(0)  # the same initialisation the run started from
    untrained = CrossAttentionITM(trained.config)
    before, after = _pairwise(untrained, held, groups), _pairwise(trained, held, groups)
    assert after > before + 0.05, (before, after)


def test_group_loss_is_every_image_against_every_caption_of_its_group(tiny_model):
    encoder = load_encoder(tiny_model, device="cpu")
    pool = D.shapes_pool(encoder, 12, 5, True, "final", False, canonical=True)
    torch.manual_seed(3)
    module = CrossAttentionITM(RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2))
    idx = np.arange(12)
    logits = group_logits(module, pool, idx)
    with torch.no_grad():  # pair by pair: image j of the group against caption k
        direct = torch.stack([torch.stack([
            module(pool.txt_tok[4 * g : 4 * g + 4], pool.txt_mask[4 * g : 4 * g + 4], pool.img_tok[[4 * g + j]])
            for j in range(4)]) for g in range(3)])
    torch.testing.assert_close(logits.detach(), direct, atol=1e-4, rtol=1e-4)
    loss = group_loss(logits)
    loss.backward()
    assert module.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0
    # the curriculum's canonical captions: the scene keys' tokens stand in for the captions
    canon = group_logits(module, pool, idx, canonical=np.ones(12, bool))
    pool.txt_tok, pool.txt_mask = pool.canon_tok, pool.canon_mask
    torch.testing.assert_close(canon, group_logits(module, pool, idx))
    assert not torch.allclose(canon, logits)


def test_alike_groups_hold_items_the_dual_encoder_confuses_with_distinct_keys(tiny_model):
    encoder = load_encoder(tiny_model, device="cpu")
    pool = D.shapes_pool(encoder, 120, 9, False, "final", False)
    alike = Alike(pool.img_vec, pool.txt_vec, pool.txt_key, k=6)
    groups = alike.groups(np.arange(40), np.random.default_rng(0))
    assert groups.shape == (40, 4) and (groups[:, 0] == np.arange(40)).all()
    assert all(len(set(alike.key[g])) == 4 for g in groups)
    assert all(set(g[1:]) <= set(alike.near[g[0]]) for g in groups)


def test_caption_negatives_keep_the_words_and_change_the_meaning():
    assert reverse_relation("A cat left of a dog, on the mat") == "A cat right of a dog, under the mat"
    rng = np.random.default_rng(0)
    swapped = swap_words("a dog chasing a cat", rng)
    assert sorted(swapped.split()) == sorted("a dog chasing a cat".split()) and swapped != "a dog chasing a cat"
    variants = perturbed(["a red car", "blue"], seed=1)
    assert len(variants) == 2 and all(len(v) == 3 for v in variants)
    assert "a red car" not in variants[0] and variants[1] == ["a red car"] * 3  # nothing to swap: another caption


def test_tune_dual_keeps_a_weight_that_does_not_cost_ordinary_recall(tiny_model):
    encoder = load_encoder(tiny_model, device="cpu")
    pools = {"ordinary": D.shapes_pool(encoder, 40, 21, False, "final", False),
             "minimal": D.shapes_pool(encoder, 40, 22, True, "final", False)}
    torch.manual_seed(7)
    module = CrossAttentionITM(RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2, residual=True))
    # head at zero: re-ranking by s * cosine is the dual encoder's order for every weight s
    info = tune_dual(Reranker(module, encoder), pools, lambda _: None, candidates=10)
    assert info["ordinary_r1"] == pytest.approx([info["ordinary_dual_r1"]] * len(info["grid"]))
    assert info["dual_scale"] == info["grid"][0] == float(module.dual_scale.detach())
    with torch.no_grad():  # a head that disagrees: the kept weight never costs ordinary recall when one exists
        module.head.weight.normal_(0, 5.0)
    info = tune_dual(Reranker(module, encoder), pools, lambda _: None, candidates=10)
    ok = [r >= info["ordinary_dual_r1"] for r in info["ordinary_r1"]]
    assert (not any(ok)) or ok[info["grid"].index(info["dual_scale"])]


def test_init_from_a_cross_attention_reranker_adds_the_dual_weight_and_keeps_its_scores(tiny_model, tmp_path):
    encoder = load_encoder(tiny_model, device="cpu")
    torch.manual_seed(2)
    first = CrossAttentionITM(RerankerConfig.for_encoder(encoder, width=32, depth=1, heads=2, image_local=8))
    with torch.no_grad():
        first.head.weight.normal_()
    Reranker(first, encoder).save(tmp_path / "first")
    opts = TrainOptions(data="shapes:", model=tiny_model, out=tmp_path / "second", steps=0, init=tmp_path / "first",
                        residual="20", evaluate=False, **SMALL)
    train_reranker(opts)
    second = Reranker.load(tmp_path / "second", encoder)
    assert second.config.residual and float(second.module.dual_scale.detach()) == 20.0 and second.config.image_local == 8
    from PIL import Image

    tokens = encoder.encode_images(encoder.image_batch([Image.new("RGB", (32, 32), (200, 30, 30))]), with_tokens=True)[1]
    a = Reranker.load(tmp_path / "first", encoder).logits_images("a red circle", tokens)
    b = second.logits_images("a red circle", tokens, dual_scores=np.zeros(1, np.float32))
    np.testing.assert_allclose(a, b, atol=1e-3)  # the dual weight starts on top of the same cross-attention


def test_options_that_do_not_go_together_are_one_line_errors(tiny_model, tmp_path):
    with pytest.raises(TrainingError, match="--init"):
        train_reranker(TrainOptions(data="shapes:minimal=8", model=tiny_model, out=tmp_path / "o", steps=0))
    with pytest.raises(TrainingError, match="--residual off"):
        train_reranker(TrainOptions(data="shapes:minimal=8", model=tiny_model, out=tmp_path / "o", curriculum=2))
    with pytest.raises(Exception, match="multiple of 4"):
        D.DataSpec.parse("shapes:minimal=6")


def _captioned_folder(root: Path, n: int) -> Path:
    from retrieval.shapes import generate

    generate(root, n, seed=4242, size=32)
    return root


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from retrieval.cli import main; main()", "train-reranker", *args]


def test_resume_after_kill_continues_from_the_checkpoint(tiny_model, tmp_path):
    data = _captioned_folder(tmp_path / "data", 80)
    out = tmp_path / "rr"
    args = _cli(str(data), "--model", tiny_model, "--out", str(out), "--steps", "400", "--batch-size", "4",
                "--text-groups", "4", "--checkpoint-every", "5", "--width", "32", "--depth", "1", "--heads", "2",
                "--threads", "1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and not checkpoint.is_file():
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    saved = torch.load(checkpoint, weights_only=False)["step"]
    assert 5 <= saved < 400 and saved % 5 == 0
    # without --resume the checkpoint is not overwritten by a fresh start
    refused = subprocess.run(args[:-2] + ["--steps", "20"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    done = subprocess.run(args[:9] + ["--steps", str(saved + 10)] + args[11:] + ["--resume"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {saved}" in done.stderr
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["info"]["resumed_from"] == saved and metrics["info"]["steps"] == saved + 10
    assert {"t2i_r1_dual", "t2i_r5_rerank", "t2i_r10_rerank", "i2t_r1_rerank", "ece"} <= set(metrics["metrics"])
    assert not checkpoint.exists()  # the finished folder holds the reranker, not the training state
    assert "## Reranker" in (out / "README.md").read_text()
    loaded = Reranker.load(out, load_encoder(tiny_model, device="cpu"))
    assert loaded.config.residual and loaded.config.temperature > 0


def test_train_reranker_help_has_an_example():
    res = subprocess.run(_cli("--help"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Example:" in res.stdout and "shapes:minimal=" in res.stdout
    quiet = subprocess.run([sys.executable, "-c", "import sys; from retrieval.cli import main; sys.argv=['crossfind', "
                            "'--help']\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                            "assert 'torch' not in sys.modules, 'crossfind --help imported torch'"],
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr


def test_missing_data_is_a_one_line_error(tmp_path):
    res = subprocess.run(_cli(str(tmp_path / "nothing"), "--model", "shapes-tiny"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "no such folder" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_train_reranker_help_from_an_installed_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", str(ROOT), "-w", str(wheels), "-q"], check=True,
                   timeout=600)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    main_site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "chain.pth").write_text(main_site + "\n")  # dependencies from this environment, crossfind from the wheel
    wheel = next(wheels.glob("crossfind-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, str(wheel), "-q"], check=True,
                   timeout=600)
    res = subprocess.run([str(venv / "bin" / "python"), "-c", "import retrieval, sys; print(retrieval.__file__); "
                          "from retrieval.cli import main; main(['train-reranker', '--help'])"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert str(tmp_path) in res.stdout.splitlines()[0] and "Example:" in res.stdout
