"""The ``crossfind`` command line: a thin layer over :class:`retrieval.Engine`.

Human output goes to stdout, progress bars and diagnostics to stderr. Every
expected failure is a one-line message and exit status 1. Nothing heavy is
imported until a command runs (``crossfind --help`` does not import torch).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import click

from .errors import CrossfindError

if TYPE_CHECKING:  # pragma: no cover
    import threading

    from .engine import Engine
    from .types import SearchQuery, SearchResult, Term

DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]


class Ctx:
    def __init__(self, library: str | None, db: str | None = None) -> None:
        self.library = library
        self.db = db  # a database URL for the store (may hold a password: never printed)

    def engine(self, model: str | None = None) -> Engine:
        from .engine import Engine

        return Engine.open(self.library, model=model, db=self.db)


def _engine(ctx: click.Context, model: str | None = None) -> Engine:
    obj = ctx.find_object(Ctx)
    assert obj is not None
    return obj.engine(model)


def _stderr(msg: str) -> None:
    click.echo(msg, err=True)


def _print_json(obj: Any) -> None:
    from .paths import json_safe

    click.echo(json_safe(json.dumps(obj, ensure_ascii=False)))


def _show(path: str) -> str:
    from .paths import display

    return display(path)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--library",
    metavar="DIR",
    envvar="CROSSFIND_LIBRARY",
    help="Library folder (database, vector indexes). Default: $CROSSFIND_LIBRARY, else $XDG_DATA_HOME/crossfind.",
)
@click.option(
    "--db",
    metavar="URL",
    envvar="CROSSFIND_DATABASE_URL",
    help="Keep the library's store in this database instead of DIR/library.db, e.g. "
    "--db postgresql+psycopg://crossfind:PASSWORD@dbhost/crossfind (needs crossfind[postgres]). "
    "DIR still holds the vector indexes. Default: $CROSSFIND_DATABASE_URL, else (or with --db sqlite) SQLite in DIR.",
)
@click.version_option(package_name="crossfind")
@click.pass_context
def cli(ctx: click.Context, library: str | None, db: str | None) -> None:
    """crossfind: search images and texts across modalities.

    \b
    Index a folder, then search it by text or by example image:
      crossfind index ~/Pictures
      crossfind search "a dog on a beach"
      crossfind search --image ~/Pictures/dog.jpg -k 5
    \b
    Add captions or product texts and match images to them:
      crossfind add-texts captions.jsonl --corpus captions
      crossfind search --image photo.jpg --target texts
    \b
    See it all work offline with the bundled model:
      crossfind demo
    """
    ctx.obj = Ctx(library, db)


model_option = click.option(
    "--model",
    metavar="SPEC",
    help="Model: ARCH:TAG (ViT-B-32:laion2b_s34b_b79k), ARCH:/path/ckpt.safetensors, hf-hub:ORG/REPO, "
    "local-dir:PATH, or a bundled model (shapes-tiny). Default: the library's default model.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
no_wait_option = click.option(
    "--no-wait", is_flag=True,
    help="Fail at once when another crossfind process is writing to the library, instead of waiting for it.",
)


def _writer(eng: Engine, no_wait: bool) -> Any:
    """The library's writer lock, saying on stderr when this command waits for another writer."""
    return eng.writer(wait=not no_wait, on_wait=lambda: _stderr(
        f"waiting for another crossfind process writing to {eng.library_dir} (--no-wait to fail instead)..."))


def _quiet_ray() -> None:
    """Keep Ray's own info lines off stderr (the command has its progress bar;
    Ray's failures come back as errors)."""
    import logging

    try:
        import ray.data  # noqa: F401  (it sets up its loggers on import)
    except ImportError:
        return  # the library says how to install it
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


@cli.command("index")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=True))
@model_option
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files or folders matching GLOB (repeatable), e.g. --exclude '*/thumbnails/*'.")
@click.option("--include-hidden", is_flag=True, help="Also index hidden files and folders (names starting with '.').")
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Images per encoder batch (default 32 on CPU, 128 on GPU).")
@click.option("--workers", type=click.IntRange(1, 64), help="Image decoding threads (default: number of cores, 2 to 8); when encoding on a GPU, decoding processes (default: number of cores).")
@click.option("--checkpoint-seconds", type=click.FloatRange(0), default=30.0, show_default=True, help="Make progress durable this often.")
@click.option("--prune", is_flag=True, help="Also remove images indexed before that are still on disk but no longer "
              "selected (hidden without --include-hidden, or matched by a new --exclude); by default they are kept.")
@click.option("--rerank-features", is_flag=True, help="Also compute and keep in the library what re-ranking needs per "
              "image, so searches never wait for it: the image memory of the model's own reranker (shapes-tiny: 16 KB "
              "per image), or the BLIP image features of the reranker chosen with set-reranker (BLIP-base: 0.87 MB per image).")
@click.option("--index-memory", metavar="SIZE", help="Memory budget for searching the index, e.g. 4G (remembered; "
              "'none' forgets it). Past what the full index fits in, a compressed one (IVF-HNSW-PQ, exact re-scoring) "
              "is built for searching, e.g. crossfind index ~/Archive --index-memory 4G --shards 4.")
@click.option("--shards", type=click.IntRange(1, 1024), help="Cut the compressed index into N id-range shard files, "
              "searched together (with --index-memory; remembered), e.g. --shards 4.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Decode and encode through Ray Data (needs pip install 'crossfind[ray]'): on the Ray cluster at "
              "ADDRESS (HOST:PORT or ray://HOST:PORT), or with no ADDRESS (or 'auto') a running local cluster, else a "
              "new one on this machine. Put it after PATHS or write --ray=ADDRESS.")
@click.option("--int8/--no-int8", default=None, help="Encode with the image tower's weights in 8 bits (ONNX Runtime on the CPU): "
              "about 2.5x float32's images per second, vectors slightly different; remembered for the model in this library "
              "until --no-int8. Default: bfloat16 (OpenVINO) where the CPU has bfloat16 units and a check shows the "
              "vectors unchanged (cosine >= 0.9999), else float32; CROSSFIND_BF16=0 keeps float32.")
