"""NIfTI input/output: fast whole-file loads, parallel gzip, atomic writes.

Loads keep the on-disk (Fortran) voxel order, so nothing is transposed on the way in or out:
for a 512x512x256 int16 scan a transpose costs more than the gzip decode. Writes stream a
deterministic, multi-threaded gzip member (independent deflate chunks, as ``pigz -i`` does)
into a temporary file in the target folder, which is then renamed: a reader never sees a
partial file, and the bytes do not depend on the number of threads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np

from ._pool import _threads as _pool_threads

__all__ = [
    "atomic_write_bytes",
    "atomic_writer",
    "gzip_chunks",
    "load_nifti",
    "nifti_bytes",
    "save_json",
    "save_nifti",
]

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_CHUNK = 1 << 22  # 4 MiB of input per independent deflate chunk
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _threads() -> int:
    env = os.environ.get("SYNTHGEN_IO_THREADS")
    return max(1, int(env)) if env else min(8, _pool_threads())


def _executor() -> ThreadPoolExecutor | None:
    global _pool, _pool_pid
    n = _threads()
    if n == 1:
        return None
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid() or _pool._max_workers != n:
            _pool = ThreadPoolExecutor(n, thread_name_prefix="synthgen-gzip")
            _pool_pid = os.getpid()
        return _pool


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed to ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_writer(path) as f:
        f.write(data)


def save_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _deflate(chunk: memoryview, level: int, last: bool) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
    return c.compress(chunk) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def gzip_chunks(parts: list[memoryview], level: int = 1) -> Iterator[bytes]:
    """Yield one gzip member holding the concatenation of ``parts``, compressed in parallel.

    The input is cut into fixed 4 MiB chunks, each deflated independently on the I/O thread
    pool (``SYNTHGEN_IO_THREADS``, default: synthgen's thread count, at most 8), so the output is
    identical for any thread count. Standard ``gunzip``/``gzip``/nibabel read it.
    """
    chunks: list[memoryview | bytes] = []
    pending = b""  # small parts (headers) are joined to the chunk that follows
    for part in parts:
        v = memoryview(part).cast("B")
        if v.nbytes <= _CHUNK:
            pending += bytes(v)
            continue
        if pending:
            chunks.append(pending)
            pending = b""
        chunks.extend(v[i : i + _CHUNK] for i in range(0, v.nbytes, _CHUNK))
    if pending or not chunks:
        chunks.append(pending)
    crc, size = 0, 0
    for c in chunks:
        crc = zlib.crc32(c, crc)
        size += len(c)
    xfl = 4 if level == 1 else 2 if level == 9 else 0
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 255])
    n = len(chunks)
    ex = _executor()
    if ex is None or n == 1:
        for i, c in enumerate(chunks):
            yield _deflate(c, level, i == n - 1)
    else:
        yield from ex.map(_deflate, chunks, [level] * n, [i == n - 1 for i in range(n)])
    yield struct.pack("<II", crc, size & 0xFFFFFFFF)


def _disk_dtype(array: np.ndarray, header: Any) -> tuple[np.ndarray, float, float]:
    """Array to store, slope, intercept: float data of a scaled integer input goes back to it."""
    if header is None or array.dtype.kind != "f":
        return array, np.nan, np.nan
    disk = np.dtype(header.get_data_dtype())
    slope, inter = header.get_slope_inter()
    if disk.kind not in "iu":
        return array, np.nan, np.nan
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    info = np.iinfo(disk)
    raw = np.empty(array.shape, dtype=disk.newbyteorder("="), order="F")
    np.clip(np.rint((array - inter) / slope), info.min, info.max, out=raw, casting="unsafe")
    scaled = not (slope == 1.0 and inter == 0.0)
    return raw, (slope if scaled else np.nan), (inter if scaled else np.nan)


def nifti_bytes(
    array: np.ndarray, affine: np.ndarray, header: Any = None
) -> tuple[bytes, memoryview]:
    """``(header_block, voxel_bytes)`` of a single-file NIfTI image (no copy when the array
    is Fortran-contiguous, as loaded): NIfTI-2 when ``header`` is a NIfTI-2 header, else
    NIfTI-1.

    With a reference ``header`` whose geometry is ``affine``, its sform and qform and their
    codes are kept as they are (a missing qform stays missing); otherwise the sform holds
    ``affine`` and no qform is written. Voxel units, intent and description are kept (the
    display window ``cal_min``/``cal_max`` only for data of the reference's dtype); float
    data of an input stored as scaled integers is stored back as that integer type with the
    same slope and intercept.
    """
    array, slope, inter = _disk_dtype(np.asarray(array), header)
    if array.dtype.byteorder == ">" or array.dtype == np.bool_:
        array = array.astype(np.uint8 if array.dtype == np.bool_ else array.dtype.newbyteorder("="))
    # Nifti2Header subclasses Nifti1Header: the class must follow the reference header (a
    # 540-byte NIfTI-2 block does not fit a 348-byte NIfTI-1 header, nor the reverse).
    klass = nib.Nifti2Header if isinstance(header, nib.Nifti2Header) else nib.Nifti1Header
    hdr = klass()
    if isinstance(header, nib.Nifti1Header):
        hdr = klass(header.binaryblock, endianness=header.endianness, check=False)
        if hdr.endianness != nib.volumeutils.native_code:
            hdr = hdr.as_byteswapped(nib.volumeutils.native_code)
    hdr.set_data_shape(array.shape)
    hdr.set_data_dtype(array.dtype)
    if isinstance(header, nib.Nifti1Header):
        ref = np.dtype(header.get_data_dtype()).newbyteorder("=")
        if ref != array.dtype:
            # Other data on the reference's grid (a label map, a mask on the CT's header):
            # the CT's display window (cal_min/cal_max, e.g. -1024..3071) is not theirs, and
            # viewers that honour it showed a 0/1/2 label map all black. 0/0 is "unset".
            hdr["cal_min"], hdr["cal_max"] = 0.0, 0.0
    best = header.get_best_affine() if isinstance(header, nib.Nifti1Header) else None
    if best is None or not np.allclose(best, affine, rtol=0, atol=1e-6):
        # New geometry (or none to keep): the sform carries it exactly; a qform cannot hold
        # shear, so it is dropped rather than left contradicting the sform.
        hdr.set_sform(affine, int(header["sform_code"]) if best is not None else 2)
        if int(hdr["sform_code"]) == 0:
            hdr.set_sform(affine, 2)
        hdr.set_qform(None, 0)
        zooms = nib.affines.voxel_sizes(np.asarray(affine, dtype=np.float64))
        hdr.set_zooms(tuple(zooms[: array.ndim]) + (1.0,) * max(0, array.ndim - 3))
    # else: the input's sform and qform (and their codes) are kept exactly as they were
    hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    # single-file magic and offset (header + 4 bytes of no extensions): n+1/352, n+2/544
    hdr["magic"], hdr["vox_offset"] = klass.single_magic, klass.single_vox_offset
    bio = io.BytesIO()
    hdr.write_to(bio)
    block = bio.getvalue()
    block += b"\0" * (int(hdr["vox_offset"]) - len(block))
    if array.ndim == 0 or array.size == 0:
        return block, memoryview(b"")
    f = array if array.flags.f_contiguous else np.asfortranarray(array)
    return block, memoryview(f.T).cast("B")


def save_nifti(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    header: Any = None,
    compresslevel: int = 1,
) -> None:
    """Atomically save a NIfTI image, keeping the reference header's geometry when given
    (NIfTI-2 when the reference header is NIfTI-2, else NIfTI-1).

    Args:
        path: Target ``.nii`` or ``.nii.gz`` path.
        array: Voxel data; its dtype is kept (bool is stored as uint8). Fortran-ordered
            arrays (as :func:`load_nifti` returns them) are written without a copy.
        affine: 4x4 voxel-to-world affine.
        header: Header of the input image: its NIfTI version, sform/qform codes, units and
            scaling are kept.
        compresslevel: gzip level for ``.nii.gz`` (1 is nibabel's default).
    """
    block, voxels = nifti_bytes(array, affine, header)
    with atomic_writer(path) as f:
        if str(path).endswith(".gz"):
            for piece in gzip_chunks([memoryview(block), voxels], compresslevel):
                f.write(piece)
        else:
            f.write(block)
            f.write(voxels)


def _gunzip(raw: bytes) -> bytes:
    """Decompress every member of a gzip file (RFC 1952 allows several: bgzip, pgzip and
    concatenated files write them, and gzip and nibabel read them all). Bytes after the last
    member that do not start another one (padding) are ignored, as before.

    The first member is given all the bytes at once (one call for the usual single-member
    file); later ones are fed in growing chunks from a view, so that the bytes left over
    after a member (``unused_data``, a copy) stay about a chunk long: thousands of bgzip
    members of 64 KB cost one pass over the file, not one copy of its rest per member.

    Raises:
        zlib.error: A corrupt or truncated member.
    """
    mv = memoryview(raw)
    n = len(raw)
    parts: list[bytes] = []
    pos = 0
    while raw[pos : pos + 2] == b"\x1f\x8b":
        d = zlib.decompressobj(wbits=47)
        step = n if pos == 0 else 1 << 16
        while True:
            end = min(n, pos + step)
            parts.append(d.decompress(mv[pos:end]))
            if d.eof:
                pos = end - len(d.unused_data)
                break
            if end >= n:
                raise zlib.error("incomplete or truncated stream")
            pos, step = end, 2 * step
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_image(path: Path) -> Any:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = _gunzip(raw)
        except zlib.error as e:
            raise ValueError(f"{path}: truncated or corrupt gzip data ({e})") from None
    if len(raw) < 348:
        raise ValueError(f"{path}: truncated NIfTI ({len(raw)} bytes, header needs 348)")
    sizeof = struct.unpack("<i", raw[:4])[0]
    if sizeof not in (348, 540):
        sizeof = struct.unpack(">i", raw[:4])[0]
    klass = nib.Nifti2Image if sizeof == 540 else nib.Nifti1Image
    return klass.from_bytes(raw)


def load_nifti(path: str | Path, *, dtype: Any = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """Load ``(array, affine, header)``; integer data without scaling keeps its dtype.

    The array keeps the file's voxel order (Fortran-contiguous, as NIfTI stores it): no
    transpose on load, none on :func:`save_nifti`. Scaled data loads as float32.

    Raises:
        ValueError: The file is missing, unreadable, truncated or not 3-D (message names it).
    """
    path = Path(path)
    try:
        img = _read_image(path) if path.suffix in (".gz", ".nii") else nib.load(str(path))
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
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a NIfTI file") from None
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read NIfTI ({e})") from None
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ValueError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    header = img.header
    if dtype is None and not (img.dataobj.slope == 1 and img.dataobj.inter == 0):
        # nibabel moves the scaling into the data proxy and blanks it in the header; put it
        # back, so that saving with this header stores the data as it was stored.
        header = header.copy()
        header.set_slope_inter(float(img.dataobj.slope), float(img.dataobj.inter))
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {data.shape}")
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("="))
    return data, img.affine, header
