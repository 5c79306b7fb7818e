"""NIfTI input/output with atomic writes (temporary name, then rename)."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["atomic_write_bytes", "load_nifti", "save_json", "save_nifti"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def save_nifti(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    header: nib.Nifti1Header | None = None,
    compresslevel: int = 6,
) -> None:
    """Atomically save a NIfTI image, keeping the reference header's geometry when given.

    Args:
        path: Target ``.nii`` or ``.nii.gz`` path.
        array: Voxel data; its dtype is kept (no scaling).
        affine: 4x4 voxel-to-world affine.
        header: Header of the input image: sform/qform codes and voxel sizes are kept.
        compresslevel: gzip level for ``.nii.gz``.
    """
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(array), affine, header=hdr)
    img.set_data_dtype(np.asarray(array).dtype)
    if header is not None:
        img.set_sform(affine, int(header["sform_code"]) or 1)
        img.set_qform(affine, int(header["qform_code"]) or 1)
    img.header["scl_slope"] = np.nan
    img.header["scl_inter"] = np.nan
    data = img.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=compresslevel, mtime=0)
    atomic_write_bytes(path, data)


def load_nifti(path: str | Path, *, dtype: Any = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """Load ``(array, affine, header)``; integer data without scaling keeps its dtype.

    Raises:
        ValueError: The file is missing, unreadable, truncated or not 3-D (message names it).
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        if dtype is None:
            slope, inter = img.dataobj.slope, img.dataobj.inter
            if slope == 1 and inter == 0:
                data = np.asanyarray(img.dataobj)
            else:
                data = img.get_fdata(dtype=np.float32)
        else:
            data = np.asarray(img.dataobj, dtype=dtype)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ValueError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {data.shape}")
    return np.ascontiguousarray(data), img.affine, img.header