@no_wait_option
@json_option
@click.pass_context
def index_cmd(ctx: click.Context, paths: tuple[str, ...], model: str | None, exclude: tuple[str, ...], include_hidden: bool,
              batch_size: int | None, workers: int | None, checkpoint_seconds: float, prune: bool, rerank_features: bool,
              index_memory: str | None, shards: int | None, ray_address: str | None, int8: bool | None, no_wait: bool,
              as_json: bool) -> None:
    """Index image files under PATHS (incremental: only new or changed files are encoded).

    Files that cannot be used (broken symlinks, unreadable or special files)
    and files that fail to decode are listed on stderr. Images indexed before
    that a new --exclude (or leaving out --include-hidden) no longer selects
    are kept unless --prune.

    \b
    Example:
      crossfind index ~/Pictures --exclude '*/.thumbnails/*'
      crossfind index ~/Pictures --model shapes-tiny --json
      crossfind index ~/Pictures --exclude 'screenshots' --prune
      crossfind index ~/Pictures --no-wait   # fail at once if another process is writing
      crossfind index ~/Pictures --model shapes-tiny --rerank-features   # the model's own reranker
      crossfind index ~/Pictures --rerank-features   # after: crossfind set-reranker hf-hub:Salesforce/blip-itm-base-coco
      crossfind index /data/catalogue --index-memory 4G --shards 4   # 10M+ images
      crossfind index ~/Pictures --int8   # 8-bit image tower: faster, vectors slightly different (remembered)
      crossfind index /shared/photos --ray                 # through Ray Data on this machine
      crossfind index /shared/photos --ray=10.0.0.5:6379   # on a Ray cluster (shared file system)
    """
    from .encoders import parse_spec
    from .rerank_files import reranker_dir
    from .scale import apply_index_memory, check_memory

    if index_memory is not None:
        check_memory(index_memory)  # before the indexing it would follow
    if ray_address is not None and ray_address != "auto" and os.path.exists(ray_address):
        raise click.UsageError(f"--ray took {ray_address!r} as the cluster address; put --ray after the paths "
                               "or write --ray=ADDRESS")
    if ray_address is not None:
        _quiet_ray()
    loading = _preload_image_session(ctx, model) if ray_address is None and int8 is not True else None
    with _engine(ctx, model) as eng, _writer(eng, no_wait):
        if rerank_features and eng.reranker_for() is None and reranker_dir(parse_spec(eng.model_spec)) is None:
            raise click.UsageError(f"--rerank-features needs a reranker: {eng.model_spec} has none of its own; "
                                   "choose a BLIP one with `crossfind set-reranker SPEC` first")
        rep = eng.index_folder(paths, exclude=exclude, include_hidden=include_hidden, batch_size=batch_size,
                               workers=workers, checkpoint_seconds=checkpoint_seconds, progress=not as_json, prune=prune,
                               ray=ray_address, int8=int8)
        if rerank_features:
            computed = eng.rerank_features(progress=not as_json)
            which = eng.reranker_for() or "the model's own reranker"
            _stderr(f"reranker features: {computed} computed for {which}")
        scaled = apply_index_memory(eng.state(), index_memory, shards, kinds=("images",))
    if loading is not None and not _console:
        loading.join()  # in process: a session nothing used may still be loading; let it finish, not run on
    if ray_address is None:
        _end_quickly()  # (Ray's own exit handler stops the workers it started)
    for sr in scaled:
        if sr.compressed and not as_json:
            _stderr(f"{sr.kind}: compressed index {sr.plan} for {sr.vectors} vectors in {sr.shards} shard(s)"
                    + (" built" if sr.built else " in step"))
    for path, reason in rep.issues:
        _stderr(f"skipped {_show(path)}: {reason}")
    for path, reason in rep.failures:
        _stderr(f"failed {_show(path)}: {reason}")
    if rep.kept:
        _stderr(f"kept {rep.kept} images indexed before that this run no longer selects (hidden or excluded); "
                "rerun with --prune to remove them, or `crossfind remove PATH`")
    if as_json:
        _print_json({**rep.to_json(), **({"index_plans": [sr.to_json() for sr in scaled]} if scaled else {})})
        return
    click.echo(f"scanned {rep.scanned}: {rep.added} added, {rep.updated} updated, {rep.unchanged} unchanged, "
               f"{rep.removed} removed, {rep.failed} failed" + (f", {len(rep.issues)} skipped" if rep.issues else "")
               + (f", {rep.kept} kept" if rep.kept else "") + f"; {rep.encoded} encoded in {rep.seconds:.1f}s")
    if rep.failed:
        _stderr("see the failures with: crossfind status")


@cli.command("add-texts")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--corpus", metavar="NAME", help="Corpus name (default: the file name without extension).")
@click.option("--replace", is_flag=True, help="Remove texts of the corpus that are no longer in FILE.")
@model_option
@no_wait_option
@json_option
@click.pass_context
def add_texts_cmd(ctx: click.Context, file: str, corpus: str | None, replace: bool, model: str | None, no_wait: bool,
                  as_json: bool) -> None:
    """Add a text corpus: .txt (a text per line), .jsonl ({"text", "id", ...}) or .csv (a 'text' column).

    \b
    Example:
      crossfind add-texts captions.jsonl --corpus captions
      crossfind add-texts labels.txt --replace --no-wait
    """
    with _engine(ctx, model) as eng, _writer(eng, no_wait):
        rep = eng.add_texts(file, corpus=corpus, replace=replace, progress=not as_json)
    for err in rep.errors:
        _stderr(f"{_show(file)}: {err}")
    if as_json:
        _print_json(rep.to_json())
        return
    click.echo(f"read {rep.scanned}: {rep.added} added, {rep.updated} updated, {rep.unchanged} unchanged, "
               f"{rep.removed} removed, {rep.failed} malformed in {rep.seconds:.1f}s")


def _parse_term(raw: str, sign: float) -> Term:
    """``[W:][text:|image:]Q``: a weighted text or image term.

    Without a prefix, Q is an image when it names an existing image file; Q
    that looks like a path (an image extension, or starting with /, ./, ../
    or ~) but does not exist is an error, so a typo is never searched as text.
    """
    import math

    from .imageio import IMAGE_EXTENSIONS
    from .types import Term

    weight, body = 1.0, raw
    head, sep, rest = raw.partition(":")
    if sep and head not in ("text", "image"):
        try:
            weight, body = float(head), rest
        except ValueError:
            pass
        if not math.isfinite(weight) or abs(weight) > 1000:
            raise click.UsageError(f"term {raw!r}: the weight must be a finite number between -1000 and 1000")
    kind, sep, rest = body.partition(":")
    if sep and kind in ("text", "image"):
        body = rest
    else:
        kind = ""
    if not body.strip():
        raise click.UsageError(f"term {raw!r} is empty")
    if kind == "text":
        return Term(sign * weight, text=body)
    p = Path(os.path.expanduser(body))
    looks_like_path = p.suffix.lower() in IMAGE_EXTENSIONS or body.startswith(("/", "./", "../", "~"))
    if kind == "image" or looks_like_path:
        if p.is_file():
            return Term(sign * weight, image=os.path.abspath(p))
        what = "is a folder, not an image file" if p.is_dir() else "does not exist"
        hint = "" if kind == "image" else f"; to search it as text write text:{body}"
        raise click.UsageError(f"term {raw!r}: {p} {what}{hint}")
    return Term(sign * weight, text=body)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _print_result(res: SearchResult, fmt: str) -> None:
    _print_result_json(res.to_json(), fmt)


