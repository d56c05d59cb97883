"""Incremental image indexing: plan what changed, apply the plan, encode.

An index run has three steps:

1. :func:`plan_changes` (pure: no I/O beyond its arguments) compares the
   files a scan found with the rows stored under the same roots and sorts
   them into new files, copies of known content, changed files, touched files
   (new mtime, same bytes), moves (a vanished row's content found under a new
   path), files gone from disk and files still on disk that the scan no
   longer selects (hidden or excluded now; kept unless ``prune``).
2. :func:`apply_plan` writes the plan to the store and the model's vector
   index: new rows, moves, copied vectors, removals.
3. :func:`encode_pending` decodes and encodes every row under the roots that
   lacks a current vector, with a checkpoint every ``checkpoint_seconds``.

:class:`Indexer` runs the three for :meth:`retrieval.Engine.index_folder`
and fills the :class:`~retrieval.types.IndexReport`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image as PILImage
from sqlalchemy.orm.attributes import set_committed_value

from .durability import Pending
from .errors import LibraryError
from .imageio import LoadedImage, describe_error, load_image
from .paths import normalize_path
from .pipeline import default_workers, load_batches
from .scan import FileInfo, ScanIssue, file_hash, scan
from .slot import ModelSlot
from .store import Image, Store
from .types import IndexReport

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Known:
    """What the plan needs to know about a stored image row."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    status: str  # "ok", "pending" or "failed"
    vector_hash: str | None = None  # content hash this model's vector was made from

    @classmethod
    def of(cls, row: Image, vector_hash: str | None = None) -> Known:
        return cls(row.id, row.path, row.size, row.mtime_ns, row.content_hash, row.status, vector_hash)


@dataclass(frozen=True)
class NewFile:
    """A file to add as a new row; ``source`` is a known row with the same bytes."""

    file: FileInfo
    content_hash: str
    source: Known | None = None

    @property
    def copies_vector(self) -> bool:
        """Whether the source's vector (of the same bytes) can be reused as is."""
        return self.source is not None and self.source.vector_hash == self.content_hash


@dataclass(frozen=True)
class Plan:
    """What an index run changes; ids are image row ids."""

    new: tuple[NewFile, ...] = ()
    moved: tuple[tuple[int, FileInfo], ...] = ()  # a gone row's bytes found at a new path
    changed: tuple[tuple[int, FileInfo, str], ...] = ()  # other bytes at the same path (new hash)
    touched: tuple[tuple[int, FileInfo], ...] = ()  # new size/mtime, same bytes
    unchanged: tuple[int, ...] = ()  # same size and mtime
    gone: tuple[int, ...] = ()  # no longer on disk: removed
    kept: tuple[str, ...] = ()  # still on disk but not selected by this scan (hidden, excluded)
    unreadable: tuple[str, ...] = ()  # found, but could not be read to hash


def files_to_hash(files: Iterable[FileInfo], existing: Mapping[str, Known]) -> list[str]:
    """Paths whose content hash the plan needs: new files and files whose size or mtime changed."""
    out = []
    for f in files:
        row = existing.get(f.path)
        if row is None or row.size != f.size or row.mtime_ns != f.mtime_ns:
            out.append(f.path)
    return out


def plan_changes(
    files: Sequence[FileInfo],
    existing: Mapping[str, Known],
    hashes: Mapping[str, str],
    known_by_hash: Mapping[str, Sequence[Known]],
    still_on_disk: Iterable[str] = (),
    prune: bool = False,
) -> Plan:
    """Sort a scan's ``files`` against the ``existing`` rows under the same roots.

    ``hashes`` holds the content hash of every path :func:`files_to_hash`
    named (a path missing from it could not be read). ``known_by_hash`` maps
    those hashes to stored rows anywhere in the library (sources of copies).
    ``still_on_disk`` names stored paths the scan did not return that still
    exist as files: they are kept (and reported) unless ``prune``.
    """
    found = {f.path for f in files}
    on_disk = set(still_on_disk)
    gone = {p: row for p, row in existing.items() if p not in found and (prune or p not in on_disk)}
    kept = tuple(sorted(p for p in existing if p not in found and p not in gone))
    new: list[NewFile] = []
    moved: list[tuple[int, FileInfo]] = []
    changed: list[tuple[int, FileInfo, str]] = []
    touched: list[tuple[int, FileInfo]] = []
    unchanged: list[int] = []
    unreadable: list[str] = []
    gone_by_hash: dict[str, list[Known]] = {}
    for g in gone.values():
        gone_by_hash.setdefault(g.content_hash, []).append(g)
    for f in files:
        row = existing.get(f.path)
        if row is not None and row.size == f.size and row.mtime_ns == f.mtime_ns:
            unchanged.append(row.id)
            continue
        h = hashes.get(f.path)
        if h is None:
            unreadable.append(f.path)
            if row is not None:
                unchanged.append(row.id)  # keep what was indexed; it is reported as unreadable
            continue
        if row is not None:
            (touched.append((row.id, f)) if h == row.content_hash else changed.append((row.id, f, h)))
            continue
        candidates = gone_by_hash.get(h)
        if candidates:
            src = candidates.pop()
            del gone[src.path]
            moved.append((src.id, f))
            continue
        source = next((r for r in known_by_hash.get(h, ()) if r.path not in gone and r.status in ("ok", "failed")), None)
        new.append(NewFile(f, h, source))
    return Plan(tuple(new), tuple(moved), tuple(changed), tuple(touched), tuple(unchanged),
                tuple(r.id for r in gone.values()), kept, tuple(unreadable))


