"""Scan geometry: an image's grid (size, spacing, origin, direction) and whether a mask lies on the
CT's grid."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import SimpleITK as sitk

from kneebatch.errors import GeometryError
from kneebatch.inputs.manifest import SubjectSpec

log = logging.getLogger(__name__)

SPACING_TOL_MM = 1e-3  # CT and mask spacings and origins may differ by this much (rounding)
ORIGIN_TOL_MM = 1e-3
DIRECTION_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Header:
    """Geometry of an image, read without its voxels."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel: str


def header_of(image: sitk.Image) -> Header:
    return Header(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                  image.GetPixelIDTypeAsString())


def _describe(h: Header) -> str:
    return (f"size={h.size} spacing={tuple(round(s, 5) for s in h.spacing)} "
            f"origin={tuple(round(o, 4) for o in h.origin)} "
            f"direction={tuple(round(d, 4) for d in h.direction)}")


def same_grid(ct: Header, mask: Header) -> bool:
    return (
        ct.size == mask.size
        and np.allclose(ct.spacing, mask.spacing, rtol=0, atol=SPACING_TOL_MM)
        and np.allclose(ct.origin, mask.origin, rtol=0, atol=ORIGIN_TOL_MM)
        and np.allclose(ct.direction, mask.direction, rtol=0, atol=DIRECTION_TOL)
    )


def mismatch(spec: SubjectSpec, ct: Header, mask: Header) -> GeometryError:
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
    if same_grid(header_of(ct), header_of(mask)):
        return mask
    if not resample:
        raise mismatch(spec, header_of(ct), header_of(mask))
    log.warning("Subject %s: resampling the mask onto the CT grid (nearest neighbour)",
                spec.subject_id)
    return sitk.Resample(mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         mask.GetPixelID())
