"""A bounded, streaming queue of synthesized samples, in process or across processes.

:class:`Producer` keeps up to ``queue_size`` samples ready, made by background worker
processes (``spawn``: nothing is forked from a process that may hold threads or CUDA).
Back-pressure is the bounded queue: workers block when the consumer is slower. Leaving the
loop, ``close()``, a ``with`` block, garbage collection or interpreter exit stops and joins
the workers; an exception in a worker is raised in the consumer with the worker's
traceback, and a worker that dies (killed, out of memory) raises there too.

:func:`serve` publishes a producer on a local socket (``multiprocessing.connection``, the
standard library's authenticated message channel; a Unix socket path or ``host:port``) and
:func:`connect` consumes it from another process: ``synthgen stream INPUT --organ liver
--address unix:/tmp/sg.sock`` in one terminal, ``for s in synthgen.stream.connect(
"unix:/tmp/sg.sock"): ...`` in the training process. Every sample is requested by the
consumer, so a slow consumer holds the producer back; a consumer that goes away ends
``serve`` (the ``synthgen stream`` process exits) and a producer that goes away raises
:class:`StreamError` in the consumer.

Samples are dicts of NumPy arrays (see ``synthgen._samples.SampleMaker.make``): channel-first
``image`` (HU) and ``label``, ``case``, ``epoch``, ``position``, ``seed``, ``plan`` (JSON).
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ._samples import SampleMaker, distributed, rank_positions

__all__ = ["DEFAULT_AUTHKEY", "Producer", "StreamError", "connect", "parse_address", "serve"]

DEFAULT_AUTHKEY = b"synthgen-stream"
_POLL_S = 0.2


class StreamError(RuntimeError):
    """The producer side failed (a worker raised or died, or the connection was lost)."""


def _save_sample(spools: Sequence[str], key: tuple[int, int], sample: dict[str, Any]) -> str:
    """Write a sample to the first spool folder with room for it; returns its path.

    ``spools`` is the memory spool (``/dev/shm``) then a disk one: a sample that does not
    fit in what is free of the first (a small ``/dev/shm``, as Docker's 64 MB, or one
    filled by queued samples) goes to the next; the last one's errors are raised.
    """
    need = sum(int(getattr(v, "nbytes", 0)) for v in sample.values()) + (1 << 20)
    for spool in spools[:-1]:
        try:
            if shutil.disk_usage(spool).free < need:
                continue
        except OSError:
            pass  # (the write below says what is wrong)
        try:
            return _write_sample(spool, key, sample)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
    return _write_sample(spools[-1], key, sample)


def _write_sample(spool: str, key: tuple[int, int], sample: dict[str, Any]) -> str:
    """Write a sample to ``spool`` (temporary name, then rename); returns its path."""
    import pickle

    path = os.path.join(spool, f"{key[0]}-{key[1]}.pkl")
    tmp = path + f".{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(sample, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:  # (a full spool: what was written of it would keep it full)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _load_sample(path: str) -> dict[str, Any]:
    import pickle

    with open(path, "rb") as f:
        sample = pickle.load(f)
    os.unlink(path)
    return sample


class _Flag:
    """A stop flag shared with the workers, without a lock: a ``multiprocessing.Event``
    takes a semaphore in ``is_set()``, and a worker killed while holding it (a SIGTERM to
    the process group arrives there) left the others blocked in ``is_set()`` for ever, never
    seeing that their consumer was gone, and the consumer's ``set()`` blocked too."""

    def __init__(self, ctx: Any) -> None:
        self._v = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._v.value = 1

    def is_set(self) -> bool:
        return bool(self._v.value)


def exit_on_termination(exc: type[SystemExit] = SystemExit) -> None:
    """Make SIGTERM and SIGHUP (a terminal closed: SIGHUP to its process group) raise
    ``exc(128 + signal)``, so that cleanup runs (``finally`` blocks, a served socket file
    removed, workers joined): their default action kills the process at once (``kill``,
    ``systemctl stop``, a batch system's time limit). Signals ignored (nohup) stay so."""
    import signal

    def on_term(signum, frame) -> None:
        raise exc(128 + signum)

    for name in ("SIGTERM", "SIGHUP"):
        num = getattr(signal, name, None)
        if num is not None and signal.getsignal(num) is not signal.SIG_IGN:
            signal.signal(num, on_term)


class _Terminated(SystemExit):
    """A worker's SIGTERM or SIGHUP, raised as an exit (code 128 + signal) so that its
    cleanup runs."""