@dataclass
class Applied:
    """Row ids a plan created or kept, for counting the run's outcome."""

    new_ids: set[int] = field(default_factory=set)
    moved_ids: set[int] = field(default_factory=set)
    same_ids: set[int] = field(default_factory=set)  # unchanged or touched
    had_vector: set[int] = field(default_factory=set)  # rows with a vector of this model before the run
    was_pending: set[int] = field(default_factory=set)  # rows never decoded before (left pending by a crash)


def apply_plan(store: Store, slot: ModelSlot, plan: Plan, rows: Mapping[int, Image]) -> Applied:
    """Write ``plan`` to the store and ``slot``'s image index; commits.

    ``rows`` are the stored rows the plan's ids refer to.
    """
    done = Applied(same_ids=set(plan.unchanged))
    for rid, f in plan.touched:
        rows[rid].size, rows[rid].mtime_ns = f.size, f.mtime_ns
        done.same_ids.add(rid)
    for rid, f, h in plan.changed:
        row = rows[rid]
        row.size, row.mtime_ns = f.size, f.mtime_ns
        row.content_hash, row.status, row.error = h, "pending", None
    for rid, f in plan.moved:
        rows[rid].path, rows[rid].size, rows[rid].mtime_ns = f.path, f.size, f.mtime_ns
        done.moved_ids.add(rid)
    copies: list[tuple[int, int, str]] = []  # (new id, source id, hash)
    made = []  # the new rows' columns (no ORM objects: a tenth of the cost at 20,000 files)
    for nf in plan.new:
        values: dict[str, Any] = {"path": nf.file.path, "size": nf.file.size, "mtime_ns": nf.file.mtime_ns,
                                  "content_hash": nf.content_hash, "status": "pending"}
        if nf.source is not None:
            values.update(_source_facts(store, nf.source.id))
        made.append(values)
    new_ids = store.add_images(made)  # one INSERT ... RETURNING for all of them
    for rid, nf in zip(new_ids, plan.new):
        done.new_ids.add(rid)
        if nf.copies_vector and nf.source is not None:
            copies.append((rid, nf.source.id, nf.content_hash))
    if plan.gone:
        slot.images.remove(list(plan.gone))
        store.delete_images(list(plan.gone))
    if copies:
        _copy_vectors(slot, copies)
    if plan.gone or copies:
        slot.save_images()
    store.commit()
    return done


def _source_facts(store: Store, source_id: int) -> dict[str, Any]:
    """What a copy of a known file takes from its source row: its status, reason, size and time."""
    src = store.images_by_id([source_id]).get(source_id)
    if src is None:
        return {}
    return {"status": src.status, "error": src.error, "width": src.width, "height": src.height, "taken_at": src.taken_at}


def _copy_vectors(slot: ModelSlot, copies: list[tuple[int, int, str]]) -> None:
    """Give duplicates their source's vector (and reranker tokens) without encoding."""
    vectors = slot.images.reconstruct([s for _, s, _ in copies])
    slot.images.add([n for n, _, _ in copies], vectors)
    tokens = slot.tokens
    # Only token rows that pass their checksum are copied; the others are encoded on use.
    src_tokens = slot.read_tokens([s for _, s, _ in copies])[0] if tokens is not None else {}
    if tokens is not None and src_tokens:
        pairs = [(n, s) for n, s, _ in copies if s in src_tokens]
        tokens.write([n for n, _ in pairs], np.stack([src_tokens[s] for _, s in pairs]))
    slot.record_images([(n, h, s in src_tokens) for n, s, h in copies], vectors)


