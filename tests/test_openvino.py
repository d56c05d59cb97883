"""The image tower on OpenVINO: the precision check and its kept verdict, the
switches, the fall-back to ONNX Runtime, and the vectors against torch."""

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

pytestmark = pytest.mark.skipif(not ovr.openvino_enabled(), reason="OpenVINO is not installed")


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


def _lower_native() -> str | None:
    """The lower precision OpenVINO runs float32 models in on this CPU (bf16 with AMX; f16 on ARM), or None."""
    if not ovr.openvino_enabled():
        return None
    import openvino as ov

    precision = ovr._precision(ov.Core())
    return None if precision == "f32" else precision


def test_first_session_checks_then_later_ones_read_the_verdict(fresh, monkeypatch):
    enc, where = fresh
    onnx = OnnxEncoder(where, enc.spec)
    session = onnx.session("image")
    assert isinstance(session, ovr.OpenVinoSession)
    (key, verdict), = json.loads((where / ovr.VERDICTS).read_text()).items()
    assert key.startswith("image.onnx:") and verdict["precision"] == session.precision
    if session.precision != "f32":  # checked, and compiled from the float16 weights
        assert verdict["vector_min"] >= ovr.MIN_COSINE and (where / "image.f16.xml").is_file()
    ims = sample_images()
    assert cosines(enc.encode_pil(ims), onnx.encode_pil(ims)).min() >= 0.9999

    def no_check(*a, **k):
        raise AssertionError("the kept verdict should have been used")

    monkeypatch.setattr(ovr, "compare", no_check)
    again = OnnxEncoder(where, enc.spec)
    assert again.session("image").precision == session.precision
    np.testing.assert_array_equal(again.encode_pil(ims), onnx.encode_pil(ims))


@pytest.mark.skipif(_lower_native() is None, reason="OpenVINO runs float32 on this CPU and checks nothing")
def test_a_failed_check_keeps_float32(fresh, monkeypatch):
    enc, where = fresh
    monkeypatch.setattr(ovr, "MIN_COSINE", 1.000001)  # no bfloat16 run meets it
    onnx = OnnxEncoder(where, enc.spec)
    assert onnx.session("image").precision == "f32"
    (verdict,) = json.loads((where / ovr.VERDICTS).read_text()).values()
    assert verdict["precision"] == "f32" and verdict["checked"] == _lower_native() and verdict["vector_min"] < 1.0
    assert not list(where.glob("*.f16.*")) and not list(where.glob(".*tmp"))
    monkeypatch.setenv("CROSSFIND_OPENVINO", "0")
    pixels = onnx.image_batch(sample_images())
    exact = OnnxEncoder(where, enc.spec).encode_images(pixels)[0]
    assert cosines(exact, onnx.encode_images(pixels)[0]).min() >= 0.999999


def test_switches(fresh, monkeypatch):
    enc, where = fresh
    monkeypatch.setenv("CROSSFIND_BF16", "0")
    session = OnnxEncoder(where, enc.spec).session("image")
    assert isinstance(session, ovr.OpenVinoSession) and session.precision == "f32"
    assert not (where / ovr.VERDICTS).exists()  # nothing checked, nothing kept
    monkeypatch.setenv("CROSSFIND_OPENVINO", "0")
    assert type(OnnxEncoder(where, enc.spec).session("image")).__name__ == "InferenceSession"
    monkeypatch.setenv("CROSSFIND_OPENVINO", "1")
    assert not ovr.openvino_enabled() or isinstance(OnnxEncoder(where, enc.spec).session("image"), ovr.OpenVinoSession)


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
