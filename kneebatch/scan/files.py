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


def unreadable(spec: SubjectSpec, role: str, path: Path, exc: RuntimeError) -> InputImageError:
    """The error for a file SimpleITK cannot read, with the last line of SimpleITK's reason."""
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return input_error(spec, role, path, f"cannot be read as an image ({reason})", "Give a NIfTI, "
                       "NRRD, MHA file or a DICOM folder; if it is truncated, copy or export it "
                       "again.")


CHUNK_BYTES = 1 << 22  # voxel data is streamed in pieces this large: memory stays bounded


def _gzip_trailer_size(path: Path) -> int:
    """The gzip trailer's ISIZE: the uncompressed size mod 2**32 (of the last member)."""
    with path.open("rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return int.from_bytes(fh.read(4), "little")


def _bgzf_size(path: Path) -> int | None:
    """The uncompressed size of a BGZF file (bgzip's blocked gzip), summed from each block's
    header and trailer without inflating anything; None if the file is not BGZF or is cut short."""
    total = 0
    size = path.stat().st_size
    with path.open("rb") as fh:
        position = 0
        while position < size:
            fh.seek(position)
            head = fh.read(18)
            # gzip magic, deflate, FEXTRA; XLEN 6; subfield 'BC' of length 2 holding BSIZE - 1
            if len(head) < 18 or head[:4] != b"\x1f\x8b\x08\x04" or head[12:16] != b"BC\x02\x00":
                return None
            block = int.from_bytes(head[16:18], "little") + 1
            if position + block > size:
                return None
            fh.seek(position + block - 4)
            total += int.from_bytes(fh.read(4), "little")
            position += block
    return total


def _stream(path: Path, offset: int, expected: int, dtype: str | None) -> tuple[int, int] | None:
    """Read a NIfTI's voxel data in bounded pieces, up to ``expected`` bytes.

    Returns:
        The bytes found (at most ``expected``) and, with a float ``dtype``, how many of the values
        are NaN or infinite; None when the gzip stream is damaged.
    """
    found = bad = 0
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            header_size = int.from_bytes(fh.read(4), "little")  # 348 (NIfTI-1) or 540 (NIfTI-2)
            order = "<" if header_size in (348, 540) else ">"
            fh.seek(offset)
            while found < expected:
                piece = fh.read(min(CHUNK_BYTES, expected - found))
                if not piece:
                    break
                if dtype:
                    values = np.frombuffer(piece, dtype=order + dtype,
                                           count=len(piece) // np.dtype(dtype).itemsize)
                    bad += int(np.count_nonzero(~np.isfinite(values)))
                found += len(piece)
    except (OSError, EOFError, zlib.error):
        return None
    return found, bad


def _check_nifti(spec: SubjectSpec, role: str, path: Path, *, scan_values: bool) -> None:
    """Checks ITK's NIfTI reader skips: it reads a truncated file without complaint (the missing
    voxels become 0) and turns NaN and inf into 0. Memory stays bounded whatever the header says.

    Args:
        scan_values: also look for NaN/inf in float data (reads the voxels); without it only the
            file's length is checked: from the file size, the gzip trailer or a BGZF file's block
            framing, else (a truncated or plain multi-member gzip) by inflating up to the size the
            header promises, piece by piece.
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
    total = offset + expected
    if path.name.endswith(".gz"):
        known = total if _gzip_trailer_size(path) == total % 2**32 else _bgzf_size(path)
    else:
        known = path.stat().st_size
    complete = known is not None and known >= total
    bad = 0
    if floats or known is None:
        streamed = _stream(path, offset, expected, floats)
        complete = streamed is not None and streamed[0] >= expected
        bad = streamed[1] if streamed else 0
    if not complete:
        raise input_error(spec, role, path, "is truncated (it holds less voxel data than its header "
                    "promises)", "Copy or export the file again.")
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
