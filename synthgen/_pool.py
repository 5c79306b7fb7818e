"""The shared thread pool that runs independent tumor work concurrently.

Kernels release the GIL (numba ``nogil``), so threads scale on the per-tumor work without the
cost and fork-unsafety of numba thread teams.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

__all__ = ["map_threads", "row_ranges", "set_num_threads", "usable_cpus"]

_NUM_THREADS: int | None = None
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def set_num_threads(n: int | None) -> None:
    """Threads a render may use to run independent groups of tumors concurrently.

    ``None`` (default) uses ``SYNTHGEN_NUM_THREADS`` or the number of CPUs; use ``1`` in
    data-loader workers. The kernels release the GIL, so threads scale on the tumor work.
    """
    global _NUM_THREADS
    if n is not None and int(n) < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    _NUM_THREADS = None if n is None else int(n)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity; all of them where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _threads() -> int:
    if _NUM_THREADS is not None:
        return _NUM_THREADS
    env = os.environ.get("SYNTHGEN_NUM_THREADS")
    if env:
        return max(1, int(env))
    return usable_cpus()


def _drop_pool() -> None:
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE = None, 0
    _POOL_LOCK = threading.Lock()  # (a thread of the parent may have held it at the fork)


if hasattr(os, "register_at_fork"):  # a forked child must not reuse the parent's threads
    os.register_at_fork(after_in_child=_drop_pool)


# With little work (voxels), or many small items, the Python glue between kernels dominates
# and threads mostly trade the GIL back and forth: run serially then.
MIN_PARALLEL_WORK = 400_000
MIN_PARALLEL_ITEM = 100_000
ALWAYS_PARALLEL_WORK = 2_000_000


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The shared pool, with at least ``workers`` threads (made, or grown, under a lock:
    maps on several threads, or one inside another, may ask at once). A pool replaced by a
    larger one is not shut down: a map that took it before may still submit to it (a shut
    down pool refuses); its idle threads exit once the last such map has let it go."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            _POOL = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="synthgen")
            _POOL_SIZE = workers
        return _POOL


def map_threads(fn, items, work: int | None = None):
    """``list(map(fn, items))``, on the shared thread pool when there is enough work.

    Args:
        fn: Function of one item (its heavy parts must release the GIL).
        items: The items.
        work: Total work in voxels. The map runs serially below ``MIN_PARALLEL_WORK``, and
            below ``ALWAYS_PARALLEL_WORK`` when items average under ``MIN_PARALLEL_ITEM``.
    """
    items = list(items)
    if len(items) <= 1:  # (before the thread count: its affinity query is a system call)
        return [fn(x) for x in items]
    n = min(_threads(), len(items))
    if work is not None and items:
        small_items = work / len(items) < MIN_PARALLEL_ITEM and work < ALWAYS_PARALLEL_WORK
        if work < MIN_PARALLEL_WORK or small_items:
            n = 1
    if n <= 1:
        return [fn(x) for x in items]
    pool = _pool(n - 1)
    # The calling thread works too; every thread takes the next item until none is left, or
    # until an item has raised (the others are not started then).
    results: list = [None] * len(items)
    order = iter(range(len(items)))
    lock = threading.Lock()
    failed = False

    def drain() -> None:
        nonlocal failed
        while True:
            with lock:
                i = None if failed else next(order, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException:
                failed = True
                raise

    helpers = [pool.submit(drain) for _ in range(n - 1)]
    errors = []
    try:
        drain()
    finally:
        # A helper not started by now has nothing left to do: cancelled, so that a map
        # inside an item of another map (the pool's threads all busy with the outer one)
        # never waits for a thread that only its own caller could free. (An error of the
        # caller's own item goes on up; a helper's is raised after.)
        for h in helpers:
            h.cancel()
        for h in helpers:
            if not h.cancelled() and h.exception() is not None:
                errors.append(h.exception())
    if errors:
        raise errors[0]
    return results


def row_ranges(n: int, voxels: int, min_voxels: int, parts: int | None = None):
    """``[0, n)`` (the rows of a box of ``voxels`` voxels) as nearly equal ranges to map on
    the threads: ``parts`` of them (at most ``n``, none empty; ``[(0, 0)]`` for no rows), by
    default four a thread (rows differ in cost) from ``min_voxels`` voxels with more than
    one thread, else one."""
    if parts is None:
        threads = _threads() if voxels >= min_voxels else 1
        parts = 4 * threads if threads > 1 else 1
    k = max(1, min(int(parts), n))
    cuts = [n * p // k for p in range(k + 1)]
    return [(cuts[p], cuts[p + 1]) for p in range(k)]
