"""synthgen.stream: the Producer (spawned workers, bounded queue) and serve/connect.

Every sample is made, ordered and unordered streams agree, a slow consumer holds the workers
back, every way of leaving a stream stops the workers, worker errors and deaths reach the
consumer, and ``synthgen stream`` serves another process, which survives either side dying.

Producer workers are spawned processes that re-import this module: it must stay cheap and
import-safe, and its helpers (``CountingSource``) live at module level so that they pickle.
Every wait on a process has a timeout and every process started is killed in ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _datasets import write_dataset

from synthgen._samples import CaseSource
from synthgen.layouts import discover
from synthgen.stream import DEFAULT_AUTHKEY, Producer, StreamError, connect, parse_address

REPO = Path(__file__).resolve().parents[1]
N_CASES = 3
PATCH = (32, 32, 32)
SMALL = (16, 16, 16)  # samples of ~15 kB: a queue of 2 never fills a 64 kB pipe


# --------------------------------------------------------------------------------------
# helpers (module level: spawned workers unpickle them)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountingSource(CaseSource):
    """A case that appends a line to ``log`` each time a worker loads it (one per sample)."""

    log: str = ""

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().load()


def digest(a: Any) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def content(s: dict[str, Any]) -> tuple:
    return (
        s["case"],
        int(s["epoch"]),
        int(s["position"]),
        int(s["seed"]),
        digest(s["image"]),
        digest(s["label"]),
        s["plan"],
    )


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def pid_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


def spawned_workers(pid: int) -> list[int]:
    """Producer workers of process ``pid`` (not its resource tracker)."""
    return [c for c in children_of(pid) if "spawn_main" in cmdline(c)]


def kill_pids(pids: list[int], marker: str = "python") -> None:
    """SIGKILL the processes we started (checking the command line against pid reuse)."""
    for pid in pids:
        if pid_running(pid) and marker in cmdline(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def env_with_repo() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def stream_command(root: Path, address: str, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "synthgen.cli", "stream", str(root), "--organ", "liver"]
    return [*cmd, "--address", address, *args]


def start_stream(root: Path, sock: Path | str, *args: str) -> subprocess.Popen:
    """``synthgen stream`` on the Unix socket ``sock`` (or on ``sock``, an address string)."""
    address = sock if isinstance(sock, str) else f"unix:{sock}"
    return subprocess.Popen(
        stream_command(root, address, *args),
        env=env_with_repo(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def free_tcp_address() -> str:
    """``127.0.0.1:PORT`` with a port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def wait_for_socket(proc: subprocess.Popen, sock: Path, timeout: float = 60.0) -> None:
    ok = wait_until(lambda: sock.exists() or proc.poll() is not None, timeout)
    if not ok or not sock.exists():
        out = proc.stdout.read() if proc.poll() is not None and proc.stdout else ""
        raise AssertionError(f"stream did not listen (rc {proc.poll()}): {out}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def consume(it: Iterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = write_dataset(tmp_path_factory.mktemp("streamds") / "atlas", "atlas1", N_CASES)
    _, cases = discover(root, ["liver"])
    assert len(cases) == N_CASES
    return root, cases


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder for Unix sockets (their paths are limited to ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="sgs-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Producer: contents and order
# --------------------------------------------------------------------------------------


def test_ordered_and_unordered_streams_agree(dataset: tuple[Path, list]) -> None:
    _, cases = dataset
    kw: dict[str, Any] = {"patch_size": PATCH, "samples_per_case": 2, "seed": 4}
    n = N_CASES * 2
    p = Producer(cases, "liver", workers=2, **kw)
    assert len(p) == n
    unordered = list(p)
    assert len(unordered) == n
    assert p.alive_workers == 0
    with pytest.raises(StreamError):  # a Producer is iterated once
        next(iter(p))
    s = unordered[0]
    assert isinstance(s["image"], np.ndarray) and s["image"].shape == (1, *PATCH)
    assert s["label"].shape == (1, *PATCH) and s["label"].dtype == np.uint8
    assert all(x["plan"] and (x["label"] == 2).any() for x in unordered)
    assert sorted(int(x["position"]) for x in unordered) == list(range(n))
    assert {x["case"] for x in unordered} == {c.case_id for c in cases}
    assert len({int(x["seed"]) for x in unordered}) == n

    ordered = list(Producer(cases, "liver", workers=2, ordered=True, **kw))
    assert [int(x["position"]) for x in ordered] == list(range(n))
    single = list(Producer(cases, "liver", workers=1, ordered=True, **kw))
    assert [content(x) for x in ordered] == [content(x) for x in single]
    assert {content(x) for x in unordered} == {content(x) for x in ordered}


def test_ordered_stream_holds_few_samples_out_of_order() -> None:
    """An ordered stream whose next sample is slow (worker 0 makes big scans, worker 1 small
    ones): the fast worker waits instead of running ahead, so at most queue_size + workers
    samples wait out of order (they piled up without a bound: 14 held with queue_size 4)."""
    from synthgen.phantom import make_phantom

    def case(p):
        return (p.image, p.mask("liver").astype(np.uint8), p.affine)

    big = case(make_phantom((320, 288, 200), (1.2, 1.2, 1.7), seed=0))
    small = case(make_phantom((64, 52, 46), (6, 6, 7.2), seed=1))
    cases = [big if k % 2 == 0 else small for k in range(10)]  # even positions: worker 0
    p = Producer(cases, "liver", workers=2, queue_size=1, ordered=True, prob=0.0)
    got = [int(x["position"]) for x in p]
    assert got == list(range(10))
    assert 1 <= p.buffered_peak <= 1 + 2


def test_ranks_share_each_epoch(
    dataset: tuple[Path, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DDP each rank's producer makes its share of every epoch (positions rank, rank +
    W, ... as DistributedSampler splits indices, as many on every rank): together the
    single-process stream, each sample once (before: every rank streamed every sample)."""
    _, cases = dataset
    kw: dict[str, Any] = {"patch_size": SMALL, "samples_per_case": 2, "seed": 4}
    n = N_CASES * 2
    single = Producer(cases, "liver", **kw)
    want = {content(single.maker.make(0, p)) for p in range(n)}
    got = []
    for r in range(2):
        p = Producer(cases, "liver", workers=2, ordered=True, rank=r, world_size=2, **kw)
        assert (p.rank, p.world_size, p.positions, len(p)) == (r, 2, [r, r + 2, r + 4], 3)
        got.append([content(x) for x in p])
        assert [x[2] for x in got[-1]] == [r, r + 2, r + 4]
    assert sorted(got[0] + got[1]) == sorted(want)
    # 6 samples on 4 ranks: 2 each, the last ranks wrapping around (or drop_last: 1 each)
    assert [Producer(cases, "liver", rank=r, world_size=4, **kw).positions for r in range(4)] == [
        [0, 4], [1, 5], [2, 0], [3, 1]
    ]  # fmt: skip
    assert Producer(cases, "liver", rank=3, world_size=4, drop_last=True, **kw).positions == [3]
    with pytest.raises(ValueError, match="rank"):
        Producer(cases, "liver", rank=2, world_size=2)
    # without rank=/world_size=: an initialised torch.distributed group decides
    import types

    fake = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        get_rank=lambda: 1,
        get_world_size=lambda: 3,
    )
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    p = Producer(cases, "liver", **kw)
    assert (p.rank, p.world_size, p.positions) == (1, 3, [1, 4])


def test_producer_validates_arguments(dataset: tuple[Path, list]) -> None:
    _, cases = dataset
    for bad in ({"workers": 0}, {"queue_size": 0}, {"epochs": 0}, {"device": "cuda"}):
        with pytest.raises(ValueError):
            Producer(cases, "liver", **bad)
    # an unknown size class: refused here (it crashed the worker at the first sample, and
    # `synthgen stream --size huge` served until a consumer came, then died with a traceback)
    with pytest.raises(ValueError, match="no size class 'huge'"):
        Producer(cases, "liver", size="huge")
    with pytest.raises(TypeError):
        len(Producer(cases, "liver", epochs=None))
    assert len(Producer(cases, "liver", epochs=3, samples_per_case=2)) == N_CASES * 6
    closed = Producer(cases, "liver")
    closed.close()
    with pytest.raises(StreamError, match="closed"):
        next(iter(closed))
    assert closed.alive_workers == 0


def test_cases_without_the_organ_are_left_out(tmp_path: Path) -> None:
    """A discovered case without a mask of the organ is left out with a warning (noted in
    ``skipped``): the stream goes on over the others instead of a worker failing."""
    import dataclasses

    root = write_dataset(tmp_path / "atlas", "atlas1", 3)
    (root / "BDMAP_00000001" / "segmentations" / "liver.nii.gz").unlink()
    _, cases = discover(root, ["liver"])
    assert len(cases) == 3 and "liver" in cases[1].missing
    with pytest.warns(UserWarning, match="1 of 3 cases have no 'liver' mask"):
        p = Producer(cases, "liver", workers=1, ordered=True, patch_size=PATCH, seed=2)
    assert p.skipped == {"BDMAP_00000001": cases[1].missing["liver"]} and len(p) == 2
    got = list(p)
    assert {x["case"] for x in got} == {"BDMAP_00000000", "BDMAP_00000002"}
    kept = [cases[0], cases[2]]
    want = list(Producer(kept, "liver", workers=1, ordered=True, patch_size=PATCH, seed=2))
    assert [content(x) for x in got] == [content(x) for x in want]
    with pytest.raises(ValueError, match="no case has a mask of 'liver'"):
        Producer([cases[1]], "liver")
    assert dataclasses.replace(p.maker, skipped={}) == p.maker  # (not part of the samples)


# --------------------------------------------------------------------------------------
# back-pressure
# --------------------------------------------------------------------------------------


def test_slow_consumer_holds_workers_back(dataset: tuple[Path, list], tmp_path: Path) -> None:
    _, cases = dataset
    log = tmp_path / "loads.log"
    log.touch()
    sources = [CountingSource(c.case_id, c.ct, c, (1,), None, "liver", str(log)) for c in cases]
    workers, queue_size = 2, 1
    p = Producer(
        sources,
        "liver",
        workers=workers,
        queue_size=queue_size,
        epochs=None,
        patch_size=SMALL,
        prob=0.0,  # ~15 ms a sample: unchecked workers would make hundreds in a second
    )

    def made() -> int:
        return len(log.read_text().splitlines())

    # at most: consumed + queue_size in the queue + one finished sample per blocked worker
    slack = queue_size + workers + 1
    try:
        it = iter(p)
        consumed = len(consume(it, 1))
        time.sleep(1.2)
        assert made() <= consumed + slack, f"{made()} samples made for {consumed} consumed"
        assert p._q.qsize() <= queue_size
        consumed += len(consume(it, 8))  # production resumes as the consumer reads
        time.sleep(0.8)
        assert consumed < made() <= consumed + slack
        assert p.alive_workers == workers
    finally:
        p.close()
    assert p.alive_workers == 0


# --------------------------------------------------------------------------------------
# shutdown
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["break", "close", "with", "gc"])
def test_leaving_the_stream_stops_the_workers(dataset: tuple[Path, list], how: str) -> None:
    _, cases = dataset
    kw: dict[str, Any] = {"workers": 2, "epochs": None, "patch_size": SMALL, "prob": 0.0}
    p = Producer(cases, "liver", **kw)
    pids: list[int] = []
    try:
        t0 = time.monotonic()
        if how == "break":
            for k, _ in enumerate(p):
                if k == 0:
                    pids = [q.pid for q in p._procs]
                    assert p.alive_workers == 2
                if k == 2:
                    break
        elif how == "close":
            it = iter(p)
            consume(it, 3)
            pids = [q.pid for q in p._procs]
            t0 = time.monotonic()
            p.close()
            p.close()  # idempotent
        elif how == "with":
            with p as prod:
                for k, _ in enumerate(prod):
                    if k == 0:
                        pids = [q.pid for q in p._procs]
                    if k == 2:
                        t0 = time.monotonic()
                        break
            assert p._closed
        else:  # an abandoned iterator: the generator and the Producer are collected
            it = iter(p)
            consume(it, 3)
            pids = [q.pid for q in p._procs]
            procs = p._procs
            del it
            p = None  # type: ignore[assignment]
            t0 = time.monotonic()
            gc.collect()
            assert wait_until(lambda: not any(q.is_alive() for q in procs), 8)
        assert len(pids) == 2
        if p is not None:
            assert wait_until(lambda: p.alive_workers == 0, 8)
        assert wait_until(lambda: not any(pid_running(x) for x in pids), 8)
        assert time.monotonic() - t0 < 8
    finally:
        if p is not None:
            p.close()
        kill_pids(pids, "spawn_main")


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_corrupt_case_raises_stream_error_with_traceback(
    dataset: tuple[Path, list], tmp_path: Path
) -> None:
    root, _ = dataset
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    bad = copy / "BDMAP_00000001" / "ct.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    _, cases = discover(copy, ["liver"])
    p = Producer(cases, "liver", workers=2, patch_size=SMALL, ordered=True)
    with pytest.raises(StreamError) as ei:
        for _ in p:
            pass
    msg = str(ei.value)
    assert "failed" in msg and "Traceback" in msg
    assert str(bad) in msg
    assert wait_until(lambda: p.alive_workers == 0, 8)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_worker_raises_stream_error(dataset: tuple[Path, list], sig: int) -> None:
    _, cases = dataset
    # a finite epoch (the surviving worker finishes, then the dead one is noticed) and
    # messages small enough that a kill never lands in the middle of one
    p = Producer(
        cases,
        "liver",
        workers=2,
        queue_size=2,
        samples_per_case=20,
        patch_size=SMALL,
        prob=0.0,
    )
    pids: list[int] = []
    got = 0
    try:
        with pytest.raises(StreamError, match="died") as ei:
            for _ in p:
                got += 1
                if got == 1:
                    # kill while the workers idle on a full queue, not inside a message
                    assert wait_until(lambda: p._q.qsize() == 2, 30)
                    time.sleep(0.3)
                    pids = [q.pid for q in p._procs]
                    os.kill(pids[0], sig)
                assert got < len(p), "the stream ended although a worker was killed"
        assert "worker 0" in str(ei.value)
        assert wait_until(lambda: p.alive_workers == 0, 8)
    finally:
        p.close()
        kill_pids(pids, "spawn_main")


class _Huge:
    """Pickles to nothing but claims more bytes than any disk has free."""

    nbytes = 1 << 62


class _FullOnce:
    """Pickling it fails once as on a full disk (ENOSPC), then works."""

    failed = 0

    def __reduce__(self):
        if type(self).failed == 0:
            type(self).failed += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return (_FullOnce, ())


def _wait_for_flag(flag) -> None:
    deadline = time.monotonic() + 30
    while not flag.is_set():
        if time.monotonic() > deadline:
            raise SystemExit(3)
        time.sleep(0.01)


def test_stop_flag_is_shared_without_a_lock() -> None:
    """The workers' stop flag takes no lock: with a multiprocessing.Event, a worker stopped
    by a SIGTERM to the process group while inside ``is_set()`` (which takes a semaphore)
    left the semaphore taken, and the other workers blocked in ``is_set()`` for ever (found
    as orphan workers after a test run; the flaky group-SIGTERM test). Set in one process,
    it is seen in another."""
    import multiprocessing as mp

    from synthgen.stream import _Flag

    ctx = mp.get_context("spawn")
    flag = _Flag(ctx)
    assert not hasattr(flag, "_cond") and not flag.is_set()
    proc = ctx.Process(target=_wait_for_flag, args=(flag,))
    proc.start()
    try:
        time.sleep(0.2)
        flag.set()
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()


def test_samples_that_do_not_fit_in_memory_spill_to_disk(tmp_path: Path) -> None:
    """A sample goes to the memory spool when what is free there holds it, else to the disk
    spool (Docker's 64 MB /dev/shm cannot hold whole scans: before, such a stream failed);
    a write that hits ENOSPC in memory leaves nothing there and goes to disk too. Errors of
    the last spool, or that are not a full disk, are raised."""
    from synthgen.stream import _load_sample, _save_sample

    mem, disk = tmp_path / "mem", tmp_path / "disk"
    mem.mkdir()
    disk.mkdir()
    spools = [str(mem), str(disk)]
    a = np.arange(10, dtype=np.int16)
    path = _save_sample(spools, (0, 0), {"image": a})
    assert os.path.dirname(path) == str(mem)
    assert np.array_equal(_load_sample(path)["image"], a)
    path = _save_sample(spools, (0, 1), {"image": a, "meta": _Huge()})
    assert os.path.dirname(path) == str(disk)
    path = _save_sample(spools, (0, 2), {"image": a, "meta": _FullOnce()})
    assert os.path.dirname(path) == str(disk) and _FullOnce.failed == 1
    assert os.listdir(mem) == []  # (the failed write's temporary file is gone)
    with pytest.raises(OSError) as ei:
        _save_sample([str(disk)], (0, 3), {"meta": _Gone()})
    assert ei.value.errno == errno.EPIPE
    shutil.rmtree(mem)  # gone, not full: raised, not spilled
    with pytest.raises(FileNotFoundError):
        _save_sample(spools, (0, 4), {"image": a})


class _Gone:
    def __reduce__(self):
        raise OSError(errno.EPIPE, "Broken pipe")


def test_producer_removes_both_spools(dataset: tuple[Path, list]) -> None:
    _, cases = dataset
    p = Producer(cases, "liver", workers=1, epochs=1, patch_size=SMALL, prob=0.0)
    got = list(p)
    assert got and all(os.path.isabs(d) for d in p._spools)
    if os.access("/dev/shm", os.W_OK):
        assert len(p._spools) == 2 and p._spools[0].startswith("/dev/shm/")
    assert not any(map(os.path.exists, p._spools))


def test_worker_that_cannot_write_the_spool_raises_stream_error(
    dataset: tuple[Path, list],
) -> None:
    """A worker that cannot write its samples nor its error to the spool (full, e.g. a small
    /dev/shm as Docker's 64 MB with whole scans; or gone) still fails the stream with its
    error. (Before: it exited with status 0, unreported, and the consumer waited for ever.)"""
    _, cases = dataset
    p = Producer(cases, "liver", workers=1, epochs=1, patch_size=SMALL, prob=0.0)
    it = iter(p)
    box: dict[str, Any] = {}

    def take() -> None:
        try:
            box["got"] = next(it)
        except Exception as e:
            box["error"] = e

    th = threading.Thread(target=take, daemon=True)
    try:
        th.start()
        assert wait_until(lambda: getattr(p, "_spool", None) is not None, 30)
        shutil.rmtree(p._spool)  # before the worker (still importing) writes its first sample
        th.join(60)
        assert not th.is_alive(), "the consumer waits for ever"
        assert isinstance(box.get("error"), StreamError), box
        assert "No such file or directory" in str(box["error"])
    finally:
        p.close()
        th.join(10)


# --------------------------------------------------------------------------------------
# across processes: synthgen stream + connect
# --------------------------------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address("unix:/x") == ("/x", "AF_UNIX")
    assert parse_address("127.0.0.1:5000") == (("127.0.0.1", 5000), "AF_INET")
    assert parse_address(":5000") == (("127.0.0.1", 5000), "AF_INET")
    assert parse_address("localhost:80") == (("localhost", 80), "AF_INET")
    for bad in ("nonsense", "host:", "host:port", ""):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_connect_to_nothing_raises(short_tmp: Path) -> None:
    with pytest.raises(StreamError, match="cannot connect"):
        next(iter(connect(f"unix:{short_tmp / 'none.sock'}")))
    with pytest.raises(StreamError, match="cannot connect"):
        list(connect("127.0.0.1:1"))


def test_cli_stream_serves_every_sample(dataset: tuple[Path, list], short_tmp: Path) -> None:
    root, cases = dataset
    sock = short_tmp / "s.sock"
    proc = start_stream(root, sock, "--patch-size", "32,32,32", "--epochs", "1", "--workers", "1")
    try:
        wait_for_socket(proc, sock)
        samples = list(connect(f"unix:{sock}", timeout=60))
        rc = proc.wait(timeout=30)
        out = proc.stdout.read() if proc.stdout else ""
    finally:
        stop_process(proc)
    assert rc == 0, out
    assert f"stream ended: {N_CASES} samples sent" in out
    assert len(samples) == N_CASES
    assert sorted(int(s["position"]) for s in samples) == list(range(N_CASES))
    assert {s["case"] for s in samples} == {c.case_id for c in cases}
    assert all(s["image"].shape == (1, *PATCH) and s["plan"] for s in samples)


@pytest.mark.parametrize("tcp", [False, True])
def test_a_second_consumer_is_told_the_stream_is_taken(
    dataset: tuple[Path, list], short_tmp: Path, tcp: bool
) -> None:
    """A stream serves one consumer: a second one gets a StreamError saying so at once (before:
    it waited in the connection's handshake for ever, whatever its timeout), the first one
    goes on, and the stream ends with it."""
    root, _ = dataset
    sock = short_tmp / "s.sock"
    args = ["--patch-size", "16,16,16", "--epochs", "0", "--workers", "1", "--prob", "0"]
    address = free_tcp_address() if tcp else f"unix:{sock}"
    proc = start_stream(root, address, *args)
    workers: list[int] = []
    try:
        if tcp:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "waiting for a consumer" in line
            assert f"on {address};" in line  # as connect() takes it (was "('127.0.0.1', N)")
        else:
            wait_for_socket(proc, sock)
        first = connect(address, timeout=60)
        consume(first, 2)
        workers = spawned_workers(proc.pid)
        second: dict[str, Any] = {}

        def take() -> None:
            try:
                second["got"] = consume(connect(address, timeout=60), 1)
            except Exception as e:
                second["error"] = e

        th = threading.Thread(target=take, daemon=True)
        th.start()
        th.join(20)
        assert not th.is_alive(), "the second consumer hangs"
        assert isinstance(second.get("error"), StreamError), second
        assert "already has a consumer" in str(second["error"])
        consume(first, 2)  # the first one goes on
        first.close()
        rc = proc.wait(timeout=30)
        out = proc.stdout.read() if proc.stdout else ""
    finally:
        stop_process(proc)
        kill_pids(workers, "spawn_main")
    assert rc == 0, out
    assert "stream ended: 4 samples sent" in out


def test_stream_survives_other_clients_and_keeps_its_address(
    dataset: tuple[Path, list], short_tmp: Path
) -> None:
    """A client with another key (or any connection that fails the handshake) does not end a
    stream that waits for its consumer (before: AuthenticationError, the stream process
    died); a second stream on the same address is refused instead of taking the socket from
    the first (before: it unlinked it, and the first waited unreachable), on Unix sockets as
    on TCP (before: a traceback, EADDRINUSE)."""
    root, _ = dataset
    sock = short_tmp / "s.sock"
    args = ["--patch-size", "16,16,16", "--epochs", "1", "--workers", "1", "--prob", "0"]
    proc = start_stream(root, sock, *args)
    tcp_address = free_tcp_address()
    tcp = start_stream(root, tcp_address, *args)
    try:
        wait_for_socket(proc, sock)
        with pytest.raises(StreamError):
            list(connect(f"unix:{sock}", authkey=b"another key", timeout=30))
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        for address in (f"unix:{sock}", tcp_address):
            if address[0] == "1":
                assert tcp.stdout is not None
                assert "waiting for a consumer" in tcp.stdout.readline()
            second = subprocess.run(
                stream_command(root, address, *args, "--accept-timeout", "20"),
                env=env_with_repo(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert second.returncode == 2, second.stdout + second.stderr
            assert "in use" in second.stdout, second.stdout
        for address, p in ((f"unix:{sock}", proc), (tcp_address, tcp)):
            samples = list(connect(address, timeout=60))
            assert len(samples) == N_CASES
            assert p.wait(timeout=30) == 0
    finally:
        stop_process(proc)
        stop_process(tcp)


_CONSUMER = textwrap.dedent(
    """
    import os, signal, sys
    from synthgen.stream import connect
    it = connect(sys.argv[1], timeout=60)
    next(it)
    next(it)
    print("READ 2", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_cli_stream_exits_when_its_consumer_dies(
    dataset: tuple[Path, list], short_tmp: Path
) -> None:
    root, _ = dataset
    sock = short_tmp / "s.sock"
    proc = start_stream(
        root, sock, "--patch-size", "16,16,16", "--epochs", "0", "--workers", "2", "--prob", "0"
    )
    workers: list[int] = []
    try:
        wait_for_socket(proc, sock)
        consumer = subprocess.run(
            [sys.executable, "-c", _CONSUMER, f"unix:{sock}"],
            env=env_with_repo(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "READ 2" in consumer.stdout, consumer.stderr
        assert consumer.returncode == -signal.SIGKILL
        workers = spawned_workers(proc.pid)
        t0 = time.monotonic()
        rc = proc.wait(timeout=20)
        elapsed = time.monotonic() - t0
        out = proc.stdout.read() if proc.stdout else ""
    finally:
        stop_process(proc)
        kill_pids(workers, "spawn_main")
    assert rc == 0, out
    assert "stream ended: 2 samples sent" in out
    assert elapsed < 10
    assert wait_until(lambda: not any(pid_running(w) for w in workers), 5)


@pytest.fixture(scope="module")
def killed_stream(dataset: tuple[Path, list]) -> dict[str, Any]:
    """``synthgen stream`` SIGKILLed while a consumer iterates: what the consumer saw, and
    which of the stream's workers were still running 3 s later."""
    root, _ = dataset
    d = Path(tempfile.mkdtemp(prefix="sgs-", dir="/tmp"))
    sock = d / "s.sock"
    proc = start_stream(
        root, sock, "--patch-size", "16,16,16", "--epochs", "0", "--workers", "2", "--prob", "0"
    )
    children: list[int] = []
    workers: list[int] = []
    try:
        wait_for_socket(proc, sock)
        it = connect(f"unix:{sock}", timeout=30)
        consume(it, 2)
        assert wait_until(lambda: len(spawned_workers(proc.pid)) == 2, 10)
        children = children_of(proc.pid)  # workers and the resource tracker
        workers = spawned_workers(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        error: BaseException | None = None
        t0 = time.monotonic()
        try:
            consume(it, 5)
        except Exception as e:
            error = e
        elapsed = time.monotonic() - t0
        wait_until(lambda: not any(pid_running(w) for w in workers), 3)
        leftover = [w for w in workers if pid_running(w)]
        return {"error": error, "elapsed": elapsed, "workers": workers, "leftover": leftover}
    finally:
        stop_process(proc)
        kill_pids(workers, "spawn_main")
        kill_pids(children, "python")
        shutil.rmtree(d, ignore_errors=True)


def test_consumer_raises_when_the_stream_process_dies(killed_stream: dict[str, Any]) -> None:
    assert isinstance(killed_stream["error"], StreamError), killed_stream["error"]
    assert "went away" in str(killed_stream["error"])
    assert killed_stream["elapsed"] < 5
    assert len(killed_stream["workers"]) == 2


# --------------------------------------------------------------------------------------
# regressions of bugs found by these tests (fixed)
# --------------------------------------------------------------------------------------


def _serve_half_a_message(listener: Any) -> None:
    """A producer that dies in the middle of sending a sample."""
    with listener.accept() as conn:
        assert conn.recv() == "next"
        os.write(conn.fileno(), struct.pack("!i", 1000) + b"partial")


def test_connect_producer_dies_mid_message(short_tmp: Path) -> None:
    from multiprocessing.connection import Listener

    sock = short_tmp / "half.sock"
    listener = Listener(str(sock), family="AF_UNIX", authkey=DEFAULT_AUTHKEY)
    server = threading.Thread(target=_serve_half_a_message, args=(listener,), daemon=True)
    server.start()
    try:
        with pytest.raises(StreamError):
            next(iter(connect(f"unix:{sock}", timeout=10)))
    finally:
        server.join(10)
        listener.close()


def test_workers_exit_when_the_stream_process_dies(killed_stream: dict[str, Any]) -> None:
    assert killed_stream["leftover"] == [], "orphaned producer workers still running 3 s later"


def test_accept_timeout_without_consumer(dataset: tuple[Path, list], short_tmp: Path) -> None:
    root, _ = dataset
    sock = short_tmp / "s.sock"
    proc = start_stream(root, sock, "--accept-timeout", "0.5", "--workers", "1")
    try:
        try:
            rc = proc.wait(timeout=4)
        except subprocess.TimeoutExpired:
            rc = None
        out = proc.stdout.read() if rc is not None and proc.stdout else ""
    finally:
        stop_process(proc)
    assert rc == 2, "still waiting for a consumer long after --accept-timeout 0.5"
    assert "no consumer connected" in out


def test_next_after_close(dataset: tuple[Path, list]) -> None:
    _, cases = dataset
    p = Producer(cases, "liver", workers=1, epochs=None, patch_size=SMALL, prob=0.0)
    try:
        it = iter(p)
        consume(it, 1)
        p.close()
        assert p.alive_workers == 0
        with pytest.raises((StopIteration, StreamError)):
            next(it)
    finally:
        p.close()


def test_dead_worker_is_reported_to_a_slow_consumer(dataset: tuple[Path, list]) -> None:
    _, cases = dataset
    p = Producer(
        cases,
        "liver",
        workers=2,
        queue_size=2,
        epochs=None,
        samples_per_case=2,
        patch_size=SMALL,
        prob=0.0,
    )
    pids: list[int] = []
    try:
        it = iter(p)
        seen: set[int] = set()
        while len(seen) < 2:  # both workers are up (worker w makes positions w, w + 2, ...)
            seen.add(int(next(it)["position"]) % 2)
        time.sleep(0.5)  # the queue fills up
        pids = [q.pid for q in p._procs]
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(StreamError, match="died"):
            for _ in range(12):
                time.sleep(0.15)  # slower than the surviving worker (~15 ms a sample)
                next(it)
    finally:
        p.close()
        kill_pids(pids, "spawn_main")


_KILL_MID_MESSAGE = textwrap.dedent(
    """
    import array, fcntl, os, signal, sys, termios, threading, time
    from synthgen.layouts import discover
    from synthgen.stream import Producer, StreamError

    def in_pipe(fd):
        n = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, n)
        return n[0]

    def main():
        _, cases = discover(sys.argv[1], ["liver"])
        # ~100 kB samples: bigger than a pipe, so a worker blocks inside a message
        p = Producer(cases, "liver", workers=2, queue_size=4, epochs=None,
                     patch_size=(32, 32, 32))
        it = iter(p)
        seen = set()
        while len(seen) < 2:  # both workers are up (worker w makes positions w, w + 2, ...)
            seen.add(next(it)["position"] % 2)
        # the consumer is busy: wait until the queue is full and the workers are blocked on
        # it (sending; before samples went through a spool folder, a worker killed there
        # left half a message in the pipe and the consumer hung)
        reader = p._q._reader.fileno()
        deadline = time.monotonic() + 20
        while p._q.qsize() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        print("IN PIPE", in_pipe(reader), flush=True)
        for q in p._procs:
            os.kill(q.pid, signal.SIGKILL)
        for q in p._procs:  # dead and reaped: nothing more can reach the pipe
            q.join(10)
        result = []

        def read():
            try:
                for _ in range(10):
                    next(it)
                result.append("no error")
            except StreamError as e:
                result.append("StreamError " + str(e).splitlines()[0])

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(3)
        print("RESULT", result[0] if result else "hang", flush=True)
        os._exit(0)

    if __name__ == "__main__":
        main()
    """
)


def test_workers_killed_mid_message_raise(dataset: tuple[Path, list], tmp_path: Path) -> None:
    root, _ = dataset
    script = tmp_path / "kill_mid_message.py"
    script.write_text(_KILL_MID_MESSAGE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root)],
        env=env_with_repo(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert "RESULT" in out, out
    assert "RESULT StreamError" in out and "died" in out, out


_KILLED_PRODUCER = textwrap.dedent(
    """
    import os, signal, sys
    from synthgen.layouts import discover
    from synthgen.stream import Producer
    _, cases = discover(sys.argv[1], ["liver"])
    epochs = None if sys.argv[3] == "none" else int(sys.argv[3])
    p = Producer(cases, "liver", workers=2, queue_size=2, epochs=epochs, patch_size=(16, 16, 16),
                 prob=0.0)
    it = iter(p)
    next(it)
    print(",".join(p._spools), *[q.pid for q in p._procs], flush=True)
    while len(os.listdir(p._spool)) < 2:  # samples queued in the spool, none consumed
        pass
    if epochs is not None:  # every sample made: the workers' last message waits for room
        import time
        time.sleep(2.0)
    if sys.argv[4:] == ["group"]:  # as a terminal, systemd or a batch system stop a job
        os.killpg(0, int(sys.argv[2]))
    os.kill(os.getpid(), int(sys.argv[2]))
    """
)


def _workers_gone_spool_removed(consumer: subprocess.CompletedProcess, sig: int) -> None:
    """The consumer (``_KILLED_PRODUCER``, which printed its spool and worker pids) died of
    ``sig``; its workers exit and remove the spool (left killed and removed here if not)."""
    assert consumer.returncode == -sig, consumer.stderr
    spools, *workers = consumer.stdout.split()
    spools = spools.split(",")  # (memory, then the disk one it spills to)
    try:
        assert wait_until(lambda: not any(pid_running(int(w)) for w in workers), 10)
        assert wait_until(lambda: not any(map(os.path.exists, spools)), 5), spools
    finally:
        kill_pids([int(w) for w in workers], "spawn_main")
        for spool in spools:
            shutil.rmtree(spool, ignore_errors=True)


@pytest.mark.parametrize(
    ("sig", "epochs"), [(signal.SIGTERM, "none"), (signal.SIGTERM, "1"), (signal.SIGHUP, "none")]
)
def test_process_group_terminated_leaves_no_spool(
    dataset: tuple[Path, list], sig: int, epochs
) -> None:
    """SIGTERM or SIGHUP to the consumer's whole process group, its workers included (``kill
    -TERM -PGID``, a stopped systemd unit or batch job, a closed terminal): no spool
    folder is left. (Before: the workers died at once too, none removed it: one folder of
    queued samples left in /dev/shm per run.)"""
    root, _ = dataset
    consumer = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_PRODUCER,
            str(root),
            str(int(sig)),
            epochs,
            "group",
        ],
        env=env_with_repo(),
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    _workers_gone_spool_removed(consumer, sig)


@pytest.mark.parametrize(
    ("sig", "epochs"), [(signal.SIGKILL, "none"), (signal.SIGTERM, "none"), (signal.SIGKILL, "1")]
)
def test_killed_consumer_leaves_no_spool(dataset: tuple[Path, list], sig: int, epochs) -> None:
    """A consumer process killed (SIGKILL, or SIGTERM without a handler: its finalizers never
    run) leaves no spool folder of queued samples behind (in /dev/shm, i.e. memory): the
    workers remove it as they exit. (Before: one folder left per killed run; and a finite
    run's workers, their samples made, waited for ever to put their last message into the
    full queue.)"""
    root, _ = dataset
    consumer = subprocess.run(
        [sys.executable, "-c", _KILLED_PRODUCER, str(root), str(int(sig)), epochs],
        env=env_with_repo(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _workers_gone_spool_removed(consumer, sig)


def test_sigterm_stops_the_stream_cleanly(dataset: tuple[Path, list], short_tmp: Path) -> None:
    # kill, systemctl stop, a batch system's time limit: SIGTERM to the stream process alone
    # stops its workers and removes its socket (the default action killed it at once)
    root, _ = dataset
    sock = short_tmp / "s.sock"
    proc = start_stream(root, sock, "--patch-size", "16,16,16", "--workers", "2", "--prob", "0")
    workers: list[int] = []
    try:
        wait_for_socket(proc, sock)
        it = connect(f"unix:{sock}", timeout=30)
        consume(it, 1)
        assert wait_until(lambda: len(spawned_workers(proc.pid)) == 2, 10)
        workers = spawned_workers(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        out = proc.stdout.read() if proc.stdout else ""
        assert not sock.exists(), "the socket file was left behind"
        assert not any(pid_running(w) for w in workers), "workers still running"
        assert "leaked" not in out, out
        with pytest.raises(StreamError):
            consume(it, 1)
    finally:
        stop_process(proc)
        kill_pids(workers, "spawn_main")