def _print_result_json(obj: dict[str, Any], fmt: str) -> None:
    """Print a ``search --json`` object in ``fmt``; the same printer serves
    in-process results and a server's answer, so both print alike."""
    if fmt == "json":
        _print_json(obj)
        return
    hits = obj["hits"]
    if fmt in ("paths", "null"):
        _print_paths(hits, fmt == "null")
        return
    if not hits:
        click.echo("no results")
        return
    rr = obj["reranked"]
    header = f"{'rank':>4}  {'score':>6}" + (f"  {'match':>6}" if rr else "") + "  item"
    click.echo(header)
    for h in hits:
        item = _show(h["path"] or "") if h["kind"] == "image" else _show(h["text"] or "")
        click.echo(f"{h['rank']:>4}  {_fmt(h['score']):>6}" + (f"  {_fmt(h['rerank_score']):>6}" if rr else "") + f"  {item}")


def _search_on_server(ctx: click.Context, q: SearchQuery, model: str | None) -> tuple[dict[str, Any], list[str]] | None:
    """Hand the search to a server running for this library (``crossfind serve``),
    or None when there is none. A query image that is not a file stays in
    process, so its error reads exactly as without a server."""
    import dataclasses

    from .locations import library_dir
    from .server import client

    if q.image is not None and not (isinstance(q.image, str) and Path(os.path.expanduser(q.image)).is_file()):
        return None
    obj = ctx.find_object(Ctx)
    assert obj is not None
    if isinstance(q.image, str):
        q = dataclasses.replace(q, image=str(Path(os.path.expanduser(q.image)).absolute()))
    body = q.to_request(model)
    if model is None:
        body["library_default"] = True  # the model this command would use in process
    return client.search(library_dir(obj.library), body)


def _preload_sessions(ctx: click.Context, q: SearchQuery, model: str | None) -> None:
    """Start loading the ONNX sessions a text search will run (the text tower
    unless the text was asked before, the reranker when it re-ranks) while this
    process imports the rest and opens the library: see
    :func:`retrieval.onnx_runtime.preload`. The model is the one
    ``Engine.open`` picks (``--model``, else the library's default); when it is
    not, or anything is missing, nothing is preloaded and the search loads
    what it needs itself, as without this."""
    if q.text is None:
        return
    import contextlib
    import sqlite3

    from .locations import library_dir

    obj = ctx.find_object(Ctx)
    assert obj is not None
    try:
        lib = library_dir(obj.library)
        db = lib / "library.db"
        if not db.is_file():
            return
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            model = model or _default_model(con)
            if model is None:
                return
            from .encoders import parse_spec
            from .rerank_files import reranker_dir

            ms = parse_spec(model)
            reranks = q.rerank and q.reranker is None and reranker_dir(ms) is not None

            def kept(column: str) -> bool:  # as Store.text_vector / text_tokens find them
                sql = f"SELECT 1 FROM queries WHERE model = ? AND text = ? AND {column} IS NOT NULL LIMIT 1"
                return con.execute(sql, (ms.spec, q.text)).fetchone() is not None

            need_text = not kept("text_vector") or (reranks and not kept("text_tokens"))
        # The image part of the reranker only while nothing has cached candidates' image memory.
        rerank_parts = ["reranker_cross"] + ([] if (lib / "rerank-features").is_dir() else ["reranker_image"])
        parts = (["text"] if need_text else []) + (rerank_parts if reranks else [])
        if parts:
            from .onnx_runtime import preload

            preload(lib, ms.spec, parts)
    except Exception:  # noqa: BLE001 - only a head start: the search itself meets and reports any problem
        return


def _default_model(con: Any) -> str | None:
    """The library's default model, read from its settings (``con``: sqlite3, read-only)."""
    row = con.execute("SELECT value FROM settings WHERE key = 'default_model'").fetchone()
    return None if row is None else str(row[0])


def _import_faiss() -> None:
    """FAISS's import, which an index run needs to add its first vectors: 0.1-0.3 s
    (the GPU wheel loads CUDA's libraries) that the preload thread takes off the main one."""
    import faiss  # noqa: F401


def _preload_image_session(ctx: click.Context, model: str | None) -> threading.Thread | None:
    """Start loading the image tower's ONNX session that ``crossfind index``
    will encode with (``--model``, else the library's default, when its export
    is in the library and no GPU takes the images) while this process imports
    the rest, opens the library and scans: see :func:`retrieval.onnx_runtime.preload`.
    Returns the loading thread, or None when nothing is preloaded."""
    import contextlib
    import sqlite3

    from .locations import library_dir
    from .onnx_runtime import gpu_visible, preload

    obj = ctx.find_object(Ctx)
    assert obj is not None
    try:
        if gpu_visible():
            return None
        lib = library_dir(obj.library)
        db = lib / "library.db"
        if db.is_file():
            with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
                model = model if model is not None else _default_model(con)
                if model is not None and _remembers_int8(con, model):
                    return None  # the run encodes with the 8-bit tower: not this session
        return preload(lib, model, ("image",), then=_import_faiss) if model is not None else None
    except Exception:  # noqa: BLE001 - only a head start: indexing itself meets and reports any problem
        return None


def _remembers_int8(con: Any, model: str) -> bool:
    """Whether an earlier `index --int8` made ``model`` index 8-bit in this library (see ``indexing.int8_choice``)."""
    from .encoders import parse_spec
    from .onnx_quant import int8_key

    row = con.execute("SELECT value FROM settings WHERE key = ?", (int8_key(parse_spec(model).spec),)).fetchone()
    return row is not None and row[0] == "1"


def _print_paths(hits: list[dict[str, Any]], null: bool) -> None:
    """One item per line with control characters escaped, or with ``null``
    NUL-terminated raw bytes exactly as the file system names them (``find -print0``)."""
    for h in hits:
        item = (h["path"] if h["kind"] == "image" else h["text"]) or ""
        if null:
            click.echo(os.fsencode(item) + b"\0", nl=False)
        else:
            click.echo(_show(item))


def _output_format(as_json: bool, paths: bool, null: bool = False) -> str:
    if as_json and (paths or null):
        raise click.UsageError("choose one of --json and --paths")
    if null:
        return "null"
    return "json" if as_json else "paths" if paths else "table"


null_option = click.option("-0", "--null", "null", is_flag=True,
                           help="With --paths: end each path with a NUL byte instead of a newline, "
                           "unescaped (for xargs -0), e.g. --paths -0 | xargs -0 ls -l.")


