"""Every CUDA C kernel in kernels/ compiles to PTX with NVRTC for sm_80 and sm_90.

NVRTC is the compiler CuPy uses at run time; the ``nvidia-cuda-nvrtc-cu12`` wheel (a test
extra) brings it without the CUDA toolkit or a GPU. A compile error fails with NVRTC's log,
which names the kernel's file and line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _nvrtc import NVRTCError, compile_to_cubin, compile_to_ptx, find_libnvrtcs

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
LIBS = find_libnvrtcs()

pytestmark = pytest.mark.skipif(
    not LIBS, reason="NVRTC not installed (pip install nvidia-cuda-nvrtc-cu12)"
)


def test_there_are_kernels() -> None:
    assert SOURCES, f"no .cu files in {KERNELS}"


def test_the_gpu_machine_s_compiler_is_checked() -> None:
    """The test extras bring NVRTC of CUDA 12 and of CUDA 13 (the GPU machine's CuPy 14 is
    built for CUDA 13): both compile the kernels below. (Elsewhere, e.g. on the GPU machine
    with its own CUDA, whatever NVRTC is there compiles them.)"""
    from importlib import metadata

    try:
        metadata.version("nvidia-cuda-nvrtc-cu12")
    except metadata.PackageNotFoundError:
        pytest.skip("not the test extras' NVRTC wheels")
    assert {"nvrtc12", "nvrtc13"} <= set(LIBS), LIBS


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_kernel_compiles_without_spills(source: Path, arch: str, lib: str) -> None:
    """To PTX for the architecture and on to its machine code for A100 and H100 (ptxas inside
    NVRTC, as CuPy compiles for a device; one compile, ``segmented.cu``'s some 30 s on two
    cores), and no kernel spills registers to local memory. The streaming kernels run at
    their register bound (``__launch_bounds__(256, 4)``: 64), where one more live value
    spills; on sm_90 a schedule lookup held in registers made the blend spill 28 bytes and
    reload 108."""
    try:
        ptx, _, report = compile_to_cubin(source, arch, [KERNELS], LIBS[lib])
    except NVRTCError as e:
        pytest.fail(f"{source.name} does not compile for {arch} with {lib}:\n{e}")
    assert ".entry" in ptx and f".target {arch}" in ptx
    assert report, f"ptxas reported no kernel of {source.name}"
    for name, r in report.items():
        assert "registers" in r, (name, r)
        spills = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        assert spills == 0, f"{name} ({arch}, {lib}) spills: {r}"


def test_a_compile_error_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.cu"
    bad.write_text(
        '#include "hash.cuh"\nextern "C" __global__ void f(float* o) {\n  o[0] = x;\n}\n'
    )
    with pytest.raises(NVRTCError, match=r"broken\.cu\(3\)"):
        compile_to_ptx(bad, "compute_80", [KERNELS])
