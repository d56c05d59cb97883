"""Decoding that overlaps encoding: a bounded pool of loader threads.

Pillow releases the GIL while it decodes and resizes, so a thread pool keeps
the next batches decoding while the encoder runs on the current one. Results
come back in input order; a failure is returned in place, never raised:
any ``Exception`` from loading one item is that item's outcome (only
``MemoryError``, which is about the process, and ``KeyboardInterrupt`` /
``SystemExit`` propagate). When the consumer stops early (Ctrl-C, an error),
items not yet started are cancelled instead of waited for.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Loader threads: the cores, at least 2, at most 8."""
    return max(2, min(8, os.cpu_count() or 2))


class Outcome(Generic[T, R]):
    """The result of loading one item: ``value`` or ``error`` (a reason)."""

    __slots__ = ("item", "value", "error")

    def __init__(self, item: T, value: R | None, error: str | None) -> None:
        self.item = item
        self.value = value
        self.error = error


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _call(fn: Callable[[T], R], item: T, errors: tuple[type[BaseException], ...]) -> Outcome[T, R]:
    try:
        return Outcome(item, fn(item), None)
    except MemoryError:
        raise
    except errors as exc:
        return Outcome(item, None, _reason(exc))


def _call_all(fn: Callable[[T], R], items: list[T], errors: tuple[type[BaseException], ...]) -> list[Outcome[T, R]]:
    return [_call(fn, item, errors) for item in items]


def ordered_batches(
    items: Iterable[T],
    submit: Callable[[list[T]], Future[Any]],
    finish: Callable[[list[T], Any], list[Outcome[T, R]]],
    chunk: int,
    ahead: int,
    batch_size: int,
) -> Iterator[list[Outcome[T, R]]]:
    """Yield lists of ``batch_size`` outcomes in input order: ``items`` go to
    ``submit`` (a pool's task) ``chunk`` at a time, at most ``ahead`` chunks in
    flight, and ``finish(chunk, its task's result)`` turns each into outcomes.
    Chunks not yet started when the consumer stops are cancelled."""
    it = iter(items)
    pending: deque[tuple[list[T], Future[Any]]] = deque()
    exhausted = False

    def fill() -> None:
        nonlocal exhausted
        while not exhausted and len(pending) < ahead:
            part = list(itertools.islice(it, chunk))
            if len(part) < chunk:
                exhausted = True
            if not part:
                return
            pending.append((part, submit(part)))

    try:
        fill()
        ready: deque[Outcome[T, R]] = deque()
        while pending or ready:
            while pending and len(ready) < batch_size:
                part, fut = pending.popleft()
                ready.extend(finish(part, fut.result()))
                fill()
            yield [ready.popleft() for _ in range(min(batch_size, len(ready)))]
    finally:
        for _, fut in pending:
            fut.cancel()


def load_batches(
    items: Sequence[T] | Iterable[T],
    load: Callable[[T], R],
    batch_size: int,
    workers: int | None = None,
    errors: tuple[type[BaseException], ...] = (Exception,),
) -> Iterator[list[Outcome[T, R]]]:
    """Yield lists of ``batch_size`` outcomes, loading ahead in ``workers`` threads.

    At most two batches are in flight beyond the one being consumed, so memory
    stays bounded whatever the number of items.
    """
    workers = workers or default_workers()
    # Items go to the threads in chunks: one task per item costs the consuming
    # thread more than decoding costs a worker when there are many workers.
    chunk = max(1, min(16, batch_size // (2 * workers)))
    ahead = (batch_size * 2 + workers + chunk - 1) // chunk  # chunks in flight
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crossfind-load")
    try:
        yield from ordered_batches(items, lambda part: pool.submit(_call_all, load, part, errors),
                                   lambda _, outcomes: outcomes, chunk, ahead, batch_size)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
