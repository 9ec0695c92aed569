"""Scan orientation: CT and mask on an axis-aligned LPS grid (oblique scans resampled), left knees
mirrored along x."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import SimpleITK as sitk

from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.scan.geometry import DIRECTION_TOL

log = logging.getLogger(__name__)


def axis_aligned(spec: SubjectSpec, ct: sitk.Image, mask: sitk.Image
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
    ct = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    mask = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         mask.GetPixelID())
    warning = (f"the scan is oblique ({angle:.1f} degrees from the axis-aligned LPS grid): CT "
               "(linear) and mask (nearest) were resampled onto an axis-aligned grid of the same "
               "spacing")
    log.warning("Subject %s: %s", spec.subject_id, warning)
    return ct, mask, warning
