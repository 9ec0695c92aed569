"""Scan preflight from headers only: both files readable, 3D, scalar, on one grid; no voxel data
(``validate``, and the worker's memory check before a read)."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from kneebatch.config import READ_TIMEOUT_S, ExtractionConfig
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.scan.files import check_file, check_volume, input_error, timed
from kneebatch.scan.geometry import Header, mismatch, same_grid
from kneebatch.scan.read import read_dicom_folder


def read_header(spec: SubjectSpec, role: str, path: Path,
                timeout_s: float = READ_TIMEOUT_S) -> Header:
    """Read an image's header only (for a DICOM folder: the first file of its one series); no
    voxel data, so ``validate`` and the memory check stay cheap (NaN is found by the full read).

    Raises:
        InputImageError: missing, empty, unreadable, not 3D, not scalar; truncated NIfTI; no
            answer within ``timeout_s``.
    """
    return timed(_read_header, spec, role, path, timeout_s)


def _read_header(spec: SubjectSpec, role: str, path: Path) -> Header:
    check_file(spec, role, path, scan_values=False)
    reader = sitk.ImageFileReader()
    if path.is_dir():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if len(series) != 1:
            read_dicom_folder(spec, role, path)  # raises the right message
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
        reader.SetFileName(files[0])
    else:
        reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise input_error(spec, role, path, "cannot be read as an image", "Give a NIfTI, NRRD, MHA "
                    "file or a DICOM folder; if it is truncated, copy it again.") from exc
    size = reader.GetSize()
    if path.is_dir():
        size = (*size[:2], len(files))
    check_volume(spec, role, path, size, reader.GetNumberOfComponents(), reader.GetSpacing())
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
    if not same_grid(ct, mask) and not config.resample_mask and not spec.ct.is_dir():
        raise mismatch(spec, ct, mask)
    return ct, mask