@cli.command("search")
@click.argument("query", required=False)
@click.option("--image", metavar="PATH", help="Query by example image (alone, or with QUERY text).")
@click.option("--target", type=click.Choice(["images", "texts"]), default="images", show_default=True, help="What to return.")
@click.option("-k", "k", type=click.IntRange(1, 10000), default=10, show_default=True, help="Number of hits.")
@click.option("--candidates", type=click.IntRange(1, 10000), default=50, show_default=True, help="Candidates the reranker re-scores.")
@click.option("--no-rerank", is_flag=True, help="Rank by the dual encoder alone.")
@click.option("--reranker", "reranker_spec", metavar="SPEC", help="Re-rank with this reranker instead of the library's choice, "
              "e.g. --reranker hf-hub:Salesforce/blip-itm-base-coco or local-dir:PATH.")
@click.option("--threshold", type=click.FloatRange(0, 1), metavar="P", help="Keep hits whose match probability is at least P.")
@click.option("--add", "adds", multiple=True, metavar="[W:]Q", help="Add a text or image path to the query, weight W (repeatable), e.g. --add 2:sunset.")
@click.option("--subtract", "subs", multiple=True, metavar="[W:]Q", help="Subtract a text or image path from the query (repeatable).")
@click.option("--path", "path_glob", metavar="GLOB", help="Images: only paths matching GLOB, e.g. --path '*/2024/*'.")
@click.option("--corpus", metavar="NAME", help="Texts: only this corpus.")
@click.option("--since", type=click.DateTime(DATE_FORMATS), help="Images: taken on or after this date (EXIF date, else file time).")
@click.option("--until", type=click.DateTime(DATE_FORMATS), help="Images: taken on or before this date.")
@click.option("--dedup", is_flag=True, help="Fold near-duplicate hits (resized copies, re-encodes, bursts) into the best-ranked one.")
@model_option
@json_option
@click.option("--paths", "paths_only", is_flag=True, help="Print one path (or text) per line, for xargs.")
@null_option
@click.pass_context
def search_cmd(ctx: click.Context, query: str | None, image: str | None, target: str, k: int, candidates: int,
               no_rerank: bool, reranker_spec: str | None, threshold: float | None, adds: tuple[str, ...], subs: tuple[str, ...],
               path_glob: str | None, corpus: str | None, since: dt.datetime | None, until: dt.datetime | None,
               dedup: bool, model: str | None, as_json: bool, paths_only: bool, null: bool) -> None:
    """Search the library by text and/or example image.

    \b
    When `crossfind serve` runs for the library, the search is handed to it
    (no model load) and prints the same; set CROSSFIND_NO_SERVER=1 to search
    in process anyway.

    \b
    Examples:
      crossfind search "a red circle left of a blue square"
      crossfind search --image holiday.jpg -k 5                # similar images
      crossfind search --image photo.jpg --target texts        # best captions
      crossfind search "beach" --add 2:sunset --subtract people --paths | xargs open
      crossfind search "dog" --path '*/2024/*' --since 2024-06-01 --json
      crossfind search "cat" --add image:cat.jpg --add text:kitten.png --paths -0 | xargs -0 ls
      crossfind search "sunset" --dedup                         # one hit per set of near-duplicates
      crossfind search "two dogs" --reranker hf-hub:Salesforce/blip-itm-base-coco
    """
    from .types import SearchQuery

    fmt = _output_format(as_json, paths_only, null)
    if query is None and image is None and not adds:
        raise click.UsageError("give a QUERY text, --image PATH, or --add terms")
    if until is not None and until.time() == dt.time(0):
        until = until + dt.timedelta(days=1) - dt.timedelta(microseconds=1)
    terms = tuple(_parse_term(a, 1.0) for a in adds) + tuple(_parse_term(s, -1.0) for s in subs)
    q = SearchQuery(text=query, image=image, target=target, terms=terms, k=k, candidates=candidates,
                    rerank=not no_rerank, threshold=threshold, path_glob=path_glob, corpus=corpus, since=since, until=until,
                    dedup=dedup, reranker=reranker_spec)
    if reranker_spec is not None and no_rerank:
        raise click.UsageError("--reranker and --no-rerank contradict each other")
    served = _search_on_server(ctx, q, model)
    if served is not None:
        answer, notes = served
        for note in notes:
            _stderr(f"note: {note}")
        _print_result_json(answer, fmt)
        return
    from .quick import quick_search

    where = ctx.find_object(Ctx)
    assert where is not None
    found = quick_search(where.library, where.db, q, model)  # a plain text query: no SQLAlchemy
    if found is None:
        _preload_sessions(ctx, q, model)
        with _engine(ctx, model) as eng:
            eng.searcher.lean = True  # one search per process: free the text tower once the query is encoded
            found = eng.search(q)
    for note in found.notes:
        _stderr(f"note: {note}")
    _print_result(found, fmt)
    _end_quickly()


@cli.command("duplicates")
@model_option
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), metavar="T",
              help="Cosine similarity at or above which two images are duplicates (default: the model's measured one).")
@click.option("--path", "path_glob", metavar="GLOB", help="Only images whose path matches GLOB, e.g. --path '*/2024/*'.")
@json_option
@click.pass_context
def duplicates_cmd(ctx: click.Context, model: str | None, threshold: float | None, path_glob: str | None, as_json: bool) -> None:
    """Find near-duplicate images: resized copies, re-encodes, small crops, burst shots, exact copies.

    Each group names the image to keep (most pixels, then largest file, then
    oldest); every other member is within the threshold of it. Exact copies
    (byte-identical) are marked. crossfind never deletes a file: act on the
    list yourself.

    \b
    Examples:
      crossfind duplicates
      crossfind duplicates --path '*/2024/*' --threshold 0.95
      crossfind duplicates --json | jq -r '.groups[] | .keep as $k | .items[] | select(.id != $k) | .path'
    """
    from .duplicates import find_duplicates

    with _engine(ctx, model) as eng:
        rep = find_duplicates(eng, threshold=threshold, path=path_glob)
    for note in rep.notes:
        _stderr(f"note: {note}")
    if as_json:
        _print_json(rep.to_json())
        return
    if not rep.groups:
        click.echo(f"no duplicates among {rep.images} images (model {rep.model}, threshold {rep.threshold:g})")
        return
    for n, g in enumerate(rep.groups, 1):
        click.echo(f"group {n}: {len(g.items)} images" + (" (exact copies)" if g.exact else ""))
        for it in g.items:
            mark = "keep " if it.id == g.keep else "     "
            dims = f"{it.width}x{it.height}" if it.width and it.height else "?x?"
            date = it.date.strftime("%Y-%m-%d %H:%M") if it.date else "-"
            how = "exact" if it.exact and it.id != g.keep else f"{it.score:.3f}"
            click.echo(f"  {mark}{how:>6}  {dims:>11}  {it.bytes:>10}  {date}  {it.path}")
    dupes = sum(len(g.items) - 1 for g in rep.groups)
    click.echo(f"{len(rep.groups)} groups, {dupes} images besides the kept ones, among {rep.images} images "
               f"(model {rep.model}, threshold {rep.threshold:g}; keep: {rep.rule})")


