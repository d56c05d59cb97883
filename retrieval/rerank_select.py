"""Which reranker a search uses, and re-scoring with one named by a spec.

A library keeps, per model, the reranker chosen with ``crossfind set-reranker``
(the setting ``reranker:<model spec>``); a search's ``--reranker SPEC`` wins
over it, and without either the model's own reranker is used (as found by
:func:`retrieval.rerank_files.reranker_dir`). The Platt calibration fitted by
``crossfind calibrate-reranker`` is kept beside the choice
(``reranker-calibration:<reranker spec>``), with the fingerprint of the
weights it was fitted on: once the weights change it is no longer applied.

BLIP rerankers (:mod:`retrieval.rerank_blip`) read image features cached under
the library's ``rerank-features/`` folder; the files are independent and
written atomically, so searches write them without the writer lock.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ModelNotAvailable
from .reranker_spec import RerankerSpec, parse_reranker_spec, require_transformers
from .store import Store

LOG = logging.getLogger(__name__)

#: Folder of the library holding BLIP image features.
FEATURES_DIR = "rerank-features"
#: Value of the model's setting that goes back to its own reranker.
DEFAULT = "default"


def choice_key(model_spec: str) -> str:
    """The store setting holding ``model_spec``'s chosen reranker spec."""
    return f"reranker:{model_spec}"


def calibration_key(reranker_spec: str) -> str:
    """The store setting holding a reranker's Platt calibration (JSON)."""
    return f"reranker-calibration:{reranker_spec}"


def chosen(store: Store, model_spec: str) -> str | None:
    """The reranker spec the library chose for ``model_spec``, or None (its own)."""
    value = store.get_setting(choice_key(model_spec))
    return None if value in (None, "", DEFAULT) else value


def check_spec(spec: str) -> RerankerSpec:
    """Parse ``spec`` and make sure it can be used here (transformers for BLIP,
    its files cached or downloadable for ``hf-hub:``); one-line errors."""
    rs = parse_reranker_spec(spec)
    if rs.kind == "blip":
        require_transformers()
        if rs.repo is not None:
            from .rerank_blip import _resolve

            _resolve(rs)
    return rs


def stored_calibration(store: Store, reranker: Any) -> Any:
    """The calibration stored for a BLIP reranker when it was fitted on these
    weights, else None."""
    from .rerank_blip import Calibration

    raw = store.get_setting(calibration_key(reranker.spec.spec))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        cal = Calibration.from_json(raw)
    except (ValueError, KeyError, TypeError):
        LOG.warning("ignoring an unreadable calibration of %s", reranker.spec.spec)
        return None
    if data.get("fingerprint") != reranker.fingerprint:
        LOG.warning("the calibration of %s was fitted on other weights; run crossfind calibrate-reranker again",
                    reranker.spec.spec)
        return None
    return cal


class Rerankers:
    """Rerankers named by spec, loaded once per process and kept."""

    def __init__(self, store: Store, library_dir: Path, device: str | None = None) -> None:
        self.store = store
        self.library_dir = library_dir
        self.device = device
        self._loaded: dict[str, Any] = {}

    def get(self, spec: str, encoder: Callable[[], Any]) -> Any:
        """The reranker of ``spec``: a :class:`~retrieval.rerank_blip.BlipReranker`
        (its stored calibration applied) or a crossfind
        :class:`~retrieval.rerank.Reranker` bound to ``encoder()``'s model."""
        rs = parse_reranker_spec(spec)
        if rs.spec not in self._loaded:
            check_spec(rs.spec)
            if rs.kind == "blip":
                from .rerank_blip import BlipReranker

                self._loaded[rs.spec] = BlipReranker.load(rs, device=self.device)
            else:
                from .rerank import Reranker

                assert rs.path is not None
                self._loaded[rs.spec] = Reranker.load(rs.path, encoder)
        found = self._loaded[rs.spec]
        if rs.kind == "blip":
            from .rerank_blip import Calibration

            found.calibration = stored_calibration(self.store, found) or Calibration()
        return found

    def feature_cache(self, reranker: Any) -> Any:
        """A BLIP reranker's feature cache in this library (read-only on a read-only library)."""
        return reranker.cache(self.library_dir / FEATURES_DIR, read_only=self.store.read_only)

    def blip_image_features(self, reranker: Any, ids: Sequence[int], rows: dict[int, Any]) -> tuple[np.ndarray, np.ndarray]:
        """BLIP features of library images ``ids`` (cached, else computed and cached) and which could be had."""
        from .rerank_blip import FeatureItem

        items = [FeatureItem(i, rows[i].content_hash, rows[i].path) for i in ids]
        return reranker.features(items, self.feature_cache(reranker))


def not_blip(spec: str) -> ModelNotAvailable:
    return ModelNotAvailable(f"{spec} is a crossfind reranker: those are calibrated when trained; "
                             "calibrate-reranker fits BLIP rerankers")
