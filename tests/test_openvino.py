"""The image tower on OpenVINO in bfloat16: the check against ONNX Runtime's
float32 and its kept verdict, the switch, the fall-back to ONNX Runtime, and
the vectors against torch."""

from __future__ import annotations

import json
import logging
import shutil
import threading

import numpy as np
import pytest
from test_onnx import cosines, export, sample_images

from retrieval import onnx_runtime as rt
from retrieval import openvino_runtime as ovr
from retrieval.onnx_runtime import OnnxEncoder

LOWER = ovr.lower_precision()
pytestmark = pytest.mark.skipif(LOWER is None, reason="OpenVINO is not installed, or runs float32 on this CPU (then ONNX Runtime does)")


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    return export(tiny_model, tmp_path_factory.mktemp("ov-lib"))


@pytest.fixture
def fresh(exported, tmp_path):
    """A copy of the export as it was written: no verdict, no float16 IR."""
    enc, _, onnx, _ = exported
    where = tmp_path / "export"
    shutil.copytree(onnx.folder, where, ignore=shutil.ignore_patterns(ovr.VERDICTS, "*.f16.*"))
    return enc, where


def test_first_session_checks_then_later_ones_read_the_verdict(fresh, monkeypatch):
    enc, where = fresh
    onnx = OnnxEncoder(where, enc.spec)
    session = onnx.session("image")
    assert isinstance(session, ovr.OpenVinoSession) and session.precision == LOWER
    (key, verdict), = json.loads((where / ovr.VERDICTS).read_text()).items()
    assert key.startswith("image.onnx:") and verdict["precision"] == LOWER and verdict["checked"] == LOWER
    assert verdict["vector_min"] >= ovr.MIN_COSINE and (where / "image.f16.xml").is_file()
    ims = sample_images()
    assert cosines(enc.encode_pil(ims), onnx.encode_pil(ims)).min() >= 0.9999

    def no_check(*a, **k):
        raise AssertionError("the kept verdict should have been used")

    monkeypatch.setattr(ovr, "compare", no_check)
    again = OnnxEncoder(where, enc.spec)
    assert again.session("image").precision == LOWER
    np.testing.assert_array_equal(again.encode_pil(ims), onnx.encode_pil(ims))


def test_a_failed_check_keeps_float32_on_onnx_runtime(fresh, monkeypatch):
    enc, where = fresh
    monkeypatch.setattr(ovr, "MIN_COSINE", 1.000001)  # no bfloat16 run meets it
    onnx = OnnxEncoder(where, enc.spec)
    assert type(onnx.session("image")).__name__ == "InferenceSession"
    (verdict,) = json.loads((where / ovr.VERDICTS).read_text()).values()
    assert verdict["precision"] == "f32" and verdict["checked"] == LOWER and 0.99 < verdict["vector_min"] < 1.0
    assert not list(where.glob("*.f16.*")) and not list(where.glob(".*tmp"))

    def no_check(*a, **k):
        raise AssertionError("the kept verdict should have been used")

    monkeypatch.setattr(ovr, "compare", no_check)
    assert type(OnnxEncoder(where, enc.spec).session("image")).__name__ == "InferenceSession"


def test_bf16_switched_off(fresh, monkeypatch):
    enc, where = fresh
    monkeypatch.setenv("CROSSFIND_BF16", "0")
    assert ovr.lower_precision() is None
    assert type(OnnxEncoder(where, enc.spec).session("image")).__name__ == "InferenceSession"
    assert not (where / ovr.VERDICTS).exists()  # nothing checked, nothing kept
    monkeypatch.setenv("CROSSFIND_BF16", "1")
    assert isinstance(OnnxEncoder(where, enc.spec).session("image"), ovr.OpenVinoSession)


def test_openvino_failure_leaves_the_tower_to_onnx_runtime_and_says_so_once(fresh, monkeypatch, caplog):
    enc, where = fresh

    def broken(*a, **k):
        raise RuntimeError("cannot compile this graph")

    monkeypatch.setattr(ovr, "image_session", broken)
    monkeypatch.setattr(rt, "_openvino_failed", set())
    with caplog.at_level(logging.WARNING, logger="retrieval.onnx_runtime"):
        for _ in range(2):
            onnx = OnnxEncoder(where, enc.spec)
            assert type(onnx.session("image")).__name__ == "InferenceSession"
            assert onnx.encode_pil(sample_images()).shape == (len(sample_images()), onnx.dim)
    said = [r.getMessage() for r in caplog.records if "OpenVINO cannot run" in r.getMessage()]
    assert len(said) == 1 and "cannot compile this graph" in said[0]


def test_the_8bit_tower_stays_on_onnx_runtime(fresh):
    enc, where = fresh
    onnx = OnnxEncoder(where, enc.spec)
    assert type(onnx.int8().session("image")).__name__ == "InferenceSession"


def test_threads_take_turns_on_one_session(fresh):
    enc, where = fresh
    onnx = OnnxEncoder(where, enc.spec)
    assert isinstance(onnx.session("image"), ovr.OpenVinoSession)
    batches = [onnx.image_batch(sample_images()[i:]) for i in range(4)]
    want = [onnx.encode_images(b)[0] for b in batches]
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, onnx.encode_images(batches[i])[0])) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(4):
        np.testing.assert_array_equal(got[i], want[i])


def test_a_read_only_export_without_a_verdict_stays_on_onnx_runtime(fresh, monkeypatch):
    """No check where its verdict could not be kept (every process would make it again)."""
    enc, where = fresh
    real = ovr.os.access
    monkeypatch.setattr(ovr.os, "access", lambda p, mode: False if mode == ovr.os.W_OK else real(p, mode))
    assert type(OnnxEncoder(where, enc.spec).session("image")).__name__ == "InferenceSession"
    assert not (where / ovr.VERDICTS).exists() and not list(where.glob("*.f16.*"))