@cli.command("history")
@click.option("-n", "limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="How many searches.")
@json_option
@click.pass_context
def history_cmd(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List recent searches, newest first.

    \b
    Example:
      crossfind history -n 5
      crossfind show 12          # print search 12's results again
    """
    with _engine(ctx) as eng:
        entries = eng.history(limit)
    if as_json:
        _print_json({"searches": [e.to_json() for e in entries]})
        return
    for e in entries:
        what = e.text or ""
        if e.image:
            what = (what + " " if what else "") + f"[image {e.image}]"
        what = _show(what)
        extra = f" terms={json.dumps(e.terms)}" if e.terms else ""
        extra += f" filters={json.dumps(e.filters)}" if e.filters else ""
        when = e.when.isoformat(timespec="seconds")
        click.echo(f"{e.id:>5}  {when}  -> {e.target:<6} k={e.k:<3} {e.seconds * 1000:7.1f} ms  {what}{extra}")


@cli.command("show")
@click.argument("query_id", type=click.IntRange(1, 2**63 - 1))
@json_option
@click.option("--paths", "paths_only", is_flag=True, help="Print one path (or text) per line.")
@null_option
@click.pass_context
def show_cmd(ctx: click.Context, query_id: int, as_json: bool, paths_only: bool, null: bool) -> None:
    """Print a stored search's results again, without recomputing.

    \b
    Example:
      crossfind show 12 --json
    """
    fmt = _output_format(as_json, paths_only, null)
    with _engine(ctx) as eng:
        res = eng.show(query_id)
    _print_result(res, fmt)


@cli.command("status")
@json_option
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show items, failures and vectors per model.

    \b
    Example:
      crossfind status --json
    """
    with _engine(ctx) as eng:
        st = eng.status()
    if as_json:
        _print_json(st)
        return
    click.echo(f"library: {st['library']}")
    click.echo(f"store: {_show(st['store'])}")
    click.echo(f"default model: {st['default_model'] or '(none yet)'}")
    click.echo(f"images: {st['images']} ({st['images_ok']} ok, {st['images_failed']} failed, {st['images_pending']} pending)")
    corp = ", ".join(f"{k}: {v}" for k, v in st["corpora"].items())
    click.echo(f"texts: {st['texts']}" + (f" ({corp})" if corp else ""))
    for m in st["models"]:
        click.echo(f"model {m['spec']}: {m['image_vectors']} image vectors, {m['text_vectors']} text vectors, "
                   f"{m['image_tokens']} with reranker tokens (dim {m['dim']})")
    click.echo(f"searches recorded: {st['queries']}")
    if st["failures"]:
        click.echo("failed files:")
        for f in st["failures"]:
            click.echo(f"  {_show(f['path'])}: {f['error']}")


@cli.command("set-default-model")
@click.argument("spec")
@no_wait_option
@click.pass_context
def set_default_model_cmd(ctx: click.Context, spec: str, no_wait: bool) -> None:
    """Make SPEC the model used when --model is not given.

    \b
    Example:
      crossfind set-default-model shapes-tiny
    """
    with _engine(ctx) as eng, _writer(eng, no_wait):
        name = eng.set_default_model(spec)
    click.echo(f"default model: {name}")


@cli.command("set-reranker")
@click.argument("spec")
@model_option
@no_wait_option
@click.pass_context
def set_reranker_cmd(ctx: click.Context, spec: str, model: str | None, no_wait: bool) -> None:
    """Choose the reranker that searches with a model use (this library only).

    SPEC is local-dir:PATH (a crossfind reranker folder, or a BLIP model
    saved with transformers' save_pretrained), hf-hub:ORG/NAME (a BLIP ITM
    model from the Hugging Face cache, downloaded once), or `default` for the
    model's own reranker. BLIP needs `pip install 'crossfind[blip]'`.

    \b
    Example:
      crossfind set-reranker hf-hub:Salesforce/blip-itm-base-coco --model ViT-B-32:laion2b_s34b_b79k
      crossfind set-reranker local-dir:~/models/blip-itm-base-coco
      crossfind set-reranker default
    """
    with _engine(ctx, model) as eng, _writer(eng, no_wait):
        value = eng.set_reranker(spec)
        name = eng.model_spec
    click.echo(f"reranker for {name}: {value}")


@cli.command("calibrate-reranker")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--reranker", "reranker_spec", metavar="SPEC", help="The BLIP reranker to calibrate (default: the one chosen with set-reranker).")
@model_option
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False), help="Karpathy-style COCO/Flickr30k JSON (default: FOLDER/captions.jsonl).")
@click.option("--candidates", type=click.IntRange(2, 10000), default=16, show_default=True,
              help="Dual-encoder candidates per query scored for the fit.")
@no_wait_option
@json_option
@click.pass_context
def calibrate_reranker_cmd(ctx: click.Context, folder: str, reranker_spec: str | None, model: str | None,
                           annotations: str | None, candidates: int, no_wait: bool, as_json: bool) -> None:
    """Calibrate a BLIP reranker's match probability on a captioned folder.

    FOLDER is read as `crossfind eval` reads it (captions.jsonl, or a
    Karpathy-style JSON with --annotations) and indexed into a temporary
    library; each caption's top candidates (and each image's top captions)
    are scored and a Platt scaling is fitted, then kept in this library for
    the reranker, so rerank_score and --threshold mean a calibrated match
    probability.

    \b
    Example:
      crossfind calibrate-reranker ~/captioned-photos
      crossfind calibrate-reranker ~/coco --annotations dataset_coco.json --reranker hf-hub:Salesforce/blip-itm-base-coco
    """
    with _engine(ctx, model) as eng, _writer(eng, no_wait):
        rep = eng.calibrate_reranker(folder, reranker=reranker_spec, candidates=candidates, annotations=annotations,
                                     progress=not as_json)
    if as_json:
        _print_json(rep)
        return
    click.echo(f"calibrated {rep['reranker']} on {rep['pairs']} pairs ({rep['positives']} matching): "
               f"scale {rep['scale']}, bias {rep['bias']}; calibration error {rep['ece_before']} -> {rep['ece_after']}")


#: ``remove`` of more images than this asks for confirmation on a terminal.
CONFIRM_REMOVE_OVER = 5


@cli.command("remove")
@click.argument("paths", nargs=-1, required=True)
@click.option("--yes", "-y", is_flag=True, help=f"Do not ask before removing more than {CONFIRM_REMOVE_OVER} images.")
@no_wait_option
@click.pass_context
def remove_cmd(ctx: click.Context, paths: tuple[str, ...], yes: bool, no_wait: bool) -> None:
    """Remove images (files, or everything under folders) from the library.

    The files themselves are not touched. On a terminal, removing more than a
    handful of images asks first (--yes does not).

    \b
    Example:
      crossfind remove ~/Pictures/old
      crossfind remove ~/Pictures/old --yes
    """
    with _engine(ctx) as eng, _writer(eng, no_wait):
        if not yes and sys.stdin.isatty():
            n = len(eng.images_under(paths))
            if n > CONFIRM_REMOVE_OVER and not click.confirm(f"remove {n} images from the library? (--yes skips this)", err=True):
                raise click.exceptions.Abort()
        n = eng.remove_images(paths)
    click.echo(f"removed {n} images")


