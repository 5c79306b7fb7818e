"""A minimal ctypes binding of NVRTC, the compiler CuPy uses at run time (no GPU needed).

Finds ``libnvrtc`` from the ``nvidia-cuda-nvrtc-cu12`` wheel (``nvidia/cuda_nvrtc/lib``), the
CUDA 13 wheels (``nvidia/cu13/lib``) or ``$CUDA_HOME/lib64``, and compiles a CUDA C source to
PTX for one virtual architecture; an error raises with NVRTC's log, which names the file and
line.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sys
from pathlib import Path


def find_libnvrtcs() -> dict[str, str]:
    """``{"nvrtc12": path, "nvrtc13": path, ...}``: one ``libnvrtc`` per CUDA major version
    found (the wheels' ``nvidia/cuda_nvrtc/lib`` and ``nvidia/cu13/lib``, ``$CUDA_HOME``), so
    the kernels compile with the CUDA 12 compiler and with the CUDA 13 one of the GPU
    machine (CuPy 14 for CUDA 13)."""
    roots = [Path(p) / "nvidia" for p in sys.path if p and Path(p, "nvidia").is_dir()]
    pats = [str(r / sub / "libnvrtc.so*") for r in roots for sub in ("cuda_nvrtc/lib", "cu13/lib")]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        pats.append(str(Path(home) / "lib64" / "libnvrtc.so*"))
    found: dict[str, str] = {}
    for pat in pats:
        paths = [p for p in sorted(glob.glob(pat)) if "builtins" not in p and ".alt." not in p]
        versioned = [(m[1], p) for p in paths if (m := re.search(r"libnvrtc\.so\.(\d+)", p))]
        for major, path in versioned:
            found.setdefault(f"nvrtc{major}", path)
        if paths and not versioned:  # (a bare libnvrtc.so, of an unknown version)
            found.setdefault("nvrtc", paths[0])
    return dict(sorted(found.items()))


def find_libnvrtc() -> str | None:
    """The first ``libnvrtc`` of :func:`find_libnvrtcs` (the oldest CUDA major)."""
    libs = find_libnvrtcs()
    return next(iter(libs.values()), None)


class NVRTCError(RuntimeError):
    pass


def _compile(source: Path, arch: str, include_dirs: list[Path], extra: list[bytes], get,
             lib_path: str | None = None):  # fmt: skip
    """Compile ``source`` for ``arch`` with NVRTC (``lib_path``, default the first found);
    ``get(lib, prog, log)`` reads the result. Raises NVRTCError with the log."""
    lib = ctypes.CDLL(lib_path or find_libnvrtc() or "libnvrtc.so")
    prog = ctypes.c_void_p()
    src = source.read_text().encode()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, str(source).encode(), 0, None, None)
    if rc != 0:
        raise NVRTCError(f"{source}: nvrtcCreateProgram failed ({rc})")
    # --fmad=false: no FMA contraction, so the kernels round as the CPU path does.
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++14", b"--fmad=false", *extra]
    opts += [f"--include-path={d}".encode() for d in include_dirs]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    try:
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise NVRTCError(log.value.decode(errors="replace"))
        return get(lib, prog, log.value.decode(errors="replace"))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_to_ptx(source: Path, arch: str, include_dirs: list[Path],
                   lib_path: str | None = None) -> str:  # fmt: skip
    """PTX of ``source`` for ``arch`` (e.g. ``"compute_80"``); raises NVRTCError with the log."""
    return _compile(source, arch, include_dirs, [], lambda lib, prog, log: _ptx(lib, prog),
                    lib_path)  # fmt: skip


def _ptx(lib, prog) -> str:
    """The PTX of a compiled NVRTC program."""
    size = ctypes.c_size_t()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    out = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, out)
    return out.value.decode()


def _ptxas_report(log: str) -> dict[str, dict]:
    """``{"registers", "spill_stores", "spill_loads"}`` (bytes) per kernel, from a
    ``--ptxas-options=-v`` compile log."""
    out: dict[str, dict] = {}
    name = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m[1]
            out[name] = {}
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):  # fmt: skip
            out[name].update(spill_stores=int(m[1]), spill_loads=int(m[2]))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            out[name]["registers"] = int(m[1])
    return out


def compile_to_cubin(source: Path, arch: str, include_dirs: list[Path],
                     lib_path: str | None = None) -> tuple[str, bytes, dict]:  # fmt: skip
    """One compile of ``source`` to machine code for ``arch`` (e.g. ``"sm_90"``): its PTX,
    its cubin and what ptxas (inside NVRTC) reports per kernel, from its ``-v`` log:
    ``{"registers", "spill_stores", "spill_loads"}`` (bytes)."""

    def get(lib, prog, log):
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return _ptx(lib, prog), cubin.raw, _ptxas_report(log)

    return _compile(source, arch, include_dirs, [b"--ptxas-options=-v"], get, lib_path)
