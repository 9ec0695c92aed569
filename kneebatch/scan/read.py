"""Scan reading: a CT and its label mask as one canonical ``Scan`` (checked, LPS, left knees mirrored).

With ``files`` and ``headers``, the only modules that call
SimpleITK's readers. Reads NIfTI, NRRD, MHA (anything SimpleITK reads) and
DICOM series folders. Output is a ``Scan`` of numpy arrays in (z, y, x) order, LPS orientation (x
toward the patient's left, y posterior, z superior), left knees mirrored along x.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from kneebatch.config import READ_TIMEOUT_S, ExtractionConfig
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.scan.anatomy import check_anatomy
from kneebatch.scan.bilateral import take_leg
from kneebatch.scan.files import check_file, check_volume, input_error, timed, unreadable
from kneebatch.scan.geometry import match_mask_grid
from kneebatch.scan.orient import axis_aligned

log = logging.getLogger(__name__)

# A mask is a label map: no value below LOWEST_LABEL (air in HU is -1000) and at most MAX_LABELS
# distinct values in a strided sample; a CT with at most CT_MIN_VALUES there, none negative, is a
# label map given as the CT.
LOWEST_LABEL = -100
MAX_LABELS = 255  # room for multi-label segmentations; a CT sample holds thousands
CT_MIN_VALUES = 16


@dataclasses.dataclass(frozen=True)
class Scan:
    """A CT and mask on one grid, canonical orientation.

    Attributes:
        subject_id: the subject.
        ct_hu: CT in HU, (z, y, x): int16 (or 8 bits) as CT files store it, else float32.
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


