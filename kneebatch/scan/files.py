"""Scan reading, the file itself: what can be told of an image file before and around SimpleITK's
read (it exists, is not empty, holds the voxels its NIfTI header promises, no NaN), and a time limit
on reads that may hang."""

from __future__ import annotations

import gzip
import math
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from kneebatch.errors import InputImageError
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.scan.timeout import call_with_timeout


def input_error(spec: SubjectSpec, role: str, path: Path, problem: str, fix: str) -> InputImageError:
    """The error for one input file: subject, role, path, what is wrong, what to do."""
    return InputImageError(f"Subject {spec.subject_id}: {role} {path}: {problem}. {fix}")


def _gzip_trailer_size(path: Path) -> int:
    """The gzip trailer's ISIZE: the uncompressed size mod 2**32 (of the last member)."""
    with path.open("rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return int.from_bytes(fh.read(4), "little")


def _nifti_data(path: Path, offset: int) -> tuple[bytes, str] | None:
    """The voxel bytes of a NIfTI file and their byte order (None if the gzip stream is damaged)."""
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            header_size = int.from_bytes(fh.read(4), "little")  # 348 (NIfTI-1) or 540 (NIfTI-2)
            fh.seek(offset)
            return fh.read(), "<" if header_size in (348, 540) else ">"
    except (OSError, EOFError, zlib.error):
        return None


def _check_nifti(spec: SubjectSpec, role: str, path: Path, *, scan_values: bool) -> None:
    """Checks ITK's NIfTI reader skips: it reads a truncated file without complaint (the missing
    voxels become 0) and turns NaN and inf into 0.

    Args:
        scan_values: also look for NaN/inf in float data (reads the voxels); without it only the
            file's length is checked (the gzip trailer, or the file size), as a header read should.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
        voxels = math.prod(int(meta[f"dim[{i}]"]) for i in range(1, int(meta["dim[0]"]) + 1))
        offset, datatype = int(float(meta["vox_offset"])), int(meta["datatype"])
        expected = voxels * int(meta["bitpix"]) // 8
    except (RuntimeError, KeyError, ValueError):
        return  # unreadable headers are reported by the full read
    floats = {16: "f4", 64: "f8"}.get(datatype) if scan_values else None
    data = None
    if path.name.endswith(".gz"):
        if floats or _gzip_trailer_size(path) != (offset + expected) % 2**32:
            data = _nifti_data(path, offset)  # damaged, multi-member, or float data to scan
            complete = data is not None and len(data[0]) >= expected
        else:
            complete = True
    else:
        complete = path.stat().st_size >= offset + expected
        if floats and complete:
            data = _nifti_data(path, offset)
    if not complete:
        raise input_error(spec, role, path, "is truncated (it holds less voxel data than its header "
                    "promises)", "Copy or export the file again.")
    if floats and data is not None:
        values = np.frombuffer(data[0], dtype=data[1] + floats, count=voxels)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise input_error(spec, role, path, f"holds {bad} NaN or infinite voxels",
                        "Fix the export (NaN is not a HU value) or replace them, e.g. with -1000.")


def check_file(spec: SubjectSpec, role: str, path: Path, *, scan_values: bool) -> None:
    """What can be told before SimpleITK reads: the path exists, is not empty, is a whole NIfTI."""
    if not path.exists():
        raise input_error(spec, role, path, "does not exist",
                    "Check the manifest's path (relative paths start at the manifest's folder).")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise input_error(spec, role, path, "is not a regular file (a pipe, socket or device)",
                    "Point the manifest at the image file itself.")
    if path.is_file() and path.stat().st_size == 0:
        raise input_error(spec, role, path, "is an empty file", "Export the image again.")
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti(spec, role, path, scan_values=scan_values)


SPACING_MM = (0.05, 20.0)  # plausible voxel sizes of a knee CT; outside: a broken header


def check_volume(spec: SubjectSpec, role: str, path: Path, size: tuple[int, ...],
                  components: int, spacing: tuple[float, ...] = (1.0,)) -> None:
    """A 3D volume of at least 2 voxels per axis, one value per voxel, of a plausible voxel
    size (a spacing of 1e-6 mm would make the anti-aliasing filter run for hours)."""
    if len(size) != 3 or min(size) < 2:
        raise input_error(spec, role, path, f"is a {len(size)}D image of size {size}, not a 3D volume",
                    "Give the whole 3D scan (one time point, at least 2 slices).")
    if components != 1:
        raise input_error(spec, role, path, f"has {components} components per voxel",
                    "Give a scalar (grey-value) image, not RGB or vector data.")
    low, high = SPACING_MM
    if not all(low <= s <= high for s in spacing):
        shown = " x ".join(f"{s:g}" for s in spacing)
        raise input_error(spec, role, path, f"has a voxel size of {shown} mm, outside "
                          f"{low:g}-{high:g} mm", "Its header is probably wrong (pixdim, or "
                          "spacing in m or um): fix it, e.g. with SimpleITK's SetSpacing.")


def timed(fn: Any, spec: SubjectSpec, role: str, path: Path, timeout_s: float) -> Any:
    """``fn(spec, role, path)`` within ``timeout_s``; a read that hangs fails the subject."""
    try:
        return call_with_timeout(fn, timeout_s, spec, role, path)
    except TimeoutError as exc:
        raise input_error(spec, role, path, f"gave no answer within {timeout_s:g} s (a hung network "
                    "mount?)", "Check the file system it lives on, or raise --read-timeout."
                    ) from exc
