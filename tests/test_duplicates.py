"""Near-duplicates: groups over a real shapes-tiny library (resized and
re-encoded copies group, distinct scenes do not), exact copies, the keep rule,
the path filter, chains that must not merge, the --json shape, search --dedup."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from retrieval import Engine
from retrieval.cli import cli, main
from retrieval.duplicates import DEFAULT_THRESHOLD, KEEP_RULE, default_threshold, find_duplicates, fold_duplicates
from retrieval.encoders import parse_spec
from retrieval.shapes import samples
from retrieval.types import SearchQuery

T = 0.95  # copies below sit at >= 0.997 with shapes-tiny, distinct scenes at <= 0.75


def run(args, lib, code=0):
    res = CliRunner().invoke(cli, ["--library", str(lib), *args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def dup_lib(tmp_path_factory) -> tuple[Path, Path]:
    """A shapes-tiny library of 8 distinct scenes (a/) and copies of three of them (b/):
    s0 at 75 % (JPEG q60) and 50 % (q80), s1 at 62 % (q90), s2 byte for byte (older mtime)."""
    root = tmp_path_factory.mktemp("dups")
    photos = root / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    srcs = [s.image for s in samples(8, seed=4242, size=128)]
    for i, im in enumerate(srcs):
        im.save(photos / "a" / f"s{i}.png")
    srcs[0].resize((96, 96), PILImage.Resampling.LANCZOS).save(photos / "b" / "s0_75.jpg", quality=60)
    srcs[0].resize((64, 64), PILImage.Resampling.LANCZOS).save(photos / "b" / "s0_half.jpg", quality=80)
    srcs[1].resize((80, 80), PILImage.Resampling.LANCZOS).save(photos / "b" / "s1_small.jpg", quality=90)
    shutil.copyfile(photos / "a" / "s2.png", photos / "b" / "s2_copy.png")
    old = (dt.datetime(2020, 1, 1) - dt.datetime(1970, 1, 1)).total_seconds()
    os.utime(photos / "b" / "s2_copy.png", (old, old))
    lib = root / "lib"
    with Engine.open(lib, model="shapes-tiny") as eng:
        rep = eng.index_folder(photos)
        assert rep.failed == 0 and rep.added == 12
    return lib, photos


def names(group) -> set[str]:
    return {Path(it.path).name for it in group.items}


def test_copies_group_and_distinct_scenes_do_not(dup_lib):
    lib, photos = dup_lib
    with Engine.open(lib) as eng:
        rep = find_duplicates(eng, threshold=T)
    assert rep.model == "shapes-tiny" and rep.threshold == T and rep.images == 12 and rep.rule == KEEP_RULE
    assert sorted(map(names, rep.groups), key=len, reverse=True) == [
        {"s0.png", "s0_75.jpg", "s0_half.jpg"}, {"s1.png", "s1_small.jpg"}, {"s2.png", "s2_copy.png"}]
    by_name = {Path(it.path).name: it for g in rep.groups for it in g.items}
    for g in rep.groups:
        keep = next(it for it in g.items if it.id == g.keep)
        assert g.items[0] is keep and keep.score == 1.0
        assert all(it.score >= T for it in g.items)
    # The keeper has the most pixels; sizes and dimensions come from the store.
    assert rep.groups[0].keep == by_name["s0.png"].id
    assert (by_name["s0_half.jpg"].width, by_name["s0_half.jpg"].height) == (64, 64)
    assert by_name["s0_75.jpg"].bytes == (photos / "b" / "s0_75.jpg").stat().st_size
    assert not by_name["s0_75.jpg"].exact and not rep.groups[0].exact


def test_exact_copies_are_marked_and_the_oldest_is_kept(dup_lib):
    lib, _ = dup_lib
    with Engine.open(lib) as eng:
        rep = find_duplicates(eng, threshold=T)
    exact = [g for g in rep.groups if g.exact]
    assert len(exact) == 1 and names(exact[0]) == {"s2.png", "s2_copy.png"}
    g = exact[0]
    # Same pixels, same bytes: the oldest (file time 2020) is kept.
    assert Path(next(it.path for it in g.items if it.id == g.keep)).name == "s2_copy.png"
    assert all(it.exact and it.score == 1.0 for it in g.items)
    # Exact copies group whatever the threshold.
    with Engine.open(lib) as eng:
        strict = find_duplicates(eng, threshold=1.0)
    assert {frozenset(names(g)) for g in strict.groups if g.exact} == {frozenset({"s2.png", "s2_copy.png"})}


def test_keep_rule_pixels_then_bytes(tmp_path):
    """Two copies at the same size: the larger file is kept over the smaller one."""
    photos = tmp_path / "p"
    photos.mkdir()
    im = next(iter(samples(1, seed=77, size=128))).image
    im.save(photos / "q95.jpg", quality=95)
    im.save(photos / "q50.jpg", quality=50)
    im.resize((100, 100)).save(photos / "big_file_fewer_pixels.png")
    with Engine.open(tmp_path / "lib", model="shapes-tiny") as eng:
        eng.index_folder(photos)
        rep = find_duplicates(eng, threshold=0.9)
    assert len(rep.groups) == 1 and len(rep.groups[0].items) == 3
    g = rep.groups[0]
    assert Path(next(it.path for it in g.items if it.id == g.keep)).name == "q95.jpg"
    assert (photos / "q95.jpg").stat().st_size > (photos / "q50.jpg").stat().st_size


def test_path_filter(dup_lib):
    lib, photos = dup_lib
    with Engine.open(lib) as eng:
        only_b = find_duplicates(eng, threshold=T, path="*/b/*")
        absolute = find_duplicates(eng, threshold=T, path=f"{photos}/*/s0*")
    assert only_b.images == 4
    assert [names(g) for g in only_b.groups] == [{"s0_75.jpg", "s0_half.jpg"}]
    assert only_b.groups[0].keep == next(it.id for it in only_b.groups[0].items if it.path.endswith("s0_75.jpg"))
    assert [names(g) for g in absolute.groups] == [{"s0.png", "s0_75.jpg", "s0_half.jpg"}]


def _vector_library(lib: Path, spec: str, vecs: np.ndarray) -> list[int]:
    """A library whose images are rows with the given vectors (nothing encoded); the ids in order."""
    from sqlalchemy import insert

    from retrieval.store import Image

    with Engine.open(lib, model=spec) as eng:
        state, store = eng.state(), eng.store
        rows = [{"path": f"/photos/img{i:03d}.jpg", "size": 1000, "mtime_ns": 0, "content_hash": f"h{i}", "status": "ok",
                 "width": 100, "height": 100, "taken_at": dt.datetime(2020, 1, 1) + dt.timedelta(days=i)}
                for i in range(len(vecs))]
        ids = list(store.session.scalars(insert(Image).returning(Image.id, sort_by_parameter_order=True), rows))
        store.set_image_vectors(state.row.id, [(i, r["content_hash"], False) for i, r in zip(ids, rows)])
        state.images.add(ids, vecs.astype(np.float32))
        state.save_images()
        store.commit()
    return ids


def test_a_chain_does_not_merge_its_ends(tmp_path, tiny_model):
    """Seven images each 14 degrees from the next (cosine 0.970): linked in one
    component, but a group only holds images within the threshold of its keeper."""
    dim = 32
    theta = np.radians(14)
    chain = np.zeros((7, dim), np.float32)
    for k in range(7):
        chain[k, 0], chain[k, 1] = np.cos(k * theta), np.sin(k * theta)
    # Sixty identical vectors far from the chain: a blank-frame pile gets a note.
    pile = np.zeros((60, dim), np.float32)
    pile[:, 5] = 1.0
    ids = _vector_library(tmp_path / "lib", tiny_model, np.concatenate([chain, pile]))
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        rep = find_duplicates(eng, threshold=0.95, batch=5)  # small batches: pairs found across batches
    chain_groups = [sorted(it.id for it in g.items) for g in rep.groups if g.keep in ids[:7]]
    # Oldest first: 0 keeps 1; 2 keeps 3; 4 keeps 5; 6 is left alone.
    assert chain_groups == [ids[0:2], ids[2:4], ids[4:6]]
    assert all(it.score >= 0.95 for g in rep.groups for it in g.items)
    big = [g for g in rep.groups if g.keep not in ids[:7]]
    assert len(big) == 1 and len(big[0].items) == 60
    assert any("near-uniform" in n for n in rep.notes)
    assert any("could not be read" in n for n in rep.notes)  # rows without files: embeddings alone


def test_range_search_matches_exact_search(tmp_path):
    """VectorIndex.range_search (flat and IVF, with and without an id filter) against numpy."""
    import faiss

    from retrieval.index import VectorIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(3000, dtype=np.int64) * 7 + 3
    ivf = faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    for index in (VectorIndex(16), VectorIndex(16, ivf)):
        index.add(ids, x)
        allowed = ids[::3]
        for filt in (None, allowed):
            res = index.range_search(x[:50], 0.6, allowed=filt)
            sims = x[:50] @ x.T
            for q in range(50):
                want = {int(i) for i in ids[sims[q] >= 0.6] if filt is None or i in set(filt.tolist())}
                got = set(res.ids[res.lims[q] : res.lims[q + 1]].tolist())
                assert got == want
    got_ids, got_vecs = index.vectors()
    assert np.allclose(got_vecs[np.argsort(got_ids)], x)


def test_cli_json_shape_and_table(dup_lib):
    lib, _ = dup_lib
    out = json.loads(run(["duplicates", "--threshold", str(T), "--json"], lib).stdout)
    assert set(out) >= {"model", "threshold", "groups"} and out["model"] == "shapes-tiny" and out["threshold"] == T
    assert len(out["groups"]) == 3
    for g in out["groups"]:
        assert set(g) >= {"keep", "items"} and g["keep"] == g["items"][0]["id"]
        for it in g["items"]:
            assert set(it) >= {"id", "path", "score", "width", "height", "bytes", "exact"}
            assert isinstance(it["bytes"], int) and it["width"] > 0
    assert [g["exact"] for g in out["groups"]].count(True) == 1
    table = run(["duplicates", "--threshold", str(T), "--path", "*/b/*"], lib).stdout
    assert "keep" in table and "s0_75.jpg" in table and "1 groups" in table
    none = run(["duplicates", "--threshold", "1.0", "--path", "*/a/*"], lib).stdout
    assert none.startswith("no duplicates among 8 images")


def test_search_dedup_folds_copies(dup_lib):
    lib, photos = dup_lib
    query = str(photos / "b" / "s0_75.jpg")  # left out of its own results: s0.png and s0_half.jpg remain
    family = {"s0.png", "s0_half.jpg"}
    with Engine.open(lib) as eng:
        plain = eng.search(SearchQuery(image=query, k=4))
        folded = eng.search(SearchQuery(image=query, k=4, dedup=True))
        assert eng.history(1)[0].filters == {"dedup": True}
    assert len({Path(h.path).name for h in plain.hits} & family) == 2
    assert len({Path(h.path).name for h in folded.hits} & family) == 1
    assert len(folded.hits) == 4 and [h.rank for h in folded.hits] == [1, 2, 3, 4]
    out = json.loads(run(["search", "--image", query, "-k", "4", "--dedup", "--json"], lib).stdout)
    assert [h["id"] for h in out["hits"]] == [h.id for h in folded.hits]


def test_fold_keeps_order_and_first_of_each_family(dup_lib):
    lib, _ = dup_lib
    with Engine.open(lib) as eng:
        rows = {Path(r.path).name: r.id for r in eng.store.images_under([str(lib.parent / "photos")])}
        order = [rows[n] for n in ("s0_half.jpg", "s3.png", "s0.png", "s1_small.jpg", "s1.png", "s0_75.jpg")]
        assert fold_duplicates(eng.state().images, order, T) == [rows["s0_half.jpg"], rows["s3.png"], rows["s1_small.jpg"]]


def test_default_threshold_is_stored_with_the_model(tmp_path):
    assert default_threshold(parse_spec(f"local-dir:{tmp_path}")) == DEFAULT_THRESHOLD
    (tmp_path / "duplicates.json").write_text(json.dumps({"threshold": 0.9}))
    assert default_threshold(parse_spec(f"local-dir:{tmp_path}")) == 0.9
    bundled = json.loads((parse_spec("shapes-tiny").local_dir / "duplicates.json").read_text())
    assert default_threshold(parse_spec("shapes-tiny")) == bundled["threshold"]


def test_help_and_errors(tmp_path, capsys):
    res = CliRunner().invoke(cli, ["duplicates", "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "--threshold" in res.output and "--path" in res.output
    res = CliRunner().invoke(cli, ["search", "--help"])
    assert res.exit_code == 0 and "--dedup" in res.output
    with pytest.raises(SystemExit) as ei:
        main(["--library", str(tmp_path / "empty"), "duplicates", "--model", "shapes-tiny"])
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("crossfind: error: nothing is indexed with model 'shapes-tiny'") and err.count("\n") == 1


def test_blank_frames_are_not_near_duplicates(tmp_path):
    """Near-black frames (Immich's 'first frames of videos'): a model embeds them
    alike, but they have nothing to compare on the pixels; exact copies still group."""
    photos = tmp_path / "frames"
    photos.mkdir()
    for i in range(5):
        px = np.random.default_rng(i).integers(0, 4, (120, 160, 3), dtype=np.uint8)
        PILImage.fromarray(px).save(photos / f"frame{i}.jpg", quality=90)
    shutil.copyfile(photos / "frame0.jpg", photos / "frame0_copy.jpg")
    with Engine.open(tmp_path / "lib", model="shapes-tiny") as eng:
        eng.index_folder(photos)
        embeddings_only = find_duplicates(eng, threshold=0.9, verify=False)
        checked = find_duplicates(eng, threshold=0.9)
    assert max(len(g.items) for g in embeddings_only.groups) >= 5
    assert [names(g) for g in checked.groups] == [{"frame0.jpg", "frame0_copy.jpg"}] and checked.groups[0].exact


def test_pixel_signature(tmp_path):
    from retrieval.duplicates import PIXEL_THRESHOLD, thumbnail

    im = next(iter(samples(1, seed=5, size=128))).image
    other = next(iter(samples(1, seed=6, size=128))).image
    im.save(tmp_path / "a.png")
    im.resize((50, 50)).save(tmp_path / "a_small.jpg", quality=40)
    other.save(tmp_path / "b.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    a, a_small, b = (thumbnail(str(tmp_path / n)) for n in ("a.png", "a_small.jpg", "b.png"))
    assert a is not None and a_small is not None and b is not None
    assert float(a @ a_small) >= PIXEL_THRESHOLD > float(a @ b)
    assert thumbnail(str(tmp_path / "broken.jpg")) is None and thumbnail(str(tmp_path / "missing.jpg")) is None


def test_a_pile_keeps_its_best_matches_only(tmp_path, tiny_model, monkeypatch):
    """Each image keeps its MAX_NEIGHBOURS best matches (memory n*cap, not n**2); the pile still forms one group."""
    from retrieval import duplicates

    monkeypatch.setattr(duplicates, "MAX_NEIGHBOURS", 4)
    rng = np.random.default_rng(3)
    pile = np.zeros((30, 32), np.float32)
    pile[:, 0] = 1.0
    pile[:, 1:] = rng.standard_normal((30, 31)) * 0.01
    pile /= np.linalg.norm(pile, axis=1, keepdims=True)
    ids = _vector_library(tmp_path / "lib", tiny_model, pile)
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        index = eng.state().images
        a, b, s = duplicates._range_pairs(index, np.asarray(ids), pile, 0.9, None, 7)
        rep = find_duplicates(eng, threshold=0.9)
    assert len(a) <= 30 * 4 and (a < b).all() and (s >= 0.9).all()
    assert len(rep.groups) == 1 and len(rep.groups[0].items) == 30