def _worker(
    maker: SampleMaker,
    share: list[int],
    wid: int,
    nworkers: int,
    epochs,
    out_q,
    stop,
    spools,
    window=None,
) -> None:
    """Make the samples ``wid, wid + nworkers, ...`` of ``share`` (the positions of each
    epoch that this producer's rank makes), keyed by (epoch, index in ``share``).

    ``window``: ``(taken, size)`` for an ordered stream: a sample is begun only when it is
    fewer than ``size`` ahead of the consumer's next (``taken``, a shared counter), so the
    samples a slow worker's next one holds up wait in no unbounded buffer.

    Samples go to files in ``spools`` (see :func:`_save_sample`); the queue carries only
    their small, fixed-size messages, which a pipe writes atomically: a worker killed at any
    moment cannot leave a half-written message that would block the consumer.
    """

    os.environ.setdefault("SYNTHGEN_NUM_THREADS", "1")
    parent = mp.parent_process()

    # (SIGTERM's default kills at once: this 'finally' would not run, and a SIGTERM to the
    # whole process group, the consumer's too, left the spool behind)
    exit_on_termination(_Terminated)

    def go_on() -> bool:
        return not stop.is_set() and (parent is None or parent.is_alive())

    def send(msg) -> bool:
        """Put ``msg`` while the consumer is there to take it (a full queue of a consumer
        that is gone would block for ever); False, and the queue left unflushed, when it is
        not."""
        while go_on():
            try:
                out_q.put(msg, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        out_q.cancel_join_thread()  # exit without flushing to a gone consumer
        return False

    code = 0  # the exit code, non-zero when the consumer must learn it from it
    try:
        epoch = 0
        while epochs is None or epoch < epochs:
            for k in range(wid, len(share), nworkers):
                if window is not None:  # (the consumer's next is always within it)
                    while go_on() and epoch * len(share) + k >= window[0].value + window[1]:
                        time.sleep(0.005)
                if not go_on():
                    out_q.cancel_join_thread()
                    return
                sample = maker.make(epoch, share[k])
                if not send(("item", (epoch, k), _save_sample(spools, (epoch, k), sample))):
                    return
            epoch += 1
        send(("done", wid, None))  # (a finite run's last message: also while it can be taken)
    except _Terminated as e:  # stopped from outside: its exit code tells a consumer still there
        code = int(e.code)
        out_q.cancel_join_thread()  # (which may read no more)
        if parent is not None and not stop.is_set():
            parent.join(2.0)  # a signal to the process group: the consumer is ending too
    except BaseException:
        code = 1
        tb = traceback.format_exc()
        try:
            report: Any = _save_sample(spools, (-1, wid), {"traceback": tb})
        except Exception:  # the spool cannot be written (full, gone): in the message,
            report = {"traceback": tb[-2000:]}  # cut to what a pipe writes at once
        try:  # (put(msg, 5) was block=5 with no timeout: for ever on a full queue)
            out_q.put(("error", wid, report), timeout=5)
        except Exception:  # a full queue (its consumer gone or stuck): the exit code tells
            out_q.cancel_join_thread()
    finally:
        if parent is not None and not parent.is_alive():
            # The consumer's process is gone (killed: its _shutdown never ran), so nobody
            # else removes the spool and the samples queued in it (in /dev/shm: memory).
            for spool in spools:
                shutil.rmtree(spool, ignore_errors=True)
    if code:  # (also should the error message have been lost)
        raise SystemExit(code)


def _shutdown(stop, procs, out_q, spools) -> None:
    """Stop the workers: signal, drain the queue so none blocks on it, then join (or kill)."""
    stop.set()
    deadline = time.monotonic() + 5.0
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            while True:
                out_q.get_nowait()
        for p in procs:
            p.join(timeout=0.05)
    for p in procs:
        if p.is_alive():  # stuck in a long sample: it holds nothing worth waiting for
            p.terminate()
            p.join(timeout=1.0)
    with contextlib.suppress(Exception):
        out_q.close()
        out_q.cancel_join_thread()
    for spool in spools:
        shutil.rmtree(spool, ignore_errors=True)


class Producer:
    """Iterate over synthesized samples made by background processes.

    Args:
        cases: As for :class:`synthgen.torch.SyntheticTumorDataset` (``layouts.Case``
            objects, dicts or ``(image, label[, affine])`` tuples of paths or arrays).
        organ: Organ name, preset name or preset path.
        seed: Global seed (a sample's content depends on (seed, case, epoch, index) only).
        workers: Worker processes.
        queue_size: Samples kept ready at most (back-pressure beyond it).
        epochs: Passes over the cases; ``None`` streams forever.
        samples_per_case: Samples per case per epoch.
        prob: Probability that a sample gets tumors.
        patch_size: Emit patches of this many voxels around a tumor (or an organ voxel).
        size: Size class to force.
        ordered: Yield in the order of the epochs and their positions (buffers out-of-order
            samples, at most ``queue_size + workers``: a worker that would run further ahead
            of a slow one waits); otherwise samples come as they are ready.
        device: ``"cpu"`` (the CPU engine in worker processes).
        rank: This process's rank in distributed training; ``None`` reads it from
            ``torch.distributed`` when a process group is initialised (else 0).
        world_size: The number of ranks; ``None`` as for ``rank`` (else 1).
        drop_last: With several ranks, leave out the last ``n % world_size`` samples of an
            epoch instead of repeating the first ones.

    Distributed training: each rank's producer makes its share of every epoch, as
    ``DistributedSampler`` splits indices (positions ``rank, rank + world_size, ...``,
    ``ceil(n / world_size)`` of them, the last ranks wrapping around to the first), so that
    the ranks together make each sample of a single-process stream with the same seed once.

    Example:
        >>> with Producer(cases, "liver", patch_size=(96, 96, 96)) as prod:  # doctest: +SKIP
        ...     for sample in prod:
        ...         train_step(sample["image"], sample["label"])
    """

    def __init__(
        self,
        cases: Iterable[Any],
        organ: str,
        *,
        seed: int = 0,
        workers: int = 2,
        queue_size: int = 8,
        epochs: int | None = 1,
        samples_per_case: int = 1,
        prob: float = 1.0,
        patch_size: Sequence[int] | None = None,
        size: str | None = None,
        ordered: bool = False,
        device: str = "cpu",
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if device not in ("cpu", "auto"):
            raise ValueError(
                f"device {device!r}: the producer renders on the CPU, in its worker processes "
                "('cpu' or 'auto'); to render on a GPU in a training loop, use "
                "synthgen.torch.BatchTumorSynthesis on CUDA tensors"
            )
        if workers < 1 or queue_size < 1:
            raise ValueError("workers and queue_size must be >= 1")
        if epochs is not None and epochs < 1:
            raise ValueError("epochs must be >= 1 or None (forever)")
        self.maker = SampleMaker.build(
            cases,
            organ,
            seed=seed,
            samples_per_case=samples_per_case,
            prob=prob,
            size=size,
            patch_size=patch_size,
            _stacklevel=3,  # (the warning points at the caller)
        )
        self.skipped = self.maker.skipped  # cases without a mask of the organ, left out
        self.rank, self.world_size = distributed(rank, world_size)
        # the positions of each epoch that this rank makes
        self.positions = rank_positions(len(self.maker), self.rank, self.world_size, drop_last)
        if not self.positions:
            raise ValueError(
                f"{len(self.maker)} samples per epoch over {self.world_size} ranks"
                + (" with drop_last" if drop_last else "")
                + " leave this rank none"
            )
        self.workers, self.queue_size, self.epochs, self.ordered = (
            int(workers),
            int(queue_size),
            epochs,
            ordered,
        )
        self._procs: list[Any] = []
        # ordered: most samples held out of order at once (at most queue_size + workers)
        self.buffered_peak = 0
        self._started = False
        self._closed = False
        self._finalizer: Any = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        # samples wait in memory (/dev/shm); what does not fit there spills to disk
        self._spool = tempfile.mkdtemp(prefix="synthgen-stream-", dir=shm)
        self._spools = [self._spool]
        if shm is not None:
            try:
                self._spools.append(tempfile.mkdtemp(prefix="synthgen-stream-"))
            except OSError:  # (no writable temporary folder: memory only)
                pass
        self._q = ctx.Queue(self.queue_size)
        self._stop = _Flag(ctx)
        n = min(self.workers, len(self.positions))
        # ordered: samples taken so far; workers keep within queue_size + workers of it
        self._taken = ctx.Value("q", 0, lock=False) if self.ordered else None
        window = None if self._taken is None else (self._taken, self.queue_size + n)
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    self.maker,
                    self.positions,
                    w,
                    n,
                    self.epochs,
                    self._q,
                    self._stop,
                    self._spools,
                    window,
                ),
                name=f"synthgen-producer-{w}",
                daemon=True,
            )
            for w in range(n)
        ]
        # (registered first: a worker that fails to start leaves no spool behind)
        self._finalizer = weakref.finalize(
            self, _shutdown, self._stop, self._procs, self._q, self._spools
        )
        try:
            for p in self._procs:
                p.start()
        except BaseException:
            self._finalizer()
            raise
        self._started = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._closed:
            raise StreamError("this Producer is closed")
        if self._started:
            raise StreamError("a Producer can be iterated once; make a new one")
        self._start()
        try:
            yield from self._drain()
        finally:
            self.close()

    def _check_workers(self, running: set[int]) -> None:
        """Raise if a worker that has not finished died (exit code 0 is a normal exit)."""
        for w in running:
            p = self._procs[w]
            if not p.is_alive() and p.exitcode not in (0, None):
                raise StreamError(
                    f"producer worker {w} died (exit code {p.exitcode}) without a Python "
                    "error: killed, or out of memory?"
                )

    def _drain(self) -> Iterator[dict[str, Any]]:
        running = set(range(len(self._procs)))
        pending: dict[tuple[int, int], dict[str, Any]] = {}
        nxt = (0, 0)  # (epoch, index in self.positions)
        n = len(self.positions)
        checked = time.monotonic()
        while running or pending:
            if self._closed:
                return
            if self.ordered and nxt in pending:
                self.buffered_peak = max(self.buffered_peak, len(pending))
                self._taken.value += 1  # (a worker may begin one more sample)
                yield _load_sample(pending.pop(nxt))
                nxt = (nxt[0], nxt[1] + 1) if nxt[1] + 1 < n else (nxt[0] + 1, 0)
                continue
            if not running:  # only out-of-order leftovers: cannot happen without a gap
                raise StreamError(f"samples missing from the stream (waiting for {nxt})")
            if time.monotonic() - checked > _POLL_S:  # also while samples keep coming
                self._check_workers(running)
                checked = time.monotonic()
            try:
                kind, key, payload = self._q.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_workers(running)
                checked = time.monotonic()
                continue
            if kind == "error":
                got = payload if isinstance(payload, dict) else _load_sample(payload)
                tb = got["traceback"]
                raise StreamError(f"producer worker {key} failed:\n{tb}")
            if kind == "done":
                running.discard(key)
            elif self.ordered:
                pending[key] = payload  # (in the spool, read when its turn comes)
            else:
                yield _load_sample(payload)

    def close(self) -> None:
        """Stop the workers and release the queue (idempotent)."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    @property
    def alive_workers(self) -> int:
        return sum(p.is_alive() for p in self._procs)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless Producer (epochs=None) has no length")
        return len(self.positions) * self.epochs


# --------------------------------------------------------------------------------------
# across processes
# --------------------------------------------------------------------------------------


def format_address(a: Any) -> str:
    """A listener's address as :func:`connect` takes it (the inverse of
    :func:`parse_address`): ``host:port`` or ``unix:/path``."""
    if isinstance(a, tuple) and len(a) == 2:
        return f"{a[0]}:{a[1]}"
    return f"unix:{a}" if isinstance(a, str) and not a.startswith("unix:") else str(a)


def parse_address(address: str) -> tuple[Any, str]:
    """``"unix:/path"`` -> (path, "AF_UNIX"); ``"host:port"`` -> ((host, port), "AF_INET")."""
    if address.startswith("unix:"):
        return address[5:], "AF_UNIX"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be unix:/path/to.sock or host:port, got {address!r}")
    return (host or "127.0.0.1", int(port)), "AF_INET"


def serve(
    producer: Iterable[dict[str, Any]],
    address: str,
    *,
    authkey: bytes = DEFAULT_AUTHKEY,
    accept_timeout: float | None = None,
    on_listen: Any = None,
) -> int:
    """Send ``producer``'s samples to one consumer that connects to ``address``.

    Each sample is sent when the consumer asks for it. Returns the number of samples sent
    when the stream ends or the consumer goes away (which also closes the producer).

    Raises:
        TimeoutError: No consumer connected within ``accept_timeout`` seconds.
    """
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client, Listener

    addr, family = parse_address(address)
    if family == "AF_UNIX" and os.path.exists(addr):
        if _knock(addr):  # (a process listens there; else the socket file is stale)
            raise ValueError(
                f"{address} is in use: another stream (or program) listens there; choose "
                "another address"
            )
        os.unlink(addr)  # a stale socket of a previous run
    sent = 0
    try:
        listener = Listener(addr, family=family, authkey=authkey)
    except OSError as e:
        raise ValueError(f"cannot serve on {address}: {e.strerror or e}") from None
    with listener:
        if on_listen is not None:
            on_listen(listener.address)
        timed_out = threading.Event()
        timer = None
        if accept_timeout is not None:
            # Closing a listener does not wake a blocked accept() on Linux: connect to it.
            def wake() -> None:
                timed_out.set()
                with contextlib.suppress(Exception):
                    Client(listener.address, family=family, authkey=authkey).close()

            timer = threading.Timer(accept_timeout, wake)
            timer.daemon = True
            timer.start()
        while True:
            try:
                conn = listener.accept()
                break
            except (AuthenticationError, EOFError, OSError):
                # a client with another key, or a probe: not the consumer; wait on
                if timed_out.is_set():
                    conn = None
                    break
        if timer is not None:
            timer.cancel()
        if timed_out.is_set():
            if conn is not None:
                conn.close()
            close = getattr(producer, "close", None)
            if close is not None:
                close()
            raise TimeoutError(f"no consumer connected to {address} in {accept_timeout} s")
        done = threading.Event()
        away = threading.Thread(
            target=_turn_away, args=(listener, address, done), name="synthgen-turn-away"
        )
        away.daemon = True
        away.start()
        it = iter(producer)
        try:
            with conn:
                while True:
                    msg = conn.recv()  # EOFError: the consumer went away
                    if msg != "next":
                        break
                    try:
                        sample = next(it)
                    except StopIteration:
                        conn.send(("end", None))
                        break
                    except Exception as e:
                        conn.send(("error", f"{type(e).__name__}: {e}"))
                        raise
                    conn.send(("item", sample))
                    sent += 1
        except (EOFError, BrokenPipeError, ConnectionResetError):
            pass  # consumer gone: stop producing
        finally:
            _stop_turning_away(listener, family, done, away)
            close = getattr(producer, "close", None)
            if close is not None:
                close()
    return sent


def _knock(address: Any, family: str = "AF_UNIX", timeout: float = 2.0) -> bool:
    """Connect a plain socket to ``address`` and close it: whether something listens there
    (a listener's handshake then fails at once, without waiting for it)."""
    import socket

    fam = socket.AF_UNIX if family == "AF_UNIX" else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(address)
        except OSError:  # refused (nobody listens), not a socket, gone
            return False
    return True


def _turn_away(listener: Any, address: str, done: threading.Event) -> None:
    """Answer every further consumer of a :func:`serve` with an error (a stream has one
    consumer: another one would otherwise wait in the handshake for ever)."""
    msg = (
        f"the stream at {address} already has a consumer (a synthgen stream serves one): "
        "serve each consumer its own stream (synthgen stream --rank R --world-size W on its "
        "own address for distributed training)"
    )
    while not done.is_set():
        try:
            extra = listener.accept()
        except Exception:  # a client that failed the handshake, or the listener closed
            if done.is_set():
                return
            time.sleep(_POLL_S)
            continue
        with contextlib.suppress(Exception), extra:
            if done.is_set():
                return
            if extra.poll(5.0):  # its first request, so that the answer is read, not reset
                extra.recv()
            extra.send(("error", msg))


def _stop_turning_away(listener: Any, family: str, done: threading.Event, away) -> None:
    """End :func:`_turn_away`: closing a listener does not wake a blocked accept() on Linux;
    a plain connection does (it fails the handshake, without waiting for it)."""
    done.set()
    with contextlib.suppress(Exception):
        _knock(listener.address, family, 1.0)
    away.join(2.0)


def connect(
    address: str, *, authkey: bytes = DEFAULT_AUTHKEY, timeout: float | None = 600.0
) -> Iterator[dict[str, Any]]:
    """Iterate over the samples a :func:`serve` (``synthgen stream``) process publishes.

    Args:
        address: ``unix:/path/to.sock`` or ``host:port``.
        authkey: The producer's key (``--authkey``).
        timeout: Seconds to wait for one sample before raising ``StreamError``.

    Raises:
        StreamError: The producer failed, went away, or sent nothing for ``timeout`` s.
    """
    from multiprocessing.connection import Client

    addr, family = parse_address(address)
    try:
        conn = Client(addr, family=family, authkey=authkey)
    except (OSError, EOFError) as e:
        raise StreamError(f"cannot connect to a synthgen stream at {address}: {e}") from None
    except mp.AuthenticationError:
        raise StreamError(
            f"the synthgen stream at {address} refused this key: pass its --authkey (or "
            "$SYNTHGEN_STREAM_KEY)"
        ) from None
    with conn:
        while True:
            try:
                conn.send("next")
                if timeout is not None and not conn.poll(timeout):
                    raise StreamError(f"the producer at {address} sent nothing for {timeout} s")
                kind, payload = conn.recv()
            except (EOFError, OSError) as e:  # OSError: end of file inside a message
                raise StreamError(
                    f"the synthgen stream at {address} went away ({type(e).__name__}: {e})"
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise StreamError(f"the producer at {address} failed: {payload}")
            yield payload
