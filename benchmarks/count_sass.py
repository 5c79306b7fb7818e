"""Static instruction counts of the fused kernels, compiled as CuPy compiles them (NVRTC).

No GPU needed, and no timing: what the compiler makes of ``kernels/segmented.cu``, for the
kernels named (default the fused blend and write-back), for this tree and optionally a git
revision's ``kernels/`` (``--rev``), per kernel:

* PTX (of the same ``sm_XX`` compile): instructions, of them float64 ones (``.f64``) and
  conversions to or from float64 (``cvt`` with ``.f64``), divisions and reciprocals;
* machine code (``sm_XX``, ptxas inside NVRTC): registers and spilled bytes;
* SASS, where ``cuobjdump`` and ``nvdisasm`` are found (on ``PATH``, or the pip wheels
  ``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm``, ``nvidia/cu13/bin``): instructions
  and the most frequent opcodes.

Static counts: a loop body counts once (the kernels' loops are unrolled SG_ILP = 4 times),
every branch counts whatever share of warps takes it, so a change shows here as what it
removes from a path, not as time. The GPU's own figures are gpu_check's bandwidth table and
the Nsight Compute profile of ``benchmarks/gpu_session.sh``.

Usage::

    PYTHONPATH=. python benchmarks/count_sass.py [--rev REV] [--arch 90]
                                                [--kernel sg_seg_blend ...] [--json FILE]
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, count_script_main, ensure_root_on_path

ensure_root_on_path("tests")

import _nvrtc  # noqa: E402  (tests/_nvrtc.py: the NVRTC wheel, found and driven by ctypes)
from ncu_regions import opcode  # noqa: E402

SOURCE = "segmented.cu"
KERNELS = ("sg_seg_blend", "sg_seg_apply")


def _lib() -> str | None:
    """The newest NVRTC found (CuPy 14 on the GPU machine compiles with CUDA 13's)."""
    libs = _nvrtc.find_libnvrtcs()
    return libs.get("nvrtc13") or libs.get("nvrtc12") or next(iter(libs.values()), None)


def _tool(name: str) -> str | None:
    """``name`` on PATH, else in an NVIDIA pip wheel's ``bin`` folder beside the NVRTC one."""
    found = shutil.which(name)
    if found:
        return found
    for entry in sys.path:
        for sub in ("nvidia/cu13/bin", "nvidia/cuda_cuobjdump/bin", "nvidia/cuda_nvdisasm/bin"):
            p = Path(entry) / sub / name
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def _entry(ptx: str, kernel: str) -> list[str]:
    """The PTX instructions of ``kernel``'s entry (its body up to the closing brace), each
    without its predicate guard (``@%p1 bra ...`` is ``bra ...``)."""
    at = ptx.find(f".entry {kernel}(")
    if at < 0:
        raise SystemExit(f"count_sass: no kernel {kernel!r} in {SOURCE}")
    body = ptx[at : ptx.index("\n}\n", at)]
    return [re.sub(r"^@!?%\w+\s+", "", line.strip()) for line in body.splitlines()
            if ";" in line and not line.strip().startswith(("//", ".", "$", "{", "}"))]  # fmt: skip


def _sass(cubin: bytes, kernel: str) -> list[str] | None:
    """The SASS instructions of ``kernel`` (None without cuobjdump and nvdisasm)."""
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if not (cuobjdump and nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ['PATH']}"}
        out = subprocess.run([cuobjdump, "-sass", "-fun", kernel, str(f)], env=env, check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
    return [re.sub(r"^\s*/\*[0-9a-f]+\*/\s+", "", line).split(";")[0]
            for line in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]  # fmt: skip


def count(kernels_dir: Path, tree: str, kernels, arch: str) -> list[dict]:
    source = kernels_dir / SOURCE
    ptx, cubin, regs = _nvrtc.compile_to_cubin(source, f"sm_{arch}", [kernels_dir], _lib())
    rows = []
    for k in kernels:
        ins = _entry(ptx, k)
        f64 = [i for i in ins if ".f64" in i]
        sass = _sass(cubin, k)
        ops = collections.Counter(opcode(i) for i in sass) if sass is not None else None
        rows.append({
            "tree": tree,
            "kernel": k,
            "ptx": len(ins),
            "ptx_f64": len(f64),
            "ptx_cvt_f64": sum(i.startswith("cvt") for i in f64),
            "ptx_div_rcp": sum(i.startswith(("div", "rcp")) for i in ins),
            "registers": regs[k].get("registers"),
            "spilled": regs[k].get("spill_stores", 0) + regs[k].get("spill_loads", 0),  # (bytes)
            "sass": len(sass) if sass is not None else None,
            "top": ", ".join(f"{o} {n}" for o, n in ops.most_common(8)) if ops else "-",
        })  # fmt: skip
    return rows


def run(args) -> list[dict]:
    rows = []
    if args.rev:
        with tempfile.TemporaryDirectory() as d:
            tar = Path(d) / "k.tar"
            subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), args.rev,
                            "kernels"], check=True)  # fmt: skip
            subprocess.run(["tar", "-xf", str(tar), "-C", d], check=True)
            rows += count(Path(d) / "kernels", args.rev, args.kernel, args.arch)
    rows += count(ROOT / "kernels", "this tree", args.kernel, args.arch)
    return rows


def main() -> int:
    def add_args(ap) -> None:
        ap.add_argument("--rev", help="also count a git revision's kernels/")
        ap.add_argument("--arch", default="90", help="compute capability, e.g. 80 or 90")
        ap.add_argument("--kernel", nargs="+", default=list(KERNELS))

    columns = ["tree", "kernel", "PTX", "PTX f64", "PTX cvt f64", "PTX div/rcp", "registers",
               "spill stores + loads, bytes", "SASS", "most frequent SASS opcodes"]  # fmt: skip

    def cells(r: dict) -> list:
        sass = "-" if r["sass"] is None else r["sass"]
        return [r["tree"], r["kernel"], r["ptx"], r["ptx_f64"], r["ptx_cvt_f64"],
                r["ptx_div_rcp"], r["registers"], r["spilled"], sass, r["top"]]  # fmt: skip

    return count_script_main(
        __doc__,
        run,
        "Static instruction counts of the fused kernels (NVRTC; no GPU)",
        columns,
        cells,
        add_args,
    )


if __name__ == "__main__":
    raise SystemExit(main())
