"""``crossfind demo``: the whole engine, offline, on generated scenes.

Generates a few hundred scenes of coloured shapes into a demo folder of its own
(never the user's default library), indexes them with the bundled
``shapes-tiny`` model, adds their captions as a text corpus, and prints
text→image, image→text and image→image searches with file paths.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from .types import Hit, SearchQuery

DEMO_SEED = 20261129
DEMO_MODEL = "shapes-tiny"


def default_demo_dir() -> Path:
    return Path(tempfile.gettempdir()) / "crossfind-demo"


def _caption_of(records: dict[str, dict], path: str | None) -> str:
    rec = records.get(path or "")
    return rec["caption"] if rec else "?"


def _show(echo: Callable[[str], None], title: str, hits: list[Hit], records: dict[str, dict], reranked: bool, want: str | None = None) -> None:
    """Print hits; ``want`` is the scene key a correct hit has (marked with a check)."""
    echo(f"\n{title}")
    for h in hits:
        score = f"score {h.score:.3f}" + (f"  match {h.rerank_score:.3f}" if reranked and h.rerank_score is not None else "")
        if h.kind == "image":
            rec = records.get(h.path or "")
            ok = " [same scene]" if want is not None and rec is not None and rec["scene"] == want else ""
            echo(f"  {h.rank}. {score}  {h.path}{ok}\n       (its caption: {_caption_of(records, h.path)})")
        else:
            echo(f"  {h.rank}. {score}  {h.text}")


def _pick_queries(records: dict[str, dict]) -> list[tuple[str, str]]:
    """(query text, scene key): scenes of one, two and three objects from the demo
    set, described in a fresh phrasing; for the two-object scene also its
    colour-swapped twin, the case a dual encoder confuses."""
    import numpy as np

    from .shapes import Scene, swap_colors

    rng = np.random.default_rng(DEMO_SEED)
    out: list[tuple[str, str]] = []
    for n_obj in (2, 1, 3):
        scenes = (Scene.from_key(r["scene"]) for r in records.values())
        fits = (sc for sc in scenes if len(sc.objects) == n_obj and (n_obj != 2 or swap_colors(sc) is not None))
        scene = next(fits, None)
        if scene is None:
            continue
        out.append((scene.caption(rng), scene.key()))
        twin = swap_colors(scene) if n_obj == 2 else None
        if twin is not None:
            out.append((twin.caption(rng), twin.key()))
    return out


def run_demo(n: int = 300, demo_dir: str | Path | None = None, echo: Callable[[str], None] = print) -> Path:
    """Generate, index and search a demo library; returns the demo folder."""
    from .engine import Engine
    from .shapes import generate

    t0 = time.perf_counter()
    root = Path(demo_dir) if demo_dir is not None else default_demo_dir()
    scenes = root / "scenes"
    marker = scenes / ".complete"
    spec = f"n={n} seed={DEMO_SEED}"
    if not (marker.is_file() and marker.read_text() == spec):
        echo(f"generating {n} scenes into {scenes} ...")
        generate(scenes, n, DEMO_SEED)
        marker.write_text(spec)
    lines = (scenes / "captions.jsonl").read_text().splitlines()
    records = {str((scenes / r["image"]).absolute()): r for r in map(json.loads, lines)}
    corpus = root / "captions-corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for r in records.values():
            fh.write(json.dumps({"text": r["caption"], "id": r["image"], "scene": r["scene"]}) + "\n")

    with Engine.open(root / "library", model=DEMO_MODEL, db="sqlite") as eng:
        rep = eng.index_folder(scenes, progress=True)
        echo(f"indexed {rep.scanned} images ({rep.encoded} encoded) with {DEMO_MODEL}")
        trep = eng.add_texts(corpus, corpus="captions")
        echo(f"added {trep.scanned} captions as the text corpus 'captions'")
        reranker = eng.state().reranker
        echo("reranker: " + ("cross-attention reranker re-scores the top 50" if reranker is not None else "none for this model"))

        for q, key in _pick_queries(records):
            res = eng.search(SearchQuery(text=q, k=3))
            _show(echo, f'text -> image: "{q}"', res.hits, records, res.reranked, want=key)
        first = sorted(records)[0]
        res = eng.search(SearchQuery(image=first, target="texts", k=3))
        _show(echo, f"image -> text: {first}\n  (its own caption: {_caption_of(records, first)})", res.hits, records, res.reranked)
        res = eng.search(SearchQuery(image=first, k=3))
        _show(echo, f"image -> image: {first}", res.hits, records, res.reranked)
    echo(f"\ndone in {time.perf_counter() - t0:.1f}s. Try it yourself:")
    echo(f'  crossfind --library {root / "library"} search "a small yellow triangle above a large purple cross"')
    echo(f"  crossfind --library {root / 'library'} search --image {first} --target texts")
    return root