@cli.command("remove-texts")
@click.option("--corpus", metavar="NAME", required=True, help="The corpus to remove.")
@no_wait_option
@click.pass_context
def remove_texts_cmd(ctx: click.Context, corpus: str, no_wait: bool) -> None:
    """Remove a text corpus from the library and every model's index.

    \b
    Example:
      crossfind remove-texts --corpus captions
    """
    with _engine(ctx) as eng, _writer(eng, no_wait):
        n = eng.remove_texts(corpus)
    click.echo(f"removed {n} texts")


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback needs --token or --insecure-no-token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8756, show_default=True, help="TCP port (0: any free port).")
@model_option
@click.option("--token", metavar="TOKEN", envvar="CROSSFIND_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every request (env CROSSFIND_TOKEN).")
@click.option("--insecure-no-token", is_flag=True, help="Allow binding a non-loopback address without a token (anyone who can reach it can read your library).")
@click.option("--cors", "cors", multiple=True, metavar="ORIGIN", help="Allow cross-origin requests from ORIGIN (repeatable); none by default.")
@click.option("--no-socket", is_flag=True, help="Do not listen on the library's unix socket (the CLI then searches in process).")
@click.pass_context
def serve_cmd(ctx: click.Context, host: str, port: int, model: str | None, token: str | None, insecure_no_token: bool,
              cors: tuple[str, ...], no_socket: bool) -> None:
    """Serve a JSON API and a web page for the library, models kept loaded.

    Opens http://HOST:PORT/ (search page), /docs (the API) and the library's
    unix socket, which `crossfind search` uses when a server runs.

    \b
    Example:
      crossfind serve                                   # then open http://127.0.0.1:8756/
      crossfind serve --model shapes-tiny --port 9000
      crossfind serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    try:
        from .server.app import ServeOptions, run
    except ImportError as exc:
        raise click.ClickException(f"crossfind serve needs the 'serve' extra ({exc.name} is missing): pip install 'crossfind[serve]'") from None
    obj = ctx.find_object(Ctx)
    assert obj is not None
    opts = ServeOptions(host=host, port=port, model=model, token=token, insecure_no_token=insecure_no_token,
                        cors=cors, unix_socket=not no_socket, db=obj.db)
    run(obj.library, opts, echo=_stderr)


TRUSTED_ONLY = ("It speaks faiss.contrib.client_server's protocol: pickle over plain TCP, no authentication or "
                "encryption, so anyone who can reach the port can feed it data to unpickle. Run it on a trusted "
                "private network only; the default address is loopback.")


def _shard_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"not a list of shard numbers: {text!r} (example: 0,1)", param_hint="--shards") from None


@cli.command("serve-shards", help=f"""Serve shard files of the compressed index to other machines' searches.

Opens the chosen shard files of the model's compressed index (built by
`crossfind index PATH --index-memory SIZE --shards N`) memory-mapped and
answers `crossfind set-shard-servers` clients until stopped (Ctrl-C).

{TRUSTED_ONLY}

\b
Example:
  crossfind serve-shards --shards 0,1 --host 10.0.0.5 --port 9100   # on machine A
  crossfind serve-shards --shards 2,3 --host 10.0.0.6 --port 9100   # on machine B
""")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (a trusted network's only).")
@click.option("--port", type=click.IntRange(0, 65535), default=9100, show_default=True, help="TCP port (0: any free port).")
@click.option("--shards", "shards", metavar="LIST", help="Shard numbers to serve, e.g. 0,1 (default: all).")
@click.option("--target", type=click.Choice(["images", "texts"]), default="images", show_default=True, help="Which index.")
@model_option
@click.pass_context
def serve_shards_cmd(ctx: click.Context, host: str, port: int, shards: str | None, target: str, model: str | None) -> None:
    from .shard_servers import serve_shards

    with _engine(ctx, model) as eng:
        svc = serve_shards(eng.state(), target, _shard_list(shards), host=host, port=port)
        _stderr(f"serving {target} shards {','.join(map(str, svc.info['shards']))} of {svc.info['of']} "
                f"({int(svc.index.ntotal)} vectors) on {svc.host}:{svc.port}; Ctrl-C to stop")
        try:
            svc.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            svc.close()


@cli.command("set-shard-servers", help=f"""Search the compressed index's shards on these servers.

SERVERS is HOST:PORT,HOST:PORT,... (each running `crossfind serve-shards`,
every shard served once among them), or `none` to search the local shard
files again. Searches then take their candidates from the servers and
re-score them exactly from this library's float16 sidecar, as locally.
{TRUSTED_ONLY.replace("It speaks", "The servers speak")}

\b
Example:
  crossfind set-shard-servers 10.0.0.5:9100,10.0.0.6:9100
  crossfind set-shard-servers none