def read_dicom_folder(spec: SubjectSpec, role: str, path: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise input_error(spec, role, path, "folder holds no DICOM series",
                    "Point the manifest at the folder of one DICOM series, or at an image file.")
    if len(series) > 1:
        raise input_error(spec, role, path, f"folder holds {len(series)} DICOM series "
                    f"({', '.join(series)})", "Move each series into its own folder and list the "
                    "one to use in the manifest.")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
    return reader.Execute()


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
    return timed(_read_image, spec, role, path, timeout_s)


def _read_image(spec: SubjectSpec, role: str, path: Path) -> sitk.Image:
    check_file(spec, role, path, scan_values=True)
    try:
        image = read_dicom_folder(spec, role, path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise unreadable(spec, role, path, exc) from exc
    check_volume(spec, role, path, image.GetSize(), image.GetNumberOfComponentsPerPixel(),
                 image.GetSpacing())
    return image


def mask_values(spec: SubjectSpec, mask: sitk.Image) -> np.ndarray:
    """A mask's values as integers, checked to be a label map (``run`` and ``validate`` alike).

    Raises:
        InputImageError: fractions (a probability map), or values a CT has: HU of air (below
            -100) or hundreds of distinct values (CT and mask swapped in the manifest?).
    """
    values = sitk.GetArrayFromImage(mask)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise input_error(spec, "mask", spec.mask, "holds non-integer values (is it a probability "
                        "map?)", f"Give a label image: 0 background, {spec.labels}.")
        values = values.astype(np.int64)
    sample = np.unique(values[::4, ::4, ::4])  # a strided look: a CT shows hundreds of values
    if sample.size and (int(sample[0]) < LOWEST_LABEL or sample.size > MAX_LABELS):
        raise input_error(
            spec, "mask", spec.mask, f"looks like a CT, not a label mask: {sample.size} distinct "
            f"values in a sample, from {int(sample[0])} to {int(sample[-1])}",
            "Are the ct and mask columns swapped in this row? The mask holds 0 background and "
            f"the bones' labels ({spec.labels}).")
    return values


_INTEGER_PIXELS = {sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32,
                   sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64}
# CT values kept as read (every later step reads them as float32 box by box); others become float32
_COMPACT_PIXELS = {sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16}

def anatomy_warnings(spec: SubjectSpec, image: sitk.Image, labels: np.ndarray) -> tuple[str, ...]:
    """``check_anatomy`` for ``run`` and ``validate`` alike: its warnings, its problem raised.

    Raises:
        InputImageError: the femur lies below the tibia (labels swapped?).
    """
    anatomy = check_anatomy(image, labels, spec.side, spec.bilateral)
    if anatomy.problem:
        raise input_error(spec, "mask", spec.mask, anatomy.problem, "Give the right values with "
                          "--labels tibia=V,femur=V or the manifest's tibia_label / femur_label "
                          "columns; if the labels are right, the file's orientation header is "
                          "wrong: fix it.")
    return anatomy.warnings


def check_ct_values(spec: SubjectSpec, sample: np.ndarray) -> None:
    """A CT shows many values, air below 0 among them (``run``: a strided sample of the volume;
    ``validate``: its middle slice).

    Raises:
        InputImageError: at most ``CT_MIN_VALUES`` distinct values, none below 0: a label map.
    """
    values = np.unique(sample)
    if values.size <= CT_MIN_VALUES and values.size and values[0] >= 0:
        raise input_error(spec, "CT", spec.ct, f"looks like a label mask, not a CT: "
                          f"{values.size} distinct values in a sample, none below 0",
                          "Are the ct and mask columns swapped in this row?")


def read_ct_slice(spec: SubjectSpec, timeout_s: float = READ_TIMEOUT_S) -> np.ndarray:
    """The CT's middle slice (of a DICOM series: its middle file), read alone (``validate``)."""
    return timed(_read_ct_slice, spec, "CT", spec.ct, timeout_s)


def _read_ct_slice(spec: SubjectSpec, role: str, path: Path) -> np.ndarray:
    reader = sitk.ImageFileReader()
    try:
        if path.is_dir():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            reader.SetFileName(files[len(files) // 2])
        else:
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = list(reader.GetSize())
            reader.SetExtractIndex([0, 0, size[2] // 2])
            reader.SetExtractSize([size[0], size[1], 1])
        return sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError as exc:
        raise unreadable(spec, role, path, exc) from exc


def _mask_labels(spec: SubjectSpec, mask: sitk.Image) -> tuple[np.ndarray, list[str]]:
    """The mask in kneebatch's labels, checked against the anatomy, and what to warn about.

    Raises:
        InputImageError: not a label map (``mask_values``), or the femur lies below the tibia.
    """
    values = mask_values(spec, mask)
    labels, unknown = spec.labels.canonical(values)
    warnings = []
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
        warnings.append(f"mask {spec.mask} holds labels {shown} besides 0 and {spec.labels}; "
                        "those voxels belong to no region (set to air in all three)")
    warnings.extend(anatomy_warnings(spec, mask, labels))
    for warning in warnings:
        log.warning("Subject %s: %s", spec.subject_id, warning)
    return labels, warnings


def read_mask(spec: SubjectSpec, timeout_s: float = READ_TIMEOUT_S
              ) -> tuple[np.ndarray, sitk.Image]:
    """The subject's mask as read (values not mapped), in LPS, (z, y, x), and its image (for the
    header; ``validate``: masks are small to read).

    Raises:
        InputImageError: the mask cannot be read (see ``read_image``) or is not a label map
            (see ``mask_values``).
    """
    image = sitk.DICOMOrient(read_image(spec, "mask", spec.mask, timeout_s), "LPS")
    return mask_values(spec, image), image


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
    whole = ct.GetPixelID() in _INTEGER_PIXELS  # whole numbers: never NaN or inf
    if ct.GetPixelID() not in _COMPACT_PIXELS:  # CT's own int16 is kept: no pass, half the bytes
        ct = sitk.Cast(ct, sitk.sitkFloat32)
    if orientation != "LPS":  # a file already in LPS needs no reorienting copy
        ct, mask = sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(mask, "LPS")
    ct, mask, oblique = axis_aligned(spec, ct, mask)
    ct_hu = sitk.GetArrayFromImage(ct)
    if not whole and not np.all(np.isfinite(ct_hu)):
        bad = int(np.count_nonzero(~np.isfinite(ct_hu)))
        raise input_error(spec, "CT", spec.ct, f"holds {bad} NaN or infinite voxels",
                    "Fix the export (NaN is not a HU value) or replace them, e.g. with -1000.")
    check_ct_values(spec, ct_hu[::4, ::4, ::4])
    labels, warnings = _mask_labels(spec, mask)
    if oblique:
        warnings.insert(0, oblique)
    sx, sy, sz = ct.GetSpacing()
    if spec.bilateral:
        ct_hu, labels = take_leg(spec.subject_id, spec.side or "R", ct_hu, labels, (sz, sy, sx),
                                 config.body_threshold_hu, config.body_min_fraction,
                                 config.body_thin_mm)
    if spec.side == "L":
        ct_hu = np.ascontiguousarray(ct_hu[:, :, ::-1])
        labels = np.ascontiguousarray(labels[:, :, ::-1])
    return Scan(spec.subject_id, ct_hu, labels, (sz, sy, sx), spec.side, orientation,
                tuple(warnings), spec.labels)
