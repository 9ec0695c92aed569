"""Bilateral scans: one CT holding both legs becomes two knees, ``<id>_L`` and ``<id>_R``.

The scan is split at the widest gap between the legs along the left-right axis: the body (the
components above ``body_threshold_hu`` holding at least ``body_min_fraction`` of the largest one,
as the background region finds it; couch and specks go) projected onto x, on a coarse copy of the
scan. A scan whose legs touch or overlap along x cannot be split and fails with the reason.
"""

from __future__ import annotations

import numpy as np

from kneebatch.errors import RegionError
from kneebatch.inputs.labels import BACKGROUND
from kneebatch.scan.body import body_mask, coarse_steps

SUFFIXES = {"L": "_L", "R": "_R"}


def _occupied_columns(ct_hu: np.ndarray, spacing_mm: tuple[float, float, float],
                      threshold_hu: float, min_fraction: float, thin_mm: float) -> np.ndarray:
    """Which x columns (native indices) hold body, from a coarse copy."""
    steps = coarse_steps(spacing_mm)  # gaps between legs are centimetres
    coarse = ct_hu[::steps[0], ::steps[1], ::steps[2]]
    coarse_mm = tuple(s * n for s, n in zip(spacing_mm, steps, strict=True))
    columns = body_mask(coarse, threshold_hu, min_fraction, coarse_mm, thin_mm).any(axis=(0, 1))
    return np.repeat(columns, steps[2])[:ct_hu.shape[2]]


def split_x(subject_id: str, ct_hu: np.ndarray, spacing_mm: tuple[float, float, float],
            threshold_hu: float, min_fraction: float, thin_mm: float = 0.0) -> int:
    """The x index (LPS: patient's right below it, left from it on) between the two legs.

    Raises:
        RegionError: no gap between the legs along x (one leg, or legs that touch).
    """
    columns = _occupied_columns(ct_hu, spacing_mm, threshold_hu, min_fraction, thin_mm)
    filled = np.flatnonzero(columns)
    if filled.size == 0:
        raise RegionError(f"Subject {subject_id}: side 'both', but the CT holds no body above "
                          f"{threshold_hu:g} HU. Check that the CT is in HU.")
    inside = ~columns[filled[0]:filled[-1] + 1]
    edges = np.flatnonzero(np.diff(np.concatenate(([0], inside.astype(np.int8), [0]))))
    gaps = edges.reshape(-1, 2) + filled[0]  # [start, end) of each run of empty columns
    if gaps.size == 0:
        raise RegionError(
            f"Subject {subject_id}: side 'both', but the legs cannot be separated: the body is "
            "one piece along the left-right axis (legs touching or crossed, or only one leg in "
            "the scan). Give the two legs as separate rows with their own CT and mask crops, or "
            "side L/R for a single leg.")
    start, end = max(gaps, key=lambda g: g[1] - g[0])
    return int((start + end) // 2)


def take_leg(subject_id: str, side: str, ct_hu: np.ndarray, mask: np.ndarray,
             spacing_mm: tuple[float, float, float], threshold_hu: float,
             min_fraction: float, thin_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One leg of a bilateral scan (LPS, (z, y, x), not yet mirrored): the volume cut at the gap
    between the legs (x grows toward the patient's left).

    Raises:
        RegionError: the legs cannot be separated.
    """
    split = split_x(subject_id, ct_hu, spacing_mm, threshold_hu, min_fraction, thin_mm)
    half = np.s_[:, :, split:] if side == "L" else np.s_[:, :, :split]
    return np.ascontiguousarray(ct_hu[half]), np.ascontiguousarray(mask[half])


def labelled_on_both_sides(mask: np.ndarray, spacing_x_mm: float, gap_mm: float = 20.0) -> bool:
    """Whether a mask's bones (any non-zero label) form two groups along x with at least
    ``gap_mm`` between them, each with a tenth of the labelled voxels: a bilateral scan."""
    counts = (mask != BACKGROUND).sum(axis=(0, 1))
    filled = np.flatnonzero(counts)
    if filled.size == 0:
        return False
    gaps = np.flatnonzero(np.diff(filled) * spacing_x_mm > gap_mm)
    total = counts.sum()
    for gap in gaps:
        left = counts[:filled[gap] + 1].sum()
        if min(left, total - left) >= total / 10:
            return True
    return False
