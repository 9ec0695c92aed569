"""Anatomy checks from the mask and its header (``run`` and ``validate`` alike): the femur lies above
the tibia, the knee lies on the side the manifest gives, and each bone has a plausible size.

What they can tell: swapped tibia/femur labels (the femur below the tibia along the patient's
superior axis, as the header's orientation says) and a knee whose position in the scanner frame
contradicts ``side``. What they cannot: a header whose orientation is wrong fools both; the side
check assumes the scanner frame's origin lies near the table's centre line (LPS x = 0), so a knee
scanned off-centre or a frame with another origin can warn wrongly or not at all.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

from kneebatch.inputs.labels import FEMUR, TIBIA

SIDE_OFFSET_MM = 50.0  # a knee centre this far on the other side of x = 0 contradicts `side`
MIN_BONE_ML = 1.0  # a bone smaller than this is a fragment, not a knee's tibia or femur


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """What the checks found.

    Attributes:
        problem: what makes the subject's numbers wrong (femur below tibia), or None.
        warnings: what the user should look at (side, bone size).
    """

    problem: str | None
    warnings: tuple[str, ...]


def _centre_mm(image: sitk.Image, members: np.ndarray) -> np.ndarray:
    """Physical (LPS) centre of the True voxels of a (z, y, x) array on ``image``'s grid, from
    the projections of every second voxel per axis (within a voxel; all voxels for a bone too
    small to show there)."""
    step = 2 if members[::2, ::2, ::2].any() else 1
    sample = members[::step, ::step, ::step]
    count = np.count_nonzero(sample)
    z, y, x = (float(np.count_nonzero(sample, axis=tuple(a for a in range(3) if a != axis))
                     @ (np.arange(sample.shape[axis]) * step)) / count for axis in range(3))
    return np.array(image.TransformContinuousIndexToPhysicalPoint((x, y, z)))


def check_anatomy(image: sitk.Image, labels: np.ndarray, side: str | None,
                  bilateral: bool) -> Anatomy:
    """Check a subject's canonical labels (``LabelMap.canonical``, (z, y, x)) on ``image``'s grid.

    Args:
        image: an image on the labels' grid (any orientation; its header places the voxels).
        labels: 0, ``TIBIA``, ``FEMUR``, other.
        side: the manifest's side (``L``, ``R`` or None).
        bilateral: the scan holds both legs (no side check).
    """
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    bones = {"tibia": labels == TIBIA, "femur": labels == FEMUR}
    counts = {name: int(np.count_nonzero(m)) for name, m in bones.items()}
    warnings = [f"the {name} holds {counts[name] * voxel_ml:.2g} mL ({counts[name]} voxels), below "
                f"{MIN_BONE_ML:g} mL: a fragment or a wrong label?" for name in bones
                if 0 < counts[name] * voxel_ml < MIN_BONE_ML]
    if not all(counts.values()):
        return Anatomy(None, tuple(warnings))  # a missing bone is reported by its own check
    tibia, femur = (_centre_mm(image, bones[name]) for name in ("tibia", "femur"))
    problem = None
    if femur[2] < tibia[2]:  # LPS: z grows toward the head
        problem = (f"femur below tibia: labels swapped? (the femur's centre lies "
                   f"{tibia[2] - femur[2]:.0f} mm below the tibia's along the patient's "
                   "superior axis, as the header orients the scan)")
    centre_x = (tibia[0] + femur[0]) / 2  # LPS: x grows toward the patient's left
    if side in ("L", "R") and not bilateral:
        on_left = centre_x > SIDE_OFFSET_MM
        on_right = centre_x < -SIDE_OFFSET_MM
        if (side == "R" and on_left) or (side == "L" and on_right):
            where = "left" if on_left else "right"
            warnings.append(f"side is {side}, but the knee's centre lies {abs(centre_x):.0f} mm "
                            f"to the patient's {where} of the scanner's x = 0: the other leg? "
                            "(an off-centre scan or frame can also cause this)")
    return Anatomy(problem, tuple(warnings))
