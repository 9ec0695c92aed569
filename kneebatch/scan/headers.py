"""Scan preflight from headers only: both files readable, 3D, scalar, on one grid; no voxel data
(``validate``, and the worker's memory check before a read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from kneebatch.config import READ_TIMEOUT_S, ExtractionConfig
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.scan.files import check_file, check_volume, timed, unreadable
from kneebatch.scan.geometry import Header, mismatch, same_grid
from kneebatch.scan.read import read_dicom_folder


def read_header(spec: SubjectSpec, role: str, path: Path,
                timeout_s: float = READ_TIMEOUT_S) -> Header:
    """Read an image's header only (for a DICOM folder: the first and last files of its one
    series); no voxel data, so ``validate`` and the memory check stay cheap (NaN is found by the
    full read).

    Raises:
        InputImageError: missing, empty, unreadable, not 3D, not scalar; truncated NIfTI; no
            answer within ``timeout_s``.
    """
    return timed(_read_header, spec, role, path, timeout_s)


def _information(spec: SubjectSpec, role: str, path: Path, file: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise unreadable(spec, role, path, exc) from exc
    return reader


def _dicom_header(spec: SubjectSpec, role: str, path: Path) -> Header:
    """A DICOM series' grid from its first and last files' headers, as SimpleITK's series reader
    builds it: their sizes and in-plane spacing, the first file's position as origin, the slice
    direction and spacing from the first to the last position."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if len(series) != 1:
        read_dicom_folder(spec, role, path)  # raises the right message
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
    first = _information(spec, role, path, files[0])
    size = (*first.GetSize()[:2], len(files))
    spacing, direction = list(first.GetSpacing()), np.array(first.GetDirection()).reshape(3, 3)
    if len(files) > 1:
        step = np.subtract(_information(spec, role, path, files[-1]).GetOrigin(),
                           first.GetOrigin()) / (len(files) - 1)
        if np.linalg.norm(step) > 0:
            spacing[2] = float(np.linalg.norm(step))
            direction[:, 2] = step / spacing[2]
    check_volume(spec, role, path, size, first.GetNumberOfComponents(), tuple(spacing))
    return Header(size, tuple(spacing), first.GetOrigin(), tuple(direction.ravel().tolist()),
                  sitk.GetPixelIDValueAsString(first.GetPixelID()))


def _read_header(spec: SubjectSpec, role: str, path: Path) -> Header:
    check_file(spec, role, path, scan_values=False)
    if path.is_dir():
        return _dicom_header(spec, role, path)
    reader = _information(spec, role, path, str(path))
    check_volume(spec, role, path, reader.GetSize(), reader.GetNumberOfComponents(),
                 reader.GetSpacing())
    return Header(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
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
    if not same_grid(ct, mask) and not config.resample_mask:
        raise mismatch(spec, ct, mask)
    return ct, mask
