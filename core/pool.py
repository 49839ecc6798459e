"""Chunks of work run in a process pool, or in this process: shared by the cache's detection
and crop passes, so a build starts one pool and both passes use every core."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import cv2

CHUNK = 64  # images per worker task: big enough to hide pool overhead, small for a smooth bar


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; nested threads only contend


def in_worker() -> bool:
    """Whether this process is a pool worker (which should use one thread per library)."""
    return multiprocessing.parent_process() is not None


def chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size``."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


class Runner:
    """Runs chunk tasks in a process pool, or in this process when ``workers <= 1``."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.pool = None
        if workers > 1:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() \
                else "spawn"  # no fork: the parent may hold torch threads
            self.pool = ProcessPoolExecutor(workers, multiprocessing.get_context(method),
                                            initializer=_init_worker)

    def map(self, fn: Callable, *iterables) -> Iterator:
        """``fn`` over the iterables, results in order."""
        if self.pool is None:
            return map(fn, *iterables)
        return self.pool.map(fn, *iterables)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
