"""Training crossfind's cross-attention reranker (``crossfind train-reranker``).

:mod:`.data` (frozen-encoder features of captioned folders or generated
scenes), :mod:`.mining` (hard negatives from the dual encoder),
:mod:`.perturb` (caption negatives), :mod:`.losses`, :mod:`.trainer` (the
resumable loop), :mod:`.calibration`, :mod:`.evaluation`, :mod:`.card`, and
:mod:`.run` tying them together. Imports torch.
"""

from __future__ import annotations

from .run import TrainingError, TrainOptions, TrainReport, train_reranker

__all__ = ["TrainOptions", "TrainReport", "TrainingError", "train_reranker"]
