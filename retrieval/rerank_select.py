"""Which reranker a search uses, and re-scoring with one named by a spec.

A library keeps, per model, the reranker chosen with ``crossfind set-reranker``
(the setting ``reranker:<model spec>``); a search's ``--reranker SPEC`` wins
over it, and without either the model's own reranker is used (as found by
:func:`retrieval.rerank_files.reranker_dir`). The Platt calibration fitted by
``crossfind calibrate-reranker`` is kept beside the choice
(``reranker-calibration:<reranker spec>``), with the fingerprint of the
weights it was fitted on: once the weights change it is no longer applied.

BLIP rerankers (:mod:`retrieval.rerank_blip`) read image features cached under
the library's ``rerank-features/`` folder, and a model's own crossfind
reranker its image memory (:mod:`retrieval.rerank_memory`); the files are
independent and written atomically, so searches write them without the
writer lock. :func:`compute_features` fills either ahead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ModelNotAvailable, QueryError
from .feature_cache import FEATURES_DIR
from .reranker_spec import RerankerSpec, parse_reranker_spec, require_transformers
from .store import Store

LOG = logging.getLogger(__name__)

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


def calibrate(
    store: Store, folder: Path, model_spec: str, spec: str | None, candidates: int, annotations: Path | None,
    device: str | None, progress: bool,
) -> dict[str, Any]:
    """Fit BLIP reranker ``spec``'s Platt calibration on a captioned ``folder``
    and keep it in ``store`` beside the choice (committed); the fit's report."""
    from .eval_rerank import calibrate_on_folder

    if spec is None:
        raise QueryError(f"no reranker chosen for model {model_spec}; give one with --reranker SPEC "
                         "or choose one with `crossfind set-reranker SPEC`")
    rs = check_spec(spec)
    if rs.kind != "blip":
        raise not_blip(rs.spec)
    cal, report = calibrate_on_folder(folder, model_spec, rs.spec, candidates, annotations, device, progress)
    value = {**json.loads(cal.to_json()), "fingerprint": report["fingerprint"], "folder": str(folder.resolve()),
             "model": model_spec}
    store.set_setting(calibration_key(rs.spec), json.dumps(value))
    store.commit()
    return report


def compute_features(
    store: Store, searcher: Any, spec: str | None, state: Any, bars: Callable[..., Any], batch: int = 64,
) -> int:
    """Compute and cache, for every indexed image that lacks them, the image
    features of BLIP reranker ``spec``, or with no spec (or the model's own)
    the image memory of ``state``'s own crossfind reranker
    (:mod:`retrieval.rerank_memory`); how many were computed."""
    from .feature_cache import FeatureItem
    from .rerank_files import reranker_dir

    rs = parse_reranker_spec(spec) if spec is not None else None
    own = reranker_dir(state.spec)
    if rs is None or (rs.kind == "crossfind" and own is not None and rs.path == own.resolve()):
        if state.reranker is None:
            raise QueryError(f"model {state.spec.spec} has no reranker of its own; choose a BLIP one with "
                             "`crossfind set-reranker SPEC` first")
        bar = bars(len(ids := store.image_ids("ok")), "reranker image memory", "img")
        try:
            return searcher.memory.fill(state, state.reranker, ids, store.images_by_id,
                                        lambda missing, rows: searcher.candidate_tokens(state, missing, rows), bar)
        finally:
            bar.close()
    rerankers = searcher.rerankers
    rr = rerankers.get(rs.spec, lambda: state.encoder)
    if getattr(rr, "kind", None) != "blip":
        raise QueryError(f"{rs.spec} is not this model's own reranker: its image memory is not cached")
    ids = store.image_ids("ok")
    done = 0
    bar = bars(len(ids), "reranker features", "img")
    try:
        for start in range(0, len(ids), batch):
            part = ids[start : start + batch]
            rows = store.images_by_id(part)
            counted: list[int] = []
            rr.features([FeatureItem(i, rows[i].content_hash, rows[i].path) for i in part if i in rows],
                        rerankers.feature_cache(rr), on_compute=counted.append)
            done += sum(counted)
            bar.update(len(part))
    finally:
        bar.close()
    return done


def not_blip(spec: str) -> ModelNotAvailable:
    return ModelNotAvailable(f"{spec} is a crossfind reranker: those are calibrated when trained; "
                             "calibrate-reranker fits BLIP rerankers")
