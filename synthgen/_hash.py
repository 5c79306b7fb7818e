"""Counter-based hashing: every random number of a render comes from here.

A render never uses a stateful RNG. Each random value is a pure function of
``(tumor seed, stream, index)``: the tumor seed comes from the plan, the stream names the
purpose (lattice noise, Bernoulli draws, ...) and the index is the position on that purpose's
lattice. The mixing function is Chris Wellons' ``lowbias32`` (a bijection on 32-bit words), so
the same values come out of NumPy here and of the CUDA C kernels, in any order, on any number
of workers.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "derive_seed",
    "derive_seeds",
    "mix32",
    "seed_of",
    "stream_key",
    "stream_keys",
    "uniform_from_index",
]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32_int(x: int) -> int:
    """``lowbias32`` on a Python int (used for keys, computed once per tumor)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def mix32(x: np.ndarray) -> np.ndarray:
    """Vectorised ``lowbias32`` on a ``uint32`` array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    x = x ^ (x >> np.uint32(16))
    return x


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a sample with seed ``seed`` (pure function)."""
    seed = int(seed) & ((1 << 64) - 1)
    lo, hi = seed & _M32, seed >> 32
    a = _mix32_int(lo ^ _mix32_int(hi ^ _mix32_int((index * _GOLDEN + 1) & _M32)))
    b = _mix32_int(hi ^ _mix32_int(lo ^ _mix32_int((index * _GOLDEN + 2) & _M32)))
    return ((a << 32) | b) & ((1 << 63) - 1)


def derive_seeds(seed: int, n: int) -> list[int]:
    """:func:`derive_seed` of items ``0..n-1`` (one compiled call)."""
    from ._cpu_kernels import derive_seeds_nb

    return derive_seeds_nb(np.uint64(int(seed) & ((1 << 64) - 1)), int(n)).tolist()


def seed_of(*parts: object) -> int:
    """A 63-bit seed from any labels (global seed, case id, epoch, index...): blake2b of
    their text joined by NUL, so it is the same on every platform, run and process."""
    import hashlib

    h = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def stream_key(seed: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys for one random stream of one tumor."""
    seed = int(seed) & ((1 << 64) - 1)
    lo, hi = seed & _M32, seed >> 32
    k0 = _mix32_int(lo ^ _mix32_int(hi ^ _mix32_int((stream * _GOLDEN) & _M32)))
    k1 = _mix32_int(hi ^ _mix32_int(k0 ^ _GOLDEN))
    return k0, k1


_STREAM_KEYS_NB = None  # (the compiled function, imported on first use: see stream_keys)


def stream_keys(seeds, *streams: int) -> np.ndarray:
    """:func:`stream_key` of many seeds at once: ``(n, 2)`` int64 per stream (the same
    numbers), side by side for several streams (``(n, 2 k)``); one numba call. (Importing
    synthgen does not import numba, so the compiled function is imported on the first
    call and kept: an import statement per call cost a GPU render's host several us.)"""
    global _STREAM_KEYS_NB
    stream_keys_nb = _STREAM_KEYS_NB
    if stream_keys_nb is None:
        from ._cpu_kernels import stream_keys_nb

        _STREAM_KEYS_NB = stream_keys_nb
    seeds = list(seeds)
    try:  # seeds in [0, 2**64) (a plan's are 63-bit): converted as they are
        s = np.array(seeds, dtype=np.uint64).reshape(-1)
        if s.size != len(seeds):
            raise ValueError
    except (OverflowError, TypeError, ValueError):  # negative or other integers: wrapped
        s = np.fromiter((int(x) & ((1 << 64) - 1) for x in seeds), dtype=np.uint64)
    return stream_keys_nb(s, np.asarray(streams, dtype=np.int64))


def uniform_from_index(key: tuple[int, int], index: np.ndarray) -> np.ndarray:
    """Uniform ``float32`` values in ``[0, 1)`` for lattice indices under ``key``.

    ``h = mix32(mix32(index + k0) ^ k1)``; the top 24 bits give the value, so it is exact in
    float32 and identical on every backend.
    """
    idx = np.asarray(index, dtype=np.uint32)
    h = mix32(mix32(idx + np.uint32(key[0])) ^ np.uint32(key[1]))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)
