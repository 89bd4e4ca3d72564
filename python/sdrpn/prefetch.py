"""Image work on the CPU in threads (Pillow and numpy release the GIL while they work):
``prefetch`` loads the next samples while a batch runs on the device, so the accelerator
does not wait on the CPU between batches; ``thread_map`` preprocesses the images of one
batch side by side."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# The CPUs this process may run on (a job scheduler's share, not the machine's), at most 8.
DEFAULT_WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _done(fn: Callable[[T], R], item: T) -> Future:
    """fn(item) run here, as a finished future (its result or its exception)."""
    future: Future = Future()
    try:
        future.set_result(fn(item))
    except Exception as err:  # handed to the caller, who reads it from .result() as from a thread
        future.set_exception(err)
    return future


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[Future]:
    """One future of fn(item) per item, in the items' order, with up to ``ahead`` of them
    computed in advance by ``workers`` threads; ``.result()`` gives fn's value or raises what
    fn raised for that item. ``workers`` 0 computes each item when it is reached."""
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if not isinstance(ahead, int) or ahead < 1:
        raise ValueError(f"ahead must be an int >= 1, got {ahead!r}")
    if workers == 0:
        for item in items:
            yield _done(fn, item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdrpn-load") as pool:
        queue: collections.deque[Future] = collections.deque()
        try:
            for item in items:
                queue.append(pool.submit(fn, item))
                if len(queue) > ahead:
                    yield queue.popleft()
            while queue:
                yield queue.popleft()
        finally:  # a consumer that stops early leaves no work queued behind it
            for future in queue:
                future.cancel()


def thread_map(fn: Callable[[T], R], items: list[T], workers: int = DEFAULT_WORKERS) -> list[R]:
    """[fn(item) for item in items], by up to ``workers`` threads when there is more than
    one item; the first exception fn raises is raised here."""
    if workers < 2 or len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="sdrpn-image") as pool:
        return list(pool.map(fn, items))
