"""Which backend renders: ``device="cpu" | "cuda" | "cuda:N" | "auto"``, and array kinds.

Nothing here imports CuPy or touches CUDA at import time (a process that imports synthgen may
fork DataLoader workers later). Arrays are recognised by their type's module, so that a CuPy
array or a torch tensor is identified without importing those libraries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DeviceError", "Placement", "array_kind", "gpu_report", "resolve_device"]


class DeviceError(RuntimeError):
    """The asked-for device cannot be used (no CuPy, no driver, no such GPU...)."""


@dataclass(frozen=True)
class Placement:
    """Where a render runs: ``kind`` is ``"cpu"`` or ``"cuda"``; ``index`` the GPU ordinal."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "cpu" else f"cuda:{self.index}"


def array_kind(a: Any) -> str:
    """``"numpy"``, ``"cupy"``, ``"torch-cpu"``, ``"torch-cuda"`` or ``"other"``."""
    mod = type(a).__module__ or ""
    if mod.startswith("numpy"):
        return "numpy"
    if mod.startswith("cupy"):
        return "cupy"
    if mod.startswith("torch") or any(
        (c.__module__ or "").startswith("torch") for c in type(a).__mro__[1:]
    ):  # torch tensors, and subclasses such as MONAI's MetaTensor
        return "torch-cuda" if getattr(a, "is_cuda", False) else "torch-cpu"
    return "other"


def _array_device(a: Any) -> int | None:
    kind = array_kind(a)
    if kind == "cupy":
        return int(a.device.id)
    if kind == "torch-cuda":
        return int(a.device.index or 0)
    return None


_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def parse_device(device: str) -> tuple[str, int | None]:
    """Split ``"cuda:1"`` into ``("cuda", 1)``; ValueError for anything else."""
    m = _SPEC.match(str(device).strip().lower()) if isinstance(device, str) else None
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


def cuda_device_count() -> int:
    """Number of usable GPUs; raises :class:`DeviceError` saying what is missing."""
    try:
        import cupy
    except ImportError as e:
        raise DeviceError(
            "device 'cuda' needs CuPy, which is not installed: pip install 'synthgen[cuda12]' "
            f"(CUDA 12) or 'synthgen[cuda13]' (CUDA 13) ({e})"
        ) from None
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # CUDARuntimeError: no driver, driver too old, no device
        raise DeviceError(
            f"device 'cuda': CuPy {cupy.__version__} is installed but CUDA is not usable: {e} "
            "(is an NVIDIA driver installed and a GPU visible? check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES)"
        ) from None
    if n == 0:
        raise DeviceError("device 'cuda': the CUDA driver reports no GPU")
    return n


def resolve_device(device: str, *arrays: Any) -> Placement:
    """Where to render ``arrays`` for ``device``.

    ``auto`` follows the data: CuPy arrays and CUDA tensors render on their GPU, NumPy arrays
    (and CPU tensors) on the CPU. ``cuda``/``cuda:N`` render on that GPU (host arrays are
    copied there and back); ``cpu`` refuses GPU-resident data rather than copying it silently.

    Raises:
        ValueError: A malformed device string, or data on another device than asked.
        DeviceError: ``cuda`` asked for where CuPy, the driver or the GPU is missing.
    """
    kind, index = parse_device(device)
    on_gpu = {_array_device(a) for a in arrays if _array_device(a) is not None}
    if len(on_gpu) > 1:
        raise ValueError(f"arrays live on different GPUs: {sorted(on_gpu)}")
    data_gpu = next(iter(on_gpu), None)
    if kind == "cpu":
        if data_gpu is not None:
            raise ValueError(
                f"device='cpu' but the data is on cuda:{data_gpu}; use device='auto' or 'cuda' "
                "(or move it to the host first)"
            )
        return Placement("cpu")
    if kind == "auto":
        if data_gpu is None:
            return Placement("cpu")
        return Placement("cuda", data_gpu)
    n = cuda_device_count()
    want = index if index is not None else (data_gpu if data_gpu is not None else 0)
    if want >= n:
        raise DeviceError(f"device 'cuda:{want}' does not exist: {n} GPU(s) visible")
    if data_gpu is not None and data_gpu != want:
        raise ValueError(f"device='cuda:{want}' but the data is on cuda:{data_gpu}")
    return Placement("cuda", want)


def gpu_report() -> tuple[str, list[str]]:
    """``(status, lines)`` for ``synthgen info``: CuPy/CUDA versions and every GPU found."""
    try:
        import cupy
    except ImportError:
        return "not available (CuPy not installed: pip install 'synthgen[cuda12]')", []
    try:
        rt = cupy.cuda.runtime
        n = int(rt.getDeviceCount())
        drv = rt.driverGetVersion()
        rtv = rt.runtimeGetVersion()
    except Exception as e:
        return f"not available (CuPy {cupy.__version__}, CUDA not usable: {e})", []
    lines = []
    for i in range(n):
        p = rt.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
        lines.append(
            f"cuda:{i}: {name}, sm_{p['major']}{p['minor']}, "
            f"{p['totalGlobalMem'] / 2**30:.1f} GiB, {p['multiProcessorCount']} SMs"
        )
    status = (
        f"available (CuPy {cupy.__version__}, driver {drv // 1000}.{drv % 1000 // 10}, "
        f"runtime {rtv // 1000}.{rtv % 1000 // 10}, {n} GPU(s))"
    )
    return status, lines
