"""The mass-effect warp of GPU data on the GPU (``kernels/mass_effect.cu``).

:func:`synthgen.mass_effect.prepare_render` warps the image and the label maps before a
render. For arrays on a GPU (CuPy arrays, torch CUDA tensors) each group's box went through
the host: copied back, warped by the numba kernel, copied up again. :func:`warp_on_device`
does it where the data are: per group of overlapping fields (``mass_effect._clusters``), a
copy of the image's box on the device, one launch of ``sg_me_warp`` (the numba kernel's
twin: the same warped box, bit for bit, as the host route gave) writing the image box in
place and, with label maps, the index of each moved voxel's label source, then per label map
a copy of its box and one launch of ``sg_me_gather``. The work is ordered on the stream
``synthgen._cuda`` renders on (torch's current stream for torch data), so the render that
follows sees it; nothing waits for the device.

Taken only when the image and every label map are on one GPU, the image's dtype is one the
kernels store (``_segments.dtype_code``; not bool), each label map's elements are 1, 2, 4 or
8 bytes (their bits are copied, so bool and any integer or float type) and every stride is a
whole number of elements; otherwise (and for torch tensors without CuPy) the host route.

The same bits as the host route, with two exceptions only a GPU shows: CuPy compiles with
``-ftz=true``, so a float32 image's subnormal values (and differences) read as zero; and an
int64 image's value clipped to the top of its range (2**63 as a float64) is stored
saturated, where the host's conversion wraps to the bottom.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["warp_on_device"]


def _device_of(img: Any, labs: list[Any]) -> int | None:
    """The GPU holding ``img`` and every one of ``labs`` (CuPy or torch CUDA), else None."""
    from ._device import _array_device, array_kind

    if array_kind(img) not in ("cupy", "torch-cuda"):
        return None
    dev = _array_device(img)
    if any(_array_device(lab) != dev for lab in labs):
        return None
    return dev


def _takes(img: Any, labs: list[Any]) -> bool:
    """Whether the kernels take these arrays (CuPy views): an image of a dtype they store,
    not bool (the host route stores a warped bool voxel as ``v != 0``, a cast would
    truncate), label maps of 1, 2, 4 or 8-byte elements, strides in whole elements."""
    from ._segments import dtype_code

    if img.dtype.kind == "b":
        return False
    try:
        dtype_code(img.dtype)
    except ValueError:
        return False
    if not all(lab.itemsize in (1, 2, 4, 8) for lab in labs):
        return False
    return all(s % a.itemsize == 0 for a in (img, *labs) for s in a.strides)


def warp_on_device(img: Any, labs: list[Any], fields: list, be=None) -> bool:
    """Warp ``img`` and ``labs`` in place by ``fields`` on their GPU; False (nothing done)
    where the device route does not take them (see the module docstring). ``be``: the
    backend (``synthgen._cuda.CupyBackend`` of their GPU by default; the test suite's host
    stand-in, with its device arrays)."""
    if not fields:
        return True
    arrays = [img, *labs]  # (as given: the stream of torch data is torch's)
    if be is None:
        dev = _device_of(img, labs)
        if dev is None:
            return False
        try:
            from ._cuda import _as_cupy, backend

            img, labs = _as_cupy(img), [_as_cupy(lab) for lab in labs]
        except ImportError:  # (torch CUDA tensors without CuPy: the host route)
            return False
        if not _takes(img, labs):
            return False
        be = backend(dev)
    elif not _takes(img, labs):
        return False
    from .mass_effect import _clusters

    with be.context(None, arrays):
        for group in _clusters(fields):
            _warp_group(be, img, labs, group)
    return True


#: Blocks of a launch at most (each thread walks the box in a grid stride).
_MAX_BLOCKS = 4096


def _warp_group(be, img, labs, group) -> None:
    from ._cuda import THREADS
    from ._segments import _address
    from .mass_effect import _bbox, _value_range

    bb = _bbox(group)
    box = img[bb]
    n = box.shape
    total = int(np.prod(n))  # (a group's box meets the scan: not empty)
    if total >= 2**31:
        raise ValueError("mass-effect box too large (more than 2**31 voxels)")
    # per field: centre in the box (as mass_effect._shifted makes it), metric, strength, reach
    prm = np.array(
        [[*(float(c - b.start) for c, b in zip(f.center_vox, bb, strict=True)),
          *np.asarray(f.metric, dtype=np.float64).reshape(9).tolist(),
          float(f.strength), float(f.reach)] for f in group],
        dtype=np.float64,
    )  # fmt: skip
    # the boxes' addresses and element strides (refused where not aligned to their elements)
    # before anything is written; the label maps' dtype codes are not needed (bits copied)
    i64, i32, f64 = np.int64, np.int32, np.float64
    dst, code, *ds = _address(be, box, 0, "image")
    lviews = [_address(be, lab[bb], 0, "label map", code=-1) for lab in labs]
    p_dev = be.upload(prm)
    # every source copied before anything is written (a label map given twice, or one that
    # is a view of another, reads the unwarped voxels, as on the host route)
    src = box.copy()  # (C order: the kernel's source, never a view of the box it writes)
    lsrcs = [lab[bb].copy() for lab in labs]
    nn = be.xp.empty(total if labs else 1, dtype=np.int32)
    threads = getattr(be, "threads", THREADS)  # (the stand-in's blocks: 1 or a few fibers)
    blocks = max(1, min(_MAX_BLOCKS, -(-total // (4 * threads))))
    lo, hi = _value_range(np.dtype(img.dtype))
    be.launch_flat(
        "sg_me_warp", blocks, i64(be.ptr(p_dev)), i32(len(group)), i32(n[0]), i32(n[1]),
        i32(n[2]), i64(be.ptr(src)), i64(dst), *map(i64, ds), i32(code),
        i32(np.dtype(img.dtype).kind in "iu"), f64(lo), f64(hi),
        i64(be.ptr(nn) if labs else 0), i32(blocks),
    )  # fmt: skip
    for (ldst, _, *lds), lsrc in zip(lviews, lsrcs, strict=True):
        be.launch_flat(
            "sg_me_gather", blocks, i64(be.ptr(lsrc)), i64(ldst), *map(i64, lds), i32(n[0]),
            i32(n[1]), i32(n[2]), i32(lsrc.itemsize), i64(be.ptr(nn)), i32(blocks),
        )  # fmt: skip
    # (the temporaries are freed once the launches are queued: CuPy's pool reuses them in
    # the order of the stream they were made on, the launches')
    del src, lsrcs, p_dev, nn