""")
@click.argument("servers")
@click.option("--target", type=click.Choice(["images", "texts"]), default="images", show_default=True, help="Which index.")
@model_option
@no_wait_option
@click.pass_context
def set_shard_servers_cmd(ctx: click.Context, servers: str, target: str, model: str | None, no_wait: bool) -> None:
    from .scale import set_shard_servers

    with _engine(ctx, model) as eng, _writer(eng, no_wait):
        names = set_shard_servers(eng.state(), servers, kind=target)
        spec = eng.model_spec
    click.echo(f"{target} shard servers for {spec}: {','.join(names) or 'none (local shard files)'}")


@cli.command("eval")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@model_option
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False), help="Karpathy-style COCO/Flickr30k JSON (default: FOLDER/captions.jsonl).")
@click.option("--candidates", "candidates_list", default="50", show_default=True, metavar="N[,N...]",
              help="Candidates the reranker re-scores; a list (e.g. 16,32,64,128) compares each, with --reranker's report.")
@click.option("--no-rerank", is_flag=True, help="Report the dual encoder alone.")
@click.option("--reranker", "reranker_spec", metavar="SPEC", help="Compare the dual encoder, this reranker alone and the fused "
              "score per candidate count, e.g. --reranker hf-hub:Salesforce/blip-itm-base-coco or local-dir:PATH.")
@click.option("--int8", is_flag=True, help="Index FOLDER with the 8-bit image tower (as index --int8) to see what it costs in recall.")
@json_option
@click.pass_context
def eval_cmd(ctx: click.Context, folder: str, model: str | None, annotations: str | None, candidates_list: str,
             no_rerank: bool, reranker_spec: str | None, int8: bool, as_json: bool) -> None:
    """Measure Recall@1/5/10 (text->image, image->text) on a captioned folder.

    FOLDER is indexed into a temporary library of its own, so nothing else can
    rank among its results; --library is not used (and refused when given).
    With --reranker (or several --candidates values) it reports, per candidate
    count, the dual encoder alone, the reranker alone on its top k and the
    fused score side by side, with the reranker's milliseconds per query.

    \b
    Example:
      python scripts/make_shapes.py --out /tmp/heldout --n 1000 --seed 7
      crossfind eval /tmp/heldout --model shapes-tiny --json
      crossfind eval /tmp/heldout --model shapes-tiny --candidates 16,32,64,128
      crossfind eval /tmp/heldout --model shapes-tiny --int8     # recall with the 8-bit image tower
      crossfind eval ~/coco --annotations dataset_coco.json --model ViT-B-32:laion2b_s34b_b79k \\
          --reranker hf-hub:Salesforce/blip-itm-base-coco --candidates 16,32,64,128
    """
    from click.core import ParameterSource

    from .evaluate import evaluate

    if ctx.parent is not None and ctx.parent.get_parameter_source("library") == ParameterSource.COMMANDLINE:
        raise click.UsageError("eval measures FOLDER in a temporary library of its own; drop --library")
    try:
        sweep = [int(c) for c in candidates_list.split(",") if c.strip()]
    except ValueError:
        sweep = []
    if not sweep or not all(1 <= c <= 10000 for c in sweep):
        raise click.BadParameter("give numbers from 1 to 10000, comma-separated, e.g. 16,32,64", param_hint="--candidates")
    if reranker_spec is not None and no_rerank:
        raise click.UsageError("--reranker and --no-rerank contradict each other")
    if int8 and (reranker_spec is not None or len(sweep) > 1):
        raise click.UsageError("--int8 measures one candidate count without --reranker")
    if reranker_spec is not None or (len(sweep) > 1 and not no_rerank):
        from .eval_rerank import evaluate_reranker

        _print_sweep(evaluate_reranker(folder, model=model or "shapes-tiny", reranker=reranker_spec, candidates=sweep,
                                       annotations=annotations, progress=not as_json), as_json)
        return
    candidates = sweep[0]
    rep = evaluate(folder, model=model or "shapes-tiny", annotations=annotations, candidates=candidates,
                   rerank=not no_rerank, progress=not as_json, int8=int8)
    if as_json:
        _print_json(rep)
        return
    click.echo(f"queries: {rep['queries']} ({rep.get('images', '?')} images)")
    for key in ("t2i", "i2t", "t2i_reranked", "i2t_reranked"):
        if key in rep:
            r = rep[key]
            click.echo(f"{key:<13} R@1 {r['R@1']:.3f}  R@5 {r['R@5']:.3f}  R@10 {r['R@10']:.3f}")
    if "note" in rep:
        _stderr(f"note: {rep['note']}")


def _print_sweep(rep: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(rep)
        return
    click.echo(f"model {rep['model']}, reranker {rep['reranker']}: {rep['queries']} captions, {rep['images']} images; "
               f"reranker image features {rep['feature_ms_per_image']} ms per image")
    cal = rep.get("calibration")
    if cal:
        click.echo(f"fused = calibrated log-odds + dual cosine; Platt scale {cal['scale']}, bias {cal['bias']} "
                   f"on {cal['pairs']} pairs (ECE {cal['ece_before']} -> {cal['ece_after']})")
    click.echo(f"{'k':>5}  {'dir':<4} {'dual R@1/5/10':<20} {'reranker R@1/5/10':<20} {'fused R@1/5/10':<20} {'ms/query':>9}")
    for row in rep["sweep"]:
        for d in ("t2i", "i2t"):
            r = row[d]
            cells = ["/".join(f"{r[n][f'R@{k}']:.3f}" for k in (1, 5, 10)) for n in ("dual", "reranker", "fused")]
            click.echo(f"{row['candidates']:>5}  {d:<4} {cells[0]:<20} {cells[1]:<20} {cells[2]:<20} {r['ms_per_query']:>9.1f}")
@cli.command("train-reranker")
@click.argument("data")
@click.option("--model", metavar="SPEC", required=True, help="The open_clip model whose frozen tokens the reranker reads (any spec --model takes elsewhere).")
@click.option("--out", "out", type=click.Path(file_okay=False), help="Reranker folder to write (default: crossfind's reranker cache for the model).")
@click.option("--steps", type=click.IntRange(0), default=2000, show_default=True, help="Training steps (0 with --init: only tune, calibrate and evaluate).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Groups of four per step: minimal-pair groups for shapes:, groups of alike images for a folder.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out (written every --checkpoint-every steps and on Ctrl-C).")
@click.option("--checkpoint-every", type=click.IntRange(1), default=100, show_default=True, help="Steps between checkpoints.")
@click.option("--init", type=click.Path(exists=True, file_okay=False), help="Start from the reranker saved in this folder (its shape wins over --width ... --local).")
@click.option("--residual", default="auto", show_default=True, metavar="A|auto|off", help="Score as a correction of the dual cosine, its weight starting at A (auto: the model's logit scale); off: cross-attention alone.")
@click.option("--curriculum", type=click.IntRange(0), default=0, help="shapes: read captions as canonical scene keys for N steps, then fade to real ones over N more.")
@click.option("--mined-groups", type=click.IntRange(0), default=0, help="shapes: per step, groups of four alike minimal-pair items from different groups, mined by the dual encoder.")
@click.option("--alike-groups", type=click.IntRange(0), default=16, show_default=True, help="shapes: with ordinary=, groups of four ordinary scenes the dual encoder finds alike, per step.")
@click.option("--text-groups", type=click.IntRange(0), default=16, show_default=True, help="Folders: images per step scored against their caption and its swapped/reversed variants.")
@click.option("--width", type=click.IntRange(8), default=128, show_default=True, help="Width of the reranker's residual stream.")
@click.option("--depth", type=click.IntRange(1), default=2, show_default=True, help="Blocks of [text self-attention, cross-attention, MLP].")
@click.option("--heads", type=click.IntRange(1), default=4, show_default=True, help="Attention heads.")
@click.option("--image-layer", default="final", show_default=True, help="Vision layer(s) read: final, embed, blockK, or two joined by + (embed+final).")
@click.option("--words", is_flag=True, help="Give the reranker the text tower's input word embeddings beside its output tokens.")
@click.option("--image-depth", type=click.IntRange(0), default=0, show_default=True, help="Image self-attention blocks before the cross-attention.")
@click.option("--local", "image_local", type=click.IntRange(0), default=0, metavar="H", help="Hidden width of a local stem over each patch's 3x3 neighbourhood of first-layer tokens (0: none).")
@click.option("--shape-aux", type=click.FloatRange(0), default=0.0, metavar="W", help="shapes: weight of a loss teaching the local stem each object's shape (the head is not saved).")
@click.option("--tune-dual", is_flag=True, help="shapes: after training, choose the dual-cosine weight by re-ranked R@1 on fresh validation scenes.")
@click.option("--no-eval", is_flag=True, help="Skip the held-out evaluation and the model card (still calibrates and saves).")
@click.option("--eval-n", type=click.IntRange(8), default=1000, show_default=True, help="shapes: scenes in each held-out evaluation set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the module's initialisation and the order of training groups.")
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar or log lines.")
def train_reranker_cmd(data: str, model: str, out: str | None, steps: int, batch_size: int, lr: float, resume: bool,
                       checkpoint_every: int, init: str | None, residual: str, curriculum: int, mined_groups: int,
                       alike_groups: int, text_groups: int, width: int, depth: int, heads: int, image_layer: str,
                       words: bool, image_depth: int, image_local: int, shape_aux: float, tune_dual: bool,
                       no_eval: bool, eval_n: int, seed: int, threads: int | None, quiet: bool) -> None:
    """Train a cross-attention reranker for MODEL on captioned images.

    DATA is a folder with captions.jsonl ({"image", "caption", "scene"?} per
    line, as `crossfind eval` reads), a Karpathy-style COCO/Flickr30k JSON
    file, or shapes:minimal=N[,ordinary=M]: generated minimal-pair groups of
    four (a scene, its colours swapped, shapes swapped, relation reversed) and
    ordinary scenes. Negatives: images and captions the frozen dual encoder
    ranks high, plus swapped/reversed captions (minimal pairs for shapes:).
    Checkpoints every --checkpoint-every steps; --resume continues after
    Ctrl-C or a kill. Then calibrates, evaluates on held-out data (Recall@1/5/10
    with and without re-ranking, ECE) and writes OUT/reranker.*, OUT/README.md
    (the card) and OUT/train_metrics.json. Use it with
    `crossfind search --reranker local-dir:OUT` or `crossfind set-reranker`.

    \b
    Example:
      crossfind train-reranker ~/data/captions --model ViT-B-32:laion2b_s34b_b79k --out ~/rerankers/b32 --steps 3000
      crossfind train-reranker ~/data/captions --model ViT-B-32:laion2b_s34b_b79k --out ~/rerankers/b32 --resume
      crossfind train-reranker shapes:minimal=4000 --model shapes-tiny --out /tmp/rr --steps 200 --residual off
    \b
    The bundled shapes-tiny reranker: bash scripts/train_shapes_reranker.sh
    """
    import torch

    from .train import TrainOptions, train_reranker

    if threads:
        torch.set_num_threads(threads)
    target = Path(out) if out else _default_reranker_dir(model)
    command = "crossfind train-reranker " + " ".join(shlex.quote(a) for a in sys.argv[2:] if a) if len(sys.argv) > 2 else ""
    opts = TrainOptions(
        data=data, model=model, out=target, steps=steps, batch_size=batch_size, lr=lr, init=Path(init) if init else None,
        residual=residual, curriculum=curriculum, mined_groups=mined_groups, alike_groups=alike_groups,
        text_groups=text_groups, width=width, depth=depth, heads=heads, image_layer=image_layer, words=words,
        image_depth=image_depth, image_local=image_local, shape_aux=shape_aux, tune_dual=tune_dual,
        evaluate=not no_eval, eval_n=eval_n, checkpoint_every=checkpoint_every, resume=resume, seed=seed,
        command=command,
    )
    if residual not in ("auto", "off"):
        try:
            float(residual)
        except ValueError:
            raise click.BadParameter("expected a number, auto or off", param_hint="--residual") from None
    from tqdm.auto import tqdm

    def bar(total: int, initial: int) -> Any:
        return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True, disable=quiet)

    def log(msg: str) -> None:
        if not quiet:
            tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)

    report = train_reranker(opts, log=log, progress=bar)
    click.echo(f"reranker written to {report.out} ({report.steps} steps, {report.minutes:.1f} min)")


def _default_reranker_dir(model: str) -> Path:
    from .encoders import parse_spec
    from .rerank_files import reranker_dirs

    spec = parse_spec(model)
    return reranker_dirs(spec)[1 if spec.local_dir is not None else 0]  # never into the model's own folder


@cli.command("demo")
@click.option("--n", "n", type=click.IntRange(8, 100000), default=300, show_default=True, help="Scenes to generate.")
@click.option("--dir", "demo_dir", type=click.Path(file_okay=False), help="Demo folder (default: a folder under the system temp dir).")
def demo_cmd(n: int, demo_dir: str | None) -> None:
    """Run the whole engine offline on generated scenes with the bundled shapes-tiny model.

    Generates scenes into a demo library of its own (never your default
    library), indexes them, adds their captions as a text corpus and runs
    text->image, image->text and image->image searches.

    \b
    Example:
      crossfind demo
    """
    from .demo import run_demo

    run_demo(n=n, demo_dir=demo_dir, echo=click.echo)


#: Set by a command whose work is done and committed: see :func:`_end_quickly`.
_finished = False
#: Whether this process runs as the ``crossfind`` program (:func:`main` with no
#: arguments), which then ends with ``os._exit`` once a command has finished.
_console = False


def _end_quickly() -> None:
    """Let the console entry point end this process as soon as the command returns."""
    global _finished
    _finished = True


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: expected failures become one line and exit 1.

    Run as the ``crossfind`` program (``argv`` None), a search or index
    process (not one through Ray) ends with ``os._exit`` once its output is
    flushed: its rows are committed and its store closed, and tearing down
    ONNX Runtime's and FAISS's libraries at interpreter exit would add about
    0.1 s to every search; an index run with nothing to encode need not wait
    for the image session it started loading either.
    """
    global _console
    _console = argv is None
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="crossfind", standalone_mode=False)
        if _finished and argv is None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except CrossfindError as exc:
        click.echo(f"crossfind: error: {exc}", err=True)
        sys.exit(1)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "crossfind"
        click.echo(f"crossfind: error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"crossfind: error: {exc.format_message()}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, click.exceptions.Abort) as exc:
        # click turns Ctrl-C inside a command into Abort (from KeyboardInterrupt)
        if isinstance(exc, click.exceptions.Abort) and not isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            click.echo("aborted", err=True)
            sys.exit(1)
        click.echo("interrupted; work up to the last checkpoint is kept", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    finally:
        if argv is None:
            # The console script: the process ends now. Frozen, the objects it
            # made are left to the OS instead of being walked by the interpreter's
            # final collections (0.2-0.3 s after an index run). What needs closing
            # (the store, the index files) was closed by the command.
            import gc

            gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    main()