def hash_files(paths: list[str], workers: int | None, bar: Any) -> tuple[dict[str, str], list[ScanIssue]]:
    """Content hashes of ``paths`` in a thread pool; files that cannot be read are issues."""
    out: dict[str, str] = {}
    issues: list[ScanIssue] = []
    if not paths:
        return out, issues

    def some(part: list[str]) -> list[tuple[str, str | None, str | None]]:
        done: list[tuple[str, str | None, str | None]] = []
        for p in part:
            try:
                done.append((p, file_hash(p), None))
            except OSError as exc:
                done.append((p, None, describe_error(exc)))
        return done

    workers = workers or default_workers()
    # a few files a task: one task per small file costs the calling thread more than hashing it
    step = max(1, min(32, len(paths) // (4 * workers)))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for done in pool.map(some, [paths[i:i + step] for i in range(0, len(paths), step)]):
            for p, h, why in done:
                if h is not None:
                    out[p] = h
                elif why is not None:
                    issues.append(ScanIssue(p, why))
            bar.update(len(done))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: do not hash the rest first
    return out, issues


@dataclass(frozen=True)
class EncodeOptions:
    """How :func:`encode_pending` batches, decodes and checkpoints."""

    batch_size: int | None = None  # images per encoder batch (default 32 on CPU, 128 on GPU)
    workers: int | None = None  # decoding threads (processes when encoding on a GPU)
    checkpoint_seconds: float = 30.0  # make progress durable this often
    int8: bool = False  # the image tower with 8-bit weights (ONNX Runtime on the CPU): faster, vectors a little off


def decoding(enc: Any) -> str:
    """Where an index run decodes for ``enc``: ``"threads"`` (loader threads, the
    default on the CPU), ``"device"`` (JPEGs on the encoder's GPU, the default
    there, see :mod:`retrieval.device_decoding`) or ``"processes"`` (a pool of
    decoding processes: on a GPU whose torchvision cannot decode JPEGs).
    ``$CROSSFIND_DECODE`` (``threads``, ``processes``, ``device``) chooses;
    ``device`` needs a torch encoder with open_clip's usual transform and falls
    back to the default otherwise, saying so."""
    how = os.environ.get("CROSSFIND_DECODE", "auto").lower()
    gpu = str(enc.device).startswith("cuda")
    if how == "threads" or (how not in ("device", "processes") and not gpu):
        return "threads"
    if how == "processes":
        return "processes"
    if _device_preprocess(enc) is not None:
        from .device_decoding import device_decoder_works

        if device_decoder_works(enc.device):
            return "device"
    if how == "device":
        LOG.warning("CROSSFIND_DECODE=device: %s cannot decode JPEGs on %s here; decoding %s",
                    enc.name, enc.device, "in processes" if gpu else "in threads")
    return "processes" if gpu else "threads"


def _device_preprocess(enc: Any) -> dict[str, Any] | None:
    """``enc``'s transform as numbers when it is a torch encoder with open_clip's usual steps."""
    if not hasattr(enc, "model"):
        return None
    from .onnx_export import ExportUnsupported, _preprocess_info

    try:
        return _preprocess_info(enc)
    except ExportUnsupported:
        return None


_TORCH_NO_INT8 = ("int8 encoding needs {spec}'s ONNX image export on the CPU; this run encodes with torch "
                  "(a GPU, CROSSFIND_ONNX=0, or no export): index with --no-int8 to encode in float32")


def int8_choice(store: Store, slot: ModelSlot, asked: bool | None, ray: bool) -> bool:
    """Whether an index run encodes with the 8-bit image tower: ``asked``,
    remembered for the model's later runs in this library, else (None) what
    an earlier run asked for, so that a library's image vectors come from one
    tower until told otherwise. What cannot run 8-bit is refused before
    anything is remembered."""
    from .onnx_quant import int8_key

    key = int8_key(slot.spec.spec)
    if asked is None:
        return store.get_setting(key) == "1"
    if asked and ray:
        raise LibraryError("--int8 encodes in this process, not through Ray; use one or the other")
    if asked and not hasattr(slot.runtime("image"), "int8"):
        raise LibraryError(_TORCH_NO_INT8.format(spec=slot.spec.spec))
    if (store.get_setting(key) == "1") != asked:
        store.set_setting(key, "1" if asked else "")
        store.commit()
    return asked


def encode_pending(store: Store, slot: ModelSlot, rows: list[Image], opts: EncodeOptions, bar: Any) -> int:
    """Decode and encode ``rows``; a file that cannot be used is marked failed with its reason.

    Returns the number of images encoded. Vectors are added to the index as
    they come and made durable at checkpoints (index first, then the rows).
    """
    if not rows:
        return 0
    enc = slot.runtime("image")
    if opts.int8:
        if not hasattr(enc, "int8"):
            raise LibraryError(_TORCH_NO_INT8.format(spec=slot.spec.spec))
        enc = enc.int8()
    tokens = slot.tokens
    batch_size = opts.batch_size or (128 if enc.device.startswith("cuda") else 32)
    size = enc.image_size

    def load(row: Image) -> tuple[LoadedImage, Any]:
        img = load_image(row.path, min_size=size)
        return img, enc.prepare(img.image)

    how = decoding(enc)
    if how == "device":
        from .device_decoding import decoded_on_device

        info = _device_preprocess(enc)
        assert info is not None
        batches: Iterable[list[Any]] = decoded_on_device(rows, enc, info, batch_size, opts.workers)
    elif how == "processes":
        from .decoding import decoded_in_processes, preparer

        prepare = preparer(enc)
        shape = prepare(PILImage.new("RGB", (size, size))).shape
        batches = decoded_in_processes(rows, prepare, size, shape, batch_size, opts.workers or max(2, os.cpu_count() or 2))
    else:
        batches = load_batches(rows, load, batch_size, opts.workers)
    pending = Pending()
    encoded = 0
    last = time.monotonic()
    for batch in batches:
        good = []
        for out in batch:
            row = out.item
            if out.error is not None or out.value is None:
                mark_failed(pending, row, out.error or "cannot decode")
                continue
            loaded, pixels = out.value
            mark_decoded(pending, row, loaded.width, loaded.height, loaded.taken_at)
            good.append((row, pixels))
        if good:
            x = enc.batch([p for _, p in good])
            vecs, toks = enc.encode_images(x, with_tokens=tokens is not None, token_layer=slot.token_layer)
            ids = [r.id for r, _ in good]
            slot.images.add(ids, vecs)
            if tokens is not None and toks is not None:
                tokens.write(ids, toks)
            pending.add([(r.id, r.content_hash, toks is not None) for r, _ in good], vecs)
            encoded += len(good)
        bar.update(len(batch))
        if time.monotonic() - last >= opts.checkpoint_seconds:
            checkpoint(store, slot, pending)
            pending, last = Pending(), time.monotonic()
    checkpoint(store, slot, pending)
    return encoded


def mark_decoded(pending: Pending, row: Image, width: int, height: int, taken_at: dt.datetime | None) -> None:
    """Record that ``row``'s file decoded: its size and time (EXIF, else the file's mtime).

    The loaded row takes the values as committed ones and ``pending`` keeps
    them for :func:`checkpoint`, which writes a checkpoint's rows in one
    statement (the ORM would flush them one by one: a tenth of a millisecond
    an image, which a GPU notices)."""
    _set(pending, row, "ok", None, width, height, taken_at or dt.datetime.fromtimestamp(row.mtime_ns / 1e9))


def mark_failed(pending: Pending, row: Image, reason: str) -> None:
    """Record that ``row``'s file cannot be used, and why (written as :func:`mark_decoded`)."""
    _set(pending, row, "failed", reason, row.width, row.height, row.taken_at)


def _set(pending: Pending, row: Image, status: str, error: str | None, width: int | None, height: int | None,
         taken_at: dt.datetime | None) -> None:
    for name, value in (("status", status), ("error", error), ("width", width), ("height", height), ("taken_at", taken_at)):
        set_committed_value(row, name, value)
    pending.facts.append((row.id, status, error, width, height, taken_at))


def checkpoint(store: Store, slot: ModelSlot, pending: Pending) -> None:
    """Make the work so far durable: index (and tokens) first, then rows."""
    slot.save_images()
    slot.record_images(pending.rows, pending.vectors())
    store.set_image_facts(pending.facts)
    store.commit()


@dataclass(frozen=True)
class ScanOptions:
    """Which files an index run selects."""

    exclude: Sequence[str] = ()  # globs of files or folders to skip
    include_hidden: bool = False  # also names starting with '.'
    prune: bool = False  # remove rows of files still on disk that this scan no longer selects


#: The encoding step of an index run: (store, slot, rows, options, bar) -> images encoded.
Encode = Callable[[Store, ModelSlot, list[Image], EncodeOptions, Any], int]


class Indexer:
    """One index run of ``roots`` into ``slot``: scan, plan, apply, encode, count."""

    def __init__(self, store: Store, slot: ModelSlot, progress: Any, encode: Encode | None = None) -> None:
        self.store = store
        self.slot = slot
        self.progress = progress  # (total, desc, unit) -> a tqdm-like bar
        self.encode: Encode = encode or encode_pending  # in-process, or e.g. retrieval.ray_index.RayEncode

    def run(self, paths: Sequence[str | os.PathLike[str]], scan_opts: ScanOptions, opts: EncodeOptions) -> IndexReport:
        roots = resolve_roots(paths)
        report = IndexReport()
        issues: list[ScanIssue] = []
        files = list(scan(roots, exclude=scan_opts.exclude, include_hidden=scan_opts.include_hidden, issues=issues))
        report.scanned = len(files)
        plan, rows = self._plan(roots, files, scan_opts.prune, opts.workers, issues)
        pending_before = {rid for rid, row in rows.items() if row.status == "pending"}
        applied = apply_plan(self.store, self.slot, plan, rows)
        applied.had_vector = set(self.store.image_vector_map(self.slot.row.id))
        applied.was_pending = pending_before
        todo = self._todo(roots, {f.path for f in files})
        bar = self.progress(len(todo), "indexing", "img")
        try:
            report.encoded = self.encode(self.store, self.slot, todo, opts, bar)
        finally:
            bar.close()
        _count(report, plan, applied, todo, self.store)
        report.kept = len(plan.kept)
        report.kept_paths = list(plan.kept)
        report.issues = [(i.path, i.reason) for i in issues]
        return report

    def _plan(self, roots: list[str], files: list[FileInfo], prune: bool, workers: int | None,
              issues: list[ScanIssue]) -> tuple[Plan, dict[int, Image]]:
        model_id = self.slot.row.id
        vec_map = self.store.image_vector_map(model_id)
        stored = self.store.images_under(roots)
        rows = {r.id: r for r in stored}
        existing = {r.path: Known.of(r, vec_map.get(r.id)) for r in stored}
        need = files_to_hash(files, existing)
        bar = self.progress(len(need), "hashing", "file")
        try:
            hashes, unreadable = hash_files(need, workers, bar)
        finally:
            bar.close()
        issues.extend(unreadable)
        found = {f.path for f in files}
        on_disk = [p for p in existing if p not in found and os.path.isfile(p)]
        known = {
            h: [Known.of(r, vec_map.get(r.id)) for r in rs]
            for h, rs in self.store.images_by_hash(h for p, h in hashes.items() if p not in existing).items()
        }
        return plan_changes(files, existing, hashes, known, on_disk, prune), rows

    def _todo(self, roots: list[str], found: set[str]) -> list[Image]:
        """Rows the scan found that lack a current vector for this model (failed files are not retried)."""
        vec_map = self.store.image_vector_map(self.slot.row.id)
        return [
            row
            for row in self.store.images_under(roots)
            if row.path in found and row.status != "failed" and vec_map.get(row.id) != row.content_hash
        ]


def resolve_roots(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Normalised roots that exist; an empty or missing path is an error."""
    roots = []
    for p in paths:
        root = normalize_path(p)
        if not os.path.lexists(root):
            raise LibraryError(f"{root}: no such file or folder")
        roots.append(root)
    if not roots:
        raise LibraryError("no path to index")
    return roots


def _count(report: IndexReport, plan: Plan, applied: Applied, todo: list[Image], store: Store) -> None:
    """Fill the report: ``added`` counts items that became searchable, failures only ``failed``."""
    todo_ids = {r.id for r in todo}
    changed = {rid for rid, _, _ in plan.changed}
    for row in todo:
        if row.status == "failed":
            report.failed += 1
            report.failures.append((row.path, row.error or ""))
        elif row.id in applied.new_ids or (row.id in applied.was_pending and row.id not in changed):
            report.added += 1  # searchable now, and was not before (new, or pending since a crash)
        elif row.id in changed or row.id in applied.had_vector:
            report.updated += 1  # changed bytes, or an outdated vector
        else:
            report.unchanged += 1  # an unchanged file, new to this model (encoded: see ``encoded``)
    settled = applied.new_ids - todo_ids  # new rows that took a copy's status and vector
    for row in store.images_by_id(sorted(settled)).values():
        if row.status == "failed":
            report.failed += 1
            report.failures.append((row.path, row.error or ""))
        else:
            report.added += 1
    report.updated += len(applied.moved_ids - todo_ids)
    report.unchanged += len(applied.same_ids - todo_ids)
    report.removed = len(plan.gone)
