"""Real abdominal CT test fixture, fetched on demand from the TotalSegmentator sdist.

Data: the small example CT shipped in the test suite of TotalSegmentator
(Wasserthal et al., "TotalSegmentator: robust segmentation of 104 anatomic structures in CT
images", Radiology: AI 2023; https://github.com/wasserth/TotalSegmentator), distributed under
the Apache-2.0 license as part of the ``totalsegmentator==2.18.0`` source distribution on PyPI.

* ``example_ct_sm.nii.gz``: 122 x 101 x 30 int16 abdominal CT, 3 mm isotropic, RAS.
* ``example_seg.nii.gz``: same grid, uint8 label map with TotalSegmentator "total" task ids
  (``TOTALSEG_LABELS`` names the abdominal organs we use; ~40 other structures are labelled
  too). The masks are the tool's own predictions (its reference outputs), not manual
  annotations.

Nothing is vendored into this repository: the sdist is downloaded with pip (once), checked
against a pinned sha256, and only the two NIfTI members are extracted into a cache directory
(``$SYNTHGEN_TEST_CACHE``, else ``~/.cache/synthgen-tests``).  To work offline, put
``totalsegmentator-2.18.0.tar.gz`` (the same file) into the cache directory beforehand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = ["TOTALSEG_LABELS", "RealDataError", "default_cache_dir", "totalseg_example"]

TOTALSEG_LABELS = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
}

_VERSION = "2.18.0"
_SDIST_NAME = f"totalsegmentator-{_VERSION}.tar.gz"
_SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_MEMBER_DIR = f"totalsegmentator-{_VERSION}/tests/reference_files"
# file name -> sha256 of the extracted member (from the pinned sdist above)
_MEMBERS = {
    "example_ct_sm.nii.gz": "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
    "example_seg.nii.gz": "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
}
_PIP_TIMEOUT_S = 900


class RealDataError(RuntimeError):
    """The real-data fixture could not be fetched or failed verification."""


def default_cache_dir() -> Path:
    env = os.environ.get("SYNTHGEN_TEST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "synthgen-tests"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_valid(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256(path) == sha256


def _check_archive(archive: Path) -> None:
    digest = _sha256(archive)
    if digest != _SDIST_SHA256:
        raise RealDataError(
            f"sha256 mismatch for {archive}: expected {_SDIST_SHA256}, got {digest}. "
            "The file is not the pinned totalsegmentator sdist; delete it and retry."
        )


def _download_sdist(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        f"totalsegmentator=={_VERSION}",
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RealDataError(f"could not run {' '.join(cmd)}: {exc}") from exc
    archive = dest / _SDIST_NAME
    if proc.returncode != 0 or not archive.is_file():
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RealDataError(
            f"pip download of totalsegmentator=={_VERSION} failed "
            f"(exit {proc.returncode}); is PyPI reachable?\n{tail}"
        )
    return archive


def _extract_member(tf: tarfile.TarFile, name: str, sha256: str, out: Path) -> None:
    """Extract one regular-file member to ``out`` atomically; never trusts member paths."""
    try:
        member = tf.getmember(f"{_MEMBER_DIR}/{name}")
    except KeyError as exc:
        raise RealDataError(f"{name} not found in {_SDIST_NAME}") from exc
    if not member.isreg():
        raise RealDataError(f"{member.name} in {_SDIST_NAME} is not a regular file")
    src = tf.extractfile(member)
    if src is None:
        raise RealDataError(f"cannot read {member.name} from {_SDIST_NAME}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = _sha256(tmp)
        if digest != sha256:
            raise RealDataError(f"sha256 mismatch for extracted {name}: {digest}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def totalseg_example(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Return ``(ct_path, seg_path)`` of the TotalSegmentator example CT and its label map.

    Downloads the pinned ``totalsegmentator==2.18.0`` sdist with pip only when the two files
    are not already cached (a ~38 MB download), verifies its sha256, and extracts just the
    two members. Raises ``RealDataError`` on download failure or checksum mismatch.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out_dir = cache / f"totalsegmentator-{_VERSION}"
    paths = {name: out_dir / name for name in _MEMBERS}
    missing = {n: s for n, s in _MEMBERS.items() if not _is_valid(paths[n], s)}
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache) as tmp:
            archive = cache / _SDIST_NAME  # optional pre-seeded copy for offline use
            if not archive.is_file():
                archive = _download_sdist(Path(tmp))
            _check_archive(archive)
            out_dir.mkdir(exist_ok=True)
            with tarfile.open(archive, "r:gz") as tf:
                for name, sha256 in missing.items():
                    _extract_member(tf, name, sha256, paths[name])
    return paths["example_ct_sm.nii.gz"], paths["example_seg.nii.gz"]
