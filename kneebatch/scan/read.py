"""Input stage: read a CT and its label mask, check them, make the orientation canonical.

The only module that calls SimpleITK's readers. Reads NIfTI, NRRD, MHA (anything SimpleITK reads) and
DICOM series folders. Output is a ``Scan`` of numpy arrays in (z, y, x) order, LPS orientation (x
toward the patient's left, y posterior, z superior), left knees mirrored along x.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import logging
import math
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from kneebatch.config import ExtractionConfig
from kneebatch.errors import GeometryError, InputImageError
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.scan.bilateral import take_leg
from kneebatch.scan.timeout import call_with_timeout

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 300.0  # a file that gives no answer for this long fails its subject (--read-timeout)

SPACING_TOL_MM = 1e-3  # CT and mask spacings and origins may differ by this much (rounding)
ORIGIN_TOL_MM = 1e-3
DIRECTION_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Scan:
    """A CT and mask on one grid, canonical orientation.

    Attributes:
        subject_id: the subject.
        ct_hu: CT in HU, float32, (z, y, x).
        mask: labels, uint8, (z, y, x): 0 background, 1 tibia, 2 femur, 3 any other value
            (the subject's label map already applied).
        spacing_mm: voxel size (z, y, x).
        side: ``L``, ``R`` or None; ``L`` has been mirrored along x.
        source_orientation: the CT's orientation code as read (e.g. ``RAS``).
        warnings: what the user should know about this subject's inputs (kept in done.json).
        labels: the label map that made ``mask`` (for messages).
    """

    subject_id: str
    ct_hu: np.ndarray
    mask: np.ndarray
    spacing_mm: tuple[float, float, float]
    side: str | None
    source_orientation: str
    warnings: tuple[str, ...] = ()
    labels: LabelMap = dataclasses.field(default_factory=LabelMap)


@dataclasses.dataclass(frozen=True)
class Header:
    """Geometry of an image, read without its voxels."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel: str


def _fail(spec: SubjectSpec, role: str, path: Path, problem: str, fix: str) -> InputImageError:
    return InputImageError(f"Subject {spec.subject_id}: {role} {path}: {problem}. {fix}")


def _read_dicom_folder(spec: SubjectSpec, role: str, path: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise _fail(spec, role, path, "folder holds no DICOM series",
                    "Point the manifest at the folder of one DICOM series, or at an image file.")
    if len(series) > 1:
        raise _fail(spec, role, path, f"folder holds {len(series)} DICOM series "
                    f"({', '.join(series)})", "Move each series into its own folder and list the "
                    "one to use in the manifest.")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
    return reader.Execute()


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
        raise _fail(spec, role, path, "is truncated (it holds less voxel data than its header "
                    "promises)", "Copy or export the file again.")
    if floats and data is not None:
        values = np.frombuffer(data[0], dtype=data[1] + floats, count=voxels)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise _fail(spec, role, path, f"holds {bad} NaN or infinite voxels",
                        "Fix the export (NaN is not a HU value) or replace them, e.g. with -1000.")


def _check_file(spec: SubjectSpec, role: str, path: Path, *, scan_values: bool) -> None:
    """What can be told before SimpleITK reads: the path exists, is not empty, is a whole NIfTI."""
    if not path.exists():
        raise _fail(spec, role, path, "does not exist",
                    "Check the manifest's path (relative paths start at the manifest's folder).")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise _fail(spec, role, path, "is not a regular file (a pipe, socket or device)",
                    "Point the manifest at the image file itself.")
    if path.is_file() and path.stat().st_size == 0:
        raise _fail(spec, role, path, "is an empty file", "Export the image again.")
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti(spec, role, path, scan_values=scan_values)


def _check_volume(spec: SubjectSpec, role: str, path: Path, size: tuple[int, ...],
                  components: int) -> None:
    """A 3D volume of at least 2 voxels per axis, one value per voxel."""
    if len(size) != 3 or min(size) < 2:
        raise _fail(spec, role, path, f"is a {len(size)}D image of size {size}, not a 3D volume",
                    "Give the whole 3D scan (one time point, at least 2 slices).")
    if components != 1:
        raise _fail(spec, role, path, f"has {components} components per voxel",
                    "Give a scalar (grey-value) image, not RGB or vector data.")


def _timed(fn: Any, spec: SubjectSpec, role: str, path: Path, timeout_s: float) -> Any:
    """``fn(spec, role, path)`` within ``timeout_s``; a read that hangs fails the subject."""
    try:
        return call_with_timeout(fn, timeout_s, spec, role, path)
    except TimeoutError as exc:
        raise _fail(spec, role, path, f"gave no answer within {timeout_s:g} s (a hung network "
                    "mount?)", "Check the file system it lives on, or raise --read-timeout."
                    ) from exc


def read_image(spec: SubjectSpec, role: str, path: Path,
               timeout_s: float = READ_TIMEOUT_S) -> sitk.Image:
    """Read one 3D scalar image (file or DICOM series folder).

    Args:
        spec: the subject (for messages).
        role: ``CT`` or ``mask`` (for messages).
        path: the file or folder.
        timeout_s: give up on a file that gives no answer for this long.

    Raises:
        InputImageError: missing, empty, unreadable, not 3D or not scalar, or no answer in time.
    """
    return _timed(_read_image, spec, role, path, timeout_s)


def _read_image(spec: SubjectSpec, role: str, path: Path) -> sitk.Image:
    _check_file(spec, role, path, scan_values=True)
    try:
        image = _read_dicom_folder(spec, role, path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise _fail(spec, role, path, f"cannot be read as an image ({first})",
                    "Give a NIfTI, NRRD, MHA file or a DICOM folder; if it is truncated, copy or "
                    "export it again.") from exc
    _check_volume(spec, role, path, image.GetSize(), image.GetNumberOfComponentsPerPixel())
    return image


def _header_of(image: sitk.Image) -> Header:
    return Header(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                  image.GetPixelIDTypeAsString())


def _describe(h: Header) -> str:
    return (f"size={h.size} spacing={tuple(round(s, 5) for s in h.spacing)} "
            f"origin={tuple(round(o, 4) for o in h.origin)} "
            f"direction={tuple(round(d, 4) for d in h.direction)}")


def _same_grid(ct: Header, mask: Header) -> bool:
    return (
        ct.size == mask.size
        and np.allclose(ct.spacing, mask.spacing, rtol=0, atol=SPACING_TOL_MM)
        and np.allclose(ct.origin, mask.origin, rtol=0, atol=ORIGIN_TOL_MM)
        and np.allclose(ct.direction, mask.direction, rtol=0, atol=DIRECTION_TOL)
    )


def _mismatch(spec: SubjectSpec, ct: Header, mask: Header) -> GeometryError:
    return GeometryError(
        f"Subject {spec.subject_id}: mask {spec.mask} is not on the CT's voxel grid "
        f"(tolerance {SPACING_TOL_MM} mm, direction {DIRECTION_TOL}).\n"
        f"  CT   {spec.ct}: {_describe(ct)}\n  mask {spec.mask}: {_describe(mask)}\n"
        "Fix the mask's header, or pass --resample-mask to put the mask on the CT grid "
        "(nearest neighbour)."
    )


def match_mask_grid(spec: SubjectSpec, ct: sitk.Image, mask: sitk.Image, resample: bool) -> sitk.Image:
    """The mask on the CT's grid: as it is if the geometries agree, resampled if asked.

    Raises:
        GeometryError: the grids differ and ``resample`` is False; both geometries are printed.
    """
    if _same_grid(_header_of(ct), _header_of(mask)):
        return mask
    if not resample:
        raise _mismatch(spec, _header_of(ct), _header_of(mask))
    log.warning("Subject %s: resampling the mask onto the CT grid (nearest neighbour)",
                spec.subject_id)
    return sitk.Resample(mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         mask.GetPixelID())


def _mask_labels(spec: SubjectSpec, mask: sitk.Image) -> tuple[np.ndarray, list[str]]:
    values = sitk.GetArrayFromImage(mask)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise _fail(spec, "mask", spec.mask, "holds non-integer values (is it a probability "
                        "map?)", f"Give a label image: 0 background, {spec.labels}.")
        values = values.astype(np.int64)
    labels, unknown = spec.labels.canonical(values)
    warnings = []
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
        warnings.append(f"mask {spec.mask} holds labels {shown} besides 0 and {spec.labels}; "
                        "those voxels belong to no region (set to air in all three)")
        log.warning("Subject %s: %s", spec.subject_id, warnings[-1])
    return labels, warnings


def read_mask(spec: SubjectSpec, timeout_s: float = READ_TIMEOUT_S
              ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The subject's mask as read (values not mapped), in LPS, (z, y, x), with its spacing
    (``validate``: masks are small to read).

    Raises:
        InputImageError: the mask cannot be read (see ``read_image``).
    """
    image = sitk.DICOMOrient(read_image(spec, "mask", spec.mask, timeout_s), "LPS")
    values = sitk.GetArrayFromImage(image)
    if not np.issubdtype(values.dtype, np.integer):
        values = np.round(np.nan_to_num(values)).astype(np.int64)
    sx, sy, sz = image.GetSpacing()
    return values, (sz, sy, sx)


def _axis_aligned(spec: SubjectSpec, ct: sitk.Image, mask: sitk.Image
                  ) -> tuple[sitk.Image, sitk.Image, str | None]:
    """CT and mask on an axis-aligned grid: themselves when their direction (after the
    reorientation to LPS) is the identity; else both resampled, with their real direction, onto
    an axis-aligned grid of the same spacing covering the whole scan (CT linear with air outside,
    mask nearest neighbour), and a warning naming the angle. A tilted gantry or rotated scan is
    therefore never taken for an axis-aligned one."""
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    if np.allclose(direction, np.eye(3), rtol=0, atol=DIRECTION_TOL):
        return ct, mask, None
    cosine = np.clip((np.trace(direction) - 1) / 2, -1.0, 1.0)  # rotation angle from identity
    angle = math.degrees(math.acos(cosine))
    spacing = np.array(ct.GetSpacing())
    corners = np.array([ct.TransformContinuousIndexToPhysicalPoint(corner) for corner in
                        itertools.product(*[(-0.5, n - 0.5) for n in ct.GetSize()])])
    low, high = corners.min(axis=0), corners.max(axis=0)
    grid = sitk.Image([int(n) for n in np.ceil((high - low) / spacing - 1e-6)], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetOrigin((low + spacing / 2).tolist())
    ct = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, ct.GetPixelID())
    mask = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         mask.GetPixelID())
    warning = (f"the scan is oblique ({angle:.1f} degrees from the axis-aligned LPS grid): CT "
               "(linear) and mask (nearest) were resampled onto an axis-aligned grid of the same "
               "spacing")
    log.warning("Subject %s: %s", spec.subject_id, warning)
    return ct, mask, warning


def load_scan(spec: SubjectSpec, config: ExtractionConfig,
              read_timeout_s: float = READ_TIMEOUT_S) -> Scan:
    """Read, check and reorient one subject's CT and mask.

    Args:
        spec: the subject.
        config: uses ``resample_mask``.
        read_timeout_s: give up on a file that gives no answer for this long.

    Returns:
        The scan in LPS on an axis-aligned grid (oblique scans resampled), (z, y, x), left
        knees mirrored along x; of a bilateral scan, the half that holds ``spec.side``'s leg.

    Raises:
        InputImageError, GeometryError: see ``read_image`` and ``match_mask_grid``; also NaN/inf in
            the CT and non-integer masks.
    """
    ct = read_image(spec, "CT", spec.ct, read_timeout_s)
    mask = match_mask_grid(spec, ct, read_image(spec, "mask", spec.mask, read_timeout_s),
                           config.resample_mask)
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ct.GetDirection())
    ct = sitk.DICOMOrient(sitk.Cast(ct, sitk.sitkFloat32), "LPS")
    mask = sitk.DICOMOrient(mask, "LPS")
    ct, mask, oblique = _axis_aligned(spec, ct, mask)
    ct_hu = sitk.GetArrayFromImage(ct)
    if not np.all(np.isfinite(ct_hu)):
        bad = int(np.count_nonzero(~np.isfinite(ct_hu)))
        raise _fail(spec, "CT", spec.ct, f"holds {bad} NaN or infinite voxels",
                    "Fix the export (NaN is not a HU value) or replace them, e.g. with -1000.")
    labels, warnings = _mask_labels(spec, mask)
    if oblique:
        warnings.insert(0, oblique)
    sx, sy, sz = ct.GetSpacing()
    if spec.bilateral:
        ct_hu, labels = take_leg(spec.subject_id, spec.side or "R", ct_hu, labels, (sz, sy, sx),
                                 config.body_threshold_hu, config.body_min_fraction)
    if spec.side == "L":
        ct_hu = np.ascontiguousarray(ct_hu[:, :, ::-1])
        labels = np.ascontiguousarray(labels[:, :, ::-1])
    return Scan(spec.subject_id, ct_hu, labels, (sz, sy, sx), spec.side, orientation,
                tuple(warnings), spec.labels)


def read_header(spec: SubjectSpec, role: str, path: Path,
                timeout_s: float = READ_TIMEOUT_S) -> Header:
    """Read an image's header only (for a DICOM folder: the first file of its one series); no
    voxel data, so ``validate`` and the memory check stay cheap (NaN is found by the full read).

    Raises:
        InputImageError: missing, empty, unreadable, not 3D, not scalar; truncated NIfTI; no
            answer within ``timeout_s``.
    """
    return _timed(_read_header, spec, role, path, timeout_s)


def _read_header(spec: SubjectSpec, role: str, path: Path) -> Header:
    _check_file(spec, role, path, scan_values=False)
    reader = sitk.ImageFileReader()
    if path.is_dir():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if len(series) != 1:
            _read_dicom_folder(spec, role, path)  # raises the right message
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
        reader.SetFileName(files[0])
    else:
        reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _fail(spec, role, path, "cannot be read as an image", "Give a NIfTI, NRRD, MHA "
                    "file or a DICOM folder; if it is truncated, copy it again.") from exc
    size = reader.GetSize()
    if path.is_dir():
        size = (*size[:2], len(files))
    _check_volume(spec, role, path, size, reader.GetNumberOfComponents())
    return Header(size, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
                  sitk.GetPixelIDValueAsString(reader.GetPixelID()))


def check_headers(spec: SubjectSpec, config: ExtractionConfig,
                  read_timeout_s: float = READ_TIMEOUT_S) -> tuple[Header, Header]:
    """Preflight of one subject from headers only: both files readable, 3D, on one grid.

    Returns:
        The CT's and the mask's headers.

    Raises:
        InputImageError, GeometryError: the first problem found.
    """
    ct = read_header(spec, "CT", spec.ct, read_timeout_s)
    mask = read_header(spec, "mask", spec.mask, read_timeout_s)
    # A DICOM folder's header is its first slice: its origin is not the volume's, so only the
    # full read checks its grid.
    if not _same_grid(ct, mask) and not config.resample_mask and not spec.ct.is_dir():
        raise _mismatch(spec, ct, mask)
    return ct, mask
