"""The image tower with 8-bit weights, for indexing that asks for it (``--int8``).

ONNX Runtime's dynamic quantisation turns the tower's matrix products (the
fused ``Attention`` nodes and the ``MatMul`` ones) into 8-bit integer
products with per-batch activation scales; on CPUs with VNNI (AVX-512 or
AVX-VNNI) the encoder runs about twice as fast, and the vectors move a
little.
Never a default: vectors of the float32 and int8 towers differ. Once an
index run asks for it, the library remembers the choice for the model
(:func:`int8_key`; ``retrieval.indexing.int8_choice``) until ``--no-int8``.

The quantised file is made once per export, beside it
(``image.int8.onnx``), the first time an index run asks for it. Importing
this module does not import torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

LOG = logging.getLogger(__name__)

INT8_IMAGE = "image.int8.onnx"


def int8_key(spec: str) -> str:
    """The library setting that holds ``"1"`` while the model ``spec`` indexes 8-bit."""
    return f"int8:{spec}"


def int8_image(folder: Path, name: str) -> str:
    """The file name, in the export ``folder``, of the 8-bit twin of its image
    graph ``name``, made now when it is not there yet."""
    folder = Path(folder)
    if (folder / INT8_IMAGE).is_file():
        return INT8_IMAGE
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    t = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="int8.", suffix=".tmp", dir=folder))  # processes making it at once do not collide
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises, on the root logger, a pre-processing step this graph does not need
    try:
        # onnx refuses to read weights from a file with several hard links (a library
        # copied with `cp -l`, say): quantise a plain copy of the graph and its weights.
        source = tmp / "source"
        source.mkdir()
        for part in os.listdir(folder):
            if part == name or part.startswith(name + "."):
                shutil.copyfile(folder / part, source / part)
        out = tmp / "out"
        out.mkdir()
        quantize_dynamic(
            source / name, out / INT8_IMAGE, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Attention"],
            use_external_data_format=True,
            # The fused Attention nodes' outputs have no type until ONNX Runtime sees them: float32.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        # The weights first, the graph that names them last: a graph present means a whole pair.
        for part in sorted(os.listdir(out), key=lambda p: p == INT8_IMAGE):
            os.replace(out / part, folder / part)
    finally:
        root.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
    LOG.info("made the 8-bit image tower of %s in %.1f s", folder.name, time.perf_counter() - t)
    return INT8_IMAGE
