"""The shared thread pool (``synthgen._pool.map_threads``): order, errors, and a map inside
an item of another map (the distance transform of a wall tumor split over the threads while
the tumors themselves run on them)."""

from __future__ import annotations

import threading
import time

import pytest

from synthgen import _pool


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    """Each test on a new pool: the shared one only grows, and a pool grown by earlier
    tests (or a machine with many CPUs) would hide what a test means to show. The thread
    count a test sets is undone after it."""
    monkeypatch.setattr(_pool, "_NUM_THREADS", None)
    _pool._drop_pool()
    yield
    _pool._drop_pool()


@pytest.fixture
def threads4():
    _pool.set_num_threads(4)


def _failing_at(k: int, delay: float, ran: list | None = None):
    """An item function that raises at item ``k`` and returns any other item after
    ``delay`` seconds (recording the items it was given in ``ran``)."""

    def fn(x):
        if ran is not None:
            ran.append(x)
        if x == k:
            raise ValueError(f"item {k}")
        time.sleep(delay)
        return x

    return fn


def test_results_in_order_on_several_threads(threads4):
    seen = set()

    def fn(x):
        seen.add(threading.get_ident())
        time.sleep(0.002)  # (the GIL released: the helpers take items too)
        return x * x

    assert _pool.map_threads(fn, range(40)) == [x * x for x in range(40)]
    assert len(seen) > 1


def test_no_items_and_one_item_run_on_the_caller(threads4):
    assert _pool.map_threads(lambda x: x, []) == []
    me = threading.get_ident()
    assert _pool.map_threads(lambda x: threading.get_ident(), [0]) == [me]


def test_little_work_runs_serially(threads4):
    me = threading.get_ident()
    got = _pool.map_threads(lambda x: threading.get_ident(), range(8), work=1000)
    assert got == [me] * 8


def test_nested_maps_finish_with_every_thread_busy(threads4):
    """Every pool thread runs an outer item that maps again: the inner maps' helpers queue
    behind busy threads, and each inner caller must not wait for them (it did all the
    items itself). A deadlock here would hang: the map runs on a thread joined with a
    timeout."""
    barrier = threading.Barrier(4, timeout=10)

    def inner(x):
        time.sleep(0.001)
        return x + 1

    def outer(k):
        barrier.wait()  # all four threads (caller and three helpers) are in an outer item
        return sum(_pool.map_threads(inner, range(10 * k, 10 * k + 10)))

    out: list = []
    t = threading.Thread(target=lambda: out.append(_pool.map_threads(outer, range(4))), daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "a map inside a map did not finish"
    assert out == [[sum(range(10 * k + 1, 10 * k + 11)) for k in range(4)]]


def test_an_item_error_reaches_the_caller(threads4):
    with pytest.raises(ValueError, match="item 5"):
        _pool.map_threads(_failing_at(5, 0.001), range(12))
    assert _pool.map_threads(lambda x: x, range(6)) == list(range(6))  # the pool still works


def test_an_error_stops_the_items_not_started(threads4):
    """Once an item has raised, no thread starts another; the caller's own error is the one
    raised, another thread's only when the caller's items all ran."""
    ran: list = []
    with pytest.raises(ValueError, match="item 0"):
        _pool.map_threads(_failing_at(0, 0.005, ran), range(200))
    assert len(ran) < 20, len(ran)  # (it ran all 200, a second, before the change)

    me, raised, started = threading.get_ident(), [], threading.Event()

    def both(x):
        if threading.get_ident() == me:
            started.set()
            time.sleep(0.02)  # (the helpers raise first)
            raise ValueError("caller's item")
        started.wait(10)  # (until the caller has an item of its own)
        raised.append(x)
        raise ValueError("helper's item")

    with pytest.raises(ValueError, match="caller's item") as err:
        _pool.map_threads(both, range(8))
    assert raised  # (a helper did raise)
    assert err.value.__context__ is None


def test_pool_grows_under_concurrent_maps():
    """Maps on several threads asking for more threads at once: one pool, every result."""
    _pool.set_num_threads(2)
    _pool.map_threads(lambda x: x, range(4))  # a pool of one helper
    _pool.set_num_threads(6)
    outs: dict = {}

    def run(k):
        outs[k] = _pool.map_threads(lambda x: (time.sleep(0.001), x * k)[1], range(20))

    ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
    assert outs == {k: [x * k for x in range(20)] for k in range(4)}
    assert _pool._POOL_SIZE == 5


def test_a_map_on_a_pool_replaced_by_a_larger_one_still_runs():
    """A map holding the pool while another thread grows it (a new, larger pool) submits to
    the one it holds: that pool must still take work (a shut-down pool raises)."""
    _pool.set_num_threads(2)
    held = _pool._pool(1)
    _pool.set_num_threads(5)
    assert _pool._pool(4) is not held  # grown: a new pool
    fut = held.submit(lambda: 7)  # what a map that took ``held`` does next
    assert fut.result(timeout=10) == 7
    assert _pool.map_threads(lambda x: x + 1, range(8)) == list(range(1, 9))
