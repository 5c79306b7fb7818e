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

``--per-element`` (needs the SASS tools) also counts the code of one element of the hot
loops, on the paths of ``gpu_check``'s bandwidth batch (``liver-classic``: no appearance
modes; an int16 image; rows without and with merge partners): each path's kernel compiled
alone (``PATHS``: the other branches edited out of a copy of the source), the SASS
instructions from one element's store of its output to the next element's, in the loop
unrolled four elements a step (the median of those distances; a tumor's voxel out of
reach skips some of it), and how many copies of the four elements the compiler made of the
loop (unswitched on a row's constant, or its first step peeled).

Usage::

    PYTHONPATH=. python benchmarks/count_sass.py [--rev REV] [--arch 90] [--per-element]
                                                [--kernel sg_seg_blend ...] [--json FILE]
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, count_script_main, ensure_root_on_path, markdown_table

ensure_root_on_path("tests")

import _nvrtc  # noqa: E402  (tests/_nvrtc.py: the NVRTC wheel, found and driven by ctypes)
from ncu_regions import opcode  # noqa: E402

SOURCE = "segmented.cu"
KERNELS = ("sg_seg_blend", "sg_seg_apply")

# (the write-back's typed loop for int16 alone: its dispatch on the dtype code, written out
# up to this tree's SG_AS_CODE, by the int16 case)
_I16 = [
    (r"switch \(code\) \{.*?\n    \}\n|SG_AS_CODE\(code, SG_APPLY_AS\);\n", "SG_APPLY_AS(short);\n")
]
#: ``--per-element``'s paths: (name, kernel, the mnemonic of its element's output store,
#: edits of the source: (regular expression, replacement), each required to match once)
PATHS = (
    ("blend, no appearance modes", "sg_seg_blend", "STG.E",
     [(r"if \(app\) \{  // appearance", "if (0) {  // appearance")]),
    ("write-back, int16 image, no merge partners", "sg_seg_apply", "ST.E.U16",
     [*_I16, (r"if \(np == 0\)  ", "if (1)  ")]),
    ("write-back, int16 image, cached merge partners", "sg_seg_apply", "ST.E.U16",
     [*_I16, (r"if \(np == 0\)  ", "if (0)  "),
      (r"else if \(ov\[15\] >= 0\)  ", "else if (1)  ")]),
)  # fmt: skip


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


def _sass(cubin: bytes, kernel: str, addresses: bool = False) -> list | None:
    """The SASS instructions of ``kernel`` (None without cuobjdump and nvdisasm); with
    ``addresses``, ``(byte address, instruction)`` pairs."""
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if not (cuobjdump and nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ['PATH']}"}
        out = subprocess.run([cuobjdump, "-sass", "-fun", kernel, str(f)], env=env, check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
    found = [re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]*)", line) for line in out.splitlines()]
    pairs = [(int(m.group(1), 16), m.group(2).strip()) for m in found if m]
    return pairs if addresses else [ins for _, ins in pairs]


def per_element(kernels_dir: Path, tree: str, arch: str) -> list[dict]:
    """``PATHS``' counts for ``kernels_dir``'s source (see the module docstring)."""
    rows = []
    for name, kernel, store, edits in PATHS:
        with tempfile.TemporaryDirectory() as d:
            shutil.copytree(kernels_dir, d, dirs_exist_ok=True)
            src = Path(d) / SOURCE
            text = src.read_text()
            for pattern, repl in edits:
                text, n = re.subn(pattern, repl, text, flags=re.S)
                if n != 1:
                    raise SystemExit(f"count_sass: {pattern!r} matches {n} times in {tree}")
            src.write_text(text)
            _, cubin, _ = _nvrtc.compile_to_cubin(src, f"sm_{arch}", [Path(d)], _lib())
        sass = _sass(cubin, kernel, addresses=True)
        if sass is None:
            raise SystemExit("count_sass: --per-element needs cuobjdump and nvdisasm")
        at = [a for a, ins in sass if re.sub(r"^@!?\w+\s+", "", ins).split()[0] == store]
        gaps = [(b - a) // 16 for a, b in itertools.pairwise(at)]
        rows.append({"tree": tree, "path": name,
                     "per_element": statistics.median(gaps) if gaps else None,
                     "copies": len(at) / 4})  # fmt: skip
    return rows


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
    rows, paths = [], []
    with tempfile.TemporaryDirectory() as d:
        trees = [(ROOT / "kernels", "this tree")]
        if args.rev:
            tar = Path(d) / "k.tar"
            subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), args.rev,
                            "kernels"], check=True)  # fmt: skip
            subprocess.run(["tar", "-xf", str(tar), "-C", d], check=True)
            trees.insert(0, (Path(d) / "kernels", args.rev))
        for kdir, tree in trees:
            rows += count(kdir, tree, args.kernel, args.arch)
            if args.per_element:
                paths += per_element(kdir, tree, args.arch)
    if paths:
        print()
        print(markdown_table({
            "title": "SASS instructions of one element of the fused kernels' loops (sm_"
                     f"{args.arch}; see --per-element)",
            "columns": ["tree", "path", "instructions per element", "copies of the step"],
            "rows": [[p["tree"], p["path"], p["per_element"], p["copies"]] for p in paths],
        }))  # fmt: skip
    return rows


def main() -> int:
    def add_args(ap) -> None:
        ap.add_argument("--rev", help="also count a git revision's kernels/")
        ap.add_argument("--arch", default="90", help="compute capability, e.g. 80 or 90")
        ap.add_argument("--kernel", nargs="+", default=list(KERNELS))
        ap.add_argument(
            "--per-element",
            action="store_true",
            help="also count one element of the hot loops' paths (PATHS)",
        )

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
