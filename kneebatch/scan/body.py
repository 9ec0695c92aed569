"""The body in a CT: what lies above a HU threshold, less whatever is thinner than a few millimetres
(the couch, blankets, cables: cut by a morphological opening, also where they touch the skin), in
the connected pieces that hold at least a fraction of the largest one's voxels (both legs stay;
specks go). Used by the background region and the bilateral split."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

COARSE_MM = 4.0  # the body's extent is looked for on a grid about this coarse: fast, and enough


def coarse_steps(spacing_mm: tuple[float, ...]) -> list[int]:
    """Strides per axis that give a copy about ``COARSE_MM`` coarse."""
    return [max(1, int(COARSE_MM // s)) for s in spacing_mm]


OPENING_GRID_MM = 1.0  # the opening runs on a strided copy about this coarse (exact on a 1 mm grid)


def _opened(above: np.ndarray, spacing_mm: tuple[float, ...], thin_mm: float) -> np.ndarray:
    """``above`` without structures thinner than ``thin_mm``: an opening by a cube of half-side
    ``thin_mm / 2`` (boxes and round limbs keep their corners and skin) on a strided copy near
    ``OPENING_GRID_MM``, the volume's faces continued (a leg cut by the field of view is not eroded
    from its cut face)."""
    steps = [max(1, round(OPENING_GRID_MM / s)) for s in spacing_mm]
    coarse = above[::steps[0], ::steps[1], ::steps[2]]
    radius = max(1, math.ceil(thin_mm / 2 / max(s * n for s, n in zip(spacing_mm, steps,
                                                                      strict=True))))
    hits = [np.flatnonzero(coarse.any(axis=tuple(a for a in range(3) if a != axis)))
            for axis in range(3)]
    if not hits[0].size:
        return above
    # only around what is above the threshold: a face of the box that is not the volume's holds
    # nothing, so continuing it changes nothing (the result equals the whole volume's)
    box = tuple(slice(max(0, int(h[0]) - 1), int(h[-1]) + 2) for h in hits)
    padded = np.pad(coarse[box], radius, mode="edge")
    inner = tuple(slice(radius, -radius) for _ in range(3))
    cube = ndimage.generate_binary_structure(3, 3)
    opened = np.zeros(coarse.shape, dtype=bool)
    opened[box] = ndimage.binary_opening(padded, cube, iterations=radius)[inner]
    if steps == [1, 1, 1]:
        return opened
    for axis, step in enumerate(steps):
        opened = np.repeat(opened, step, axis=axis)
    return above & opened[:above.shape[0], :above.shape[1], :above.shape[2]]


def body_mask(ct_hu: np.ndarray, threshold_hu: float, min_fraction: float,
              spacing_mm: tuple[float, ...] = (1.0, 1.0, 1.0), thin_mm: float = 0.0) -> np.ndarray:
    """Voxels above ``threshold_hu``, less structures thinner than ``thin_mm`` (0: none cut), in
    the connected pieces holding at least ``min_fraction`` of the largest one's voxels."""
    body = ct_hu > threshold_hu
    if thin_mm > 0:
        body = _opened(body, spacing_mm, thin_mm)
    components, count = ndimage.label(body)
    if count == 0:
        return np.zeros(ct_hu.shape, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = sizes >= min_fraction * sizes.max()  # False for the background (size 0)
    return keep[components]
