"""Boolean volumes kept as bits on the host: what planning reads of GPU-resident masks.

Planning a tumor reads the organ mask many times (a slice per drawn centre, strided samples,
windows for the noise measurement, the box of the vessel check, the wall search of a hollow
organ). For a mask on a GPU each read was a copy back and a wait. Instead the organ's box is
binarised on the device, packed eight voxels a byte and copied back once
(:func:`pack_on_device`, one download of a 32nd of a float32 box); :class:`PackedMask` then
serves every read on the host, unpacking only the bytes a read touches. The same for the
image's tests against a threshold (the tissue window of a placement rule, the bright voxels
of the vessel check: ``synthgen._cuda.DeviceView``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pack_on_device(xp, m) -> tuple[Any, tuple[int, int, int]]:
    """Bool device array ``m`` (3-D) packed along its last axis, big bit order (NumPy's
    ``packbits(axis=-1)`` layout), as a flat uint8 device array, and ``m``'s shape. (CuPy's
    ``packbits`` packs the flattened array only: the last axis is padded to whole bytes
    first, so that the flat packing is the per-row one.)"""
    shape = tuple(int(n) for n in m.shape)
    if len(shape) != 3:
        raise ValueError(f"pack_on_device takes a 3-D array, got shape {shape}")
    n2 = shape[2]
    if n2 % 8:
        padded = xp.zeros((shape[0], shape[1], n2 + 8 - n2 % 8), dtype=xp.bool_)
        padded[:, :, :n2] = m
        m = padded
    return xp.packbits(m.ravel()), shape  # type: ignore[return-value]


def _axis_part(key, n: int, b0: int, b1: int):
    """One axis of a basic index ``key`` (int or slice) into an axis of length ``n`` whose
    set voxels lie in ``[b0, b1)``: ``(out_len or None for an int, (k0, k1) the part of the
    output inside the box, (j0, step) the box index of output k0 and the step)``."""
    if isinstance(key, slice):
        start, stop, step = key.indices(n)
        m = len(range(start, stop, step))
        if step > 0:
            k0 = max(0, -(-(b0 - start) // step))
            k1 = min(m, -(-(b1 - start) // step))
        else:  # descending: k0 is the first index below b1, k1 the first below b0
            k0 = max(0, -(-(start - (b1 - 1)) // -step))
            k1 = min(m, -(-(start - (b0 - 1)) // -step))
        k1 = max(k1, k0)
        return m, (k0, k1), (start + k0 * step - b0, step)
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):  # (None, np.bool_ too)
        raise IndexError(f"a PackedMask is read by ints and slices, got {key!r}")
    i = int(key)
    if i < -n or i >= n:
        raise IndexError(f"index {i} is out of bounds for axis with size {n}")
    i += n if i < 0 else 0
    inside = b0 <= i < b1
    return None, (0, 1 if inside else 0), (i - b0, 1)


def _span(j0: int, count: int, step: int) -> slice:
    """The slice of ``count`` indices from ``j0`` by ``step`` (``count >= 1``)."""
    stop = j0 + (count - 1) * step + (1 if step > 0 else -1)
    return slice(j0, stop if stop >= 0 else None, step)


class PackedMask:
    """A bool volume of ``shape`` that is False outside the box at ``origin`` of
    ``box_shape``, the box's voxels as bits (``packed``: ``box_shape``'s rows packed along the
    last axis, big bit order, flat). Reads by basic indexing (ints and slices, with steps,
    any sign) return NumPy bool arrays, as NumPy would from the whole volume; a read
    unpacks only the bytes it touches."""

    dtype = np.dtype(bool)
    ndim = 3

    def __init__(self, shape, origin, box_shape, packed: np.ndarray) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.origin = tuple(int(o) for o in origin)
        self.box_shape = tuple(int(n) for n in box_shape)
        n0, n1, n2 = self.box_shape
        nbytes = -(-n2 // 8)
        packed = np.asarray(packed, dtype=np.uint8)
        if packed.size != n0 * n1 * nbytes:
            need = n0 * n1 * nbytes
            raise ValueError(
                f"{packed.size} packed bytes for a box of {self.box_shape} (need {need})"
            )
        self._bits = packed.reshape(n0, n1, nbytes)
        for a in range(3):
            if not 0 <= self.origin[a] <= self.origin[a] + self.box_shape[a] <= self.shape[a]:
                raise ValueError(f"box at {self.origin} of {self.box_shape} leaves {self.shape}")

    def _key(self, key) -> tuple:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        if len(key) > 3:
            raise IndexError(f"too many indices for a 3-D mask: {len(key)}")
        return key + (slice(None),) * (3 - len(key))

    def __getitem__(self, key) -> np.ndarray:
        frame = zip(self._key(key), self.shape, self.origin, self.box_shape, strict=True)
        parts = [_axis_part(k, n, o, o + b) for k, n, o, b in frame]
        out = np.zeros(tuple(1 if m is None else m for m, _, _ in parts), dtype=bool)
        if all(k1 > k0 for _, (k0, k1), _ in parts):
            (c0, c1, c2) = (k1 - k0 for _, (k0, k1), _ in parts)
            (j0, s0), (j1, s1), (j2, s2) = (p[2] for p in parts)
            # the bytes of the last axis the read touches, unpacked, then its bits selected
            last = j2 + (c2 - 1) * s2
            b = min(j2, last) // 8
            rows = self._bits[_span(j0, c0, s0), _span(j1, c1, s1), b : max(j2, last) // 8 + 1]
            bits = np.unpackbits(rows, axis=-1)[:, :, _span(j2 - 8 * b, c2, s2)]
            out[tuple(slice(k0, k1) for _, (k0, k1), _ in parts)] = bits.view(bool)
        return out[tuple(0 if m is None else slice(None) for m, _, _ in parts)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype)


# ------------------------------------------------------------------------------------------
# planning's reads of its inputs: NumPy arrays read directly, device views
# (synthgen._cuda.DeviceView) asked to answer on the device; the same values either way


def all_finite(image, key) -> bool:
    """Whether ``image[key]`` holds no NaN or infinity (True for integer images)."""
    if np.dtype(image.dtype).kind != "f":
        return True
    fn = getattr(image, "all_finite", None)
    if fn is not None:
        return bool(fn(key))
    return bool(np.isfinite(np.asarray(image[key])).all())


def regions(a, keys) -> list[np.ndarray]:
    """``[np.asarray(a[k]) for k in keys]``, in one copy back for a device view."""
    fn = getattr(a, "read_many", None)
    if fn is not None:
        return fn(keys)
    return [np.asarray(a[k]) for k in keys]


def above(image, key, value: float) -> np.ndarray:
    """``np.asarray(image[key]) > value`` (bool), tested on the device for a device view."""
    fn = getattr(image, "above", None)
    if fn is not None:
        return np.asarray(fn(key, value))
    return np.asarray(image[key]) > value
