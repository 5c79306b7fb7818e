"""Run the CUDA backend's driver without a GPU: the kernels of kernels/ compiled for the host.

Each ``.cu`` file is compiled by the host C++ compiler with a small prelude that makes a
``__global__`` function an ordinary ``extern "C"`` function run by one "thread"
(``blockDim = 1``) of the block ``blockIdx.x`` the backend sets before each call, and gives
the atomics their sequential meaning. :class:`HostBackend` then offers what
``synthgen._cuda`` needs of a backend (``xp``, ``launch_flat``, ``pointer``, ``block_rule``,
``upload``, ``download``, ``on_device``, ``context``) with NumPy as ``xp``, so the very
driver that runs on a GPU runs in CI on the same CUDA C sources. By default each segment of
a launch gets one block, which walks all its elements in order; ``block_rule`` can ask for
the many blocks per segment a GPU runs.

Every launch is checked against the kernel's C signature, parsed from the source: each
pointer argument must be a C-contiguous array (or a :class:`Pointer`) of the pointed-to type
and each scalar a NumPy scalar of the parameter's exact type (CuPy passes a scalar by its
NumPy type, so a mismatch there would silently corrupt a GPU launch).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

PRELUDE = r"""
#pragma once
#include <math.h>
#define __global__
#define __launch_bounds__(...)
#define __shared__
static inline void __syncthreads() {}
struct sg_dim3 { unsigned int x, y, z; };
static sg_dim3 blockIdx = {0, 0, 0};
extern "C" void sg_emu_set_block(unsigned int x) { blockIdx.x = x; }
static const sg_dim3 threadIdx = {0, 0, 0};
static const sg_dim3 blockDim = {1, 1, 1};
static inline int atomicAdd(int* a, int v) { int o = *a; *a = o + v; return o; }
static inline int atomicMin(int* a, int v) { int o = *a; if (v < o) *a = v; return o; }
static inline int atomicMax(int* a, int v) { int o = *a; if (v > o) *a = v; return o; }
static inline unsigned int atomicInc(unsigned int* a, unsigned int v)
{ unsigned int o = *a; *a = o >= v ? 0u : o + 1u; return o; }
static inline void __threadfence() {}
template <class T> static inline T __ldcg(const T* p) { return *p; }
"""

_SIG = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)',
    re.S,
)

_POINTEE = {
    "float": np.float32,
    "double": np.float64,
    "unsigned char": np.uint8,
    "long long": np.int64,
    "int": np.int32,
    "unsigned int": np.uint32,
}
_SCALAR = {
    "float": (np.float32, ctypes.c_float),
    "double": (np.float64, ctypes.c_double),
    "int": (np.int32, ctypes.c_int),
    "unsigned int": (np.uint32, ctypes.c_uint),
    "long long": (np.int64, ctypes.c_longlong),
}


def _param_type(decl: str) -> tuple[str, bool]:
    """``("float", True)`` for ``const float* __restrict__ x``."""
    d = decl.replace("__restrict__", " ").replace("const", " ")
    ptr = "*" in d
    words = d.replace("*", " ").split()[:-1]  # drop the parameter's name
    return " ".join(words), ptr


def signatures(source: str) -> dict[str, list[tuple[str, bool]]]:
    return {
        name: [_param_type(p) for p in params.split(",")] for name, params in _SIG.findall(source)
    }


class DeviceArray(np.ndarray):
    """A NumPy array the stand-in treats as GPU-resident (a CuPy array's role)."""


def to_device(a: np.ndarray) -> DeviceArray:
    return np.array(a, copy=True).view(DeviceArray)


class Pointer:
    """A device address passed as a pointer argument, with the type it points to (checked
    against the kernel's signature, as an array argument's dtype is)."""

    __slots__ = ("address", "dtype")

    def __init__(self, address: int, dtype: np.dtype) -> None:
        self.address, self.dtype = address, dtype


class HostBackend:
    """The stand-in for ``synthgen._cuda.CupyBackend`` (see the module docstring)."""

    xp = np

    def __init__(self, build_dir: Path, block_rule: tuple[int, int] = (1 << 62, 1),
                 most_blocks: int = 0) -> None:  # fmt: skip
        # the flat schedules' rule (elements per block, most blocks per segment): by default
        # one block per segment, which walks all its elements, in order (so sums come out as
        # on the CPU); a finer rule runs the kernels' block-stride walks as a GPU would
        self.block_rule = block_rule
        # the blocks a launch keeps at most (CupyBackend.most_blocks; 0: no limit)
        self.most_blocks = most_blocks
        # the order a launch runs its blocks in: None, ascending; an int, a permutation drawn
        # per launch from that seed (a GPU runs blocks in any order; what they add up must
        # not depend on it)
        self.block_order: int | None = None
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            raise RuntimeError("no host C++ compiler")
        prelude = build_dir / "sg_host_prelude.h"
        prelude.write_text(PRELUDE)
        self.sigs: dict[str, list[tuple[str, bool]]] = {}
        self.fns: dict[str, ctypes._CFuncPtr] = {}
        self.launches: list[str] = []
        self._set_block: dict[str, ctypes._CFuncPtr] = {}
        self._file: dict[str, str] = {}
        for src in sorted(KERNELS.glob("*.cu")):
            lib = build_dir / f"lib{src.stem}.so"
            subprocess.run(
                [cxx, "-O2", "-std=c++14", "-shared", "-fPIC", "-ffp-contract=off",
                 "-include", str(prelude), f"-I{KERNELS}", "-x", "c++", str(src), "-o", str(lib)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            dll = ctypes.CDLL(str(lib))
            self._set_block[src.stem] = dll.sg_emu_set_block
            for name, params in signatures(src.read_text()).items():
                self.sigs[name] = params
                self._file[name] = src.stem
                fn = getattr(dll, name)
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p if ptr else _SCALAR[t][1] for t, ptr in params]
                self.fns[name] = fn

    def _convert(self, name: str, args) -> list:
        """The C values of a launch's arguments, each checked against the kernel's signature."""
        params = self.sigs[name]
        if len(args) != len(params):
            raise TypeError(f"{name}: {len(args)} arguments for {len(params)} parameters")
        conv = []
        for k, (a, (t, ptr)) in enumerate(zip(args, params, strict=True)):
            if ptr:
                if isinstance(a, Pointer):
                    if a.dtype != _POINTEE[t]:
                        raise TypeError(
                            f"{name} argument {k}: expected a {t}* address, got one of {a.dtype}"
                        )
                    conv.append(a.address)
                    continue
                if not isinstance(a, np.ndarray) or a.dtype != _POINTEE[t]:
                    raise TypeError(
                        f"{name} argument {k}: expected {t}* array, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}"
                    )
                if not a.flags.c_contiguous:
                    raise TypeError(f"{name} argument {k}: array is not C-contiguous")
                conv.append(a.ctypes.data)
            else:
                want = _SCALAR[t][0]
                if type(a) is not want:
                    raise TypeError(
                        f"{name} argument {k}: expected a NumPy {np.dtype(want)} scalar for "
                        f"C {t}, got {type(a).__name__}"
                    )
                conv.append(a.item())
        return conv

    def launch_flat(self, name: str, n_blocks: int, *args) -> None:
        """A segmented launch of ``n_blocks`` blocks (the kernel's schedule, its first
        argument, maps each to its segment): the blocks one after another, each one thread."""
        conv = self._convert(name, args)
        self.launches.append(name)
        fn, set_block = self.fns[name], self._set_block[self._file[name]]
        order = range(int(n_blocks))
        if self.block_order is not None:
            rng = np.random.default_rng((self.block_order, len(self.launches)))
            order = rng.permutation(int(n_blocks)).tolist()
        for b in order:
            set_block(b)
            fn(*conv)
        set_block(0)

    def pointer(self, address: int, dtype) -> Pointer:
        """A device address as a kernel argument (``dtype``: what it points to)."""
        return Pointer(int(address), np.dtype(dtype))

    def ptr(self, a) -> int:
        # (``a.ctypes.data`` builds a ctypes object: ~10x slower, and the host-time
        # benchmark replays the driver through this backend)
        return int(a.__array_interface__["data"][0])

    def alloc(self, nbytes: int) -> DeviceArray:
        """Uninitialised, as device memory is."""
        return np.empty(max(int(nbytes), 16), dtype=np.uint8).view(DeviceArray)

    def fill(self, dev, value) -> None:
        dev.fill(value)

    def copy_in(self, dev, host: np.ndarray) -> None:
        dev[...] = host

    def upload(self, host: np.ndarray) -> DeviceArray:
        return to_device(host)

    def download(self, dev) -> np.ndarray:
        return np.array(dev, copy=True).view(np.ndarray)

    def on_device(self, a) -> bool:
        return isinstance(a, DeviceArray)

    def context(self, stream, arrays):
        return contextlib.nullcontext()
