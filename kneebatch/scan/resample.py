"""Resampling to the analysis grid: the CT's anti-alias Gaussian and linear interpolation as one
small matrix per axis, applied to the box around the body only; the mask by nearest index.

Both CT operations are linear and separable on an axis-aligned grid, so per axis they compose into
one (grid x native) matrix: the Gaussian (scipy's ``gaussian_filter1d`` weights, ``truncate=4``,
edge values continued) followed by ITK's linear interpolation (what ``sitk.Resample`` does on this
grid: edge values continued within half a voxel of the volume, the fill beyond). The box is
smoothed on its own (its edge values continued) and counts as lying in a volume of air (the
window's low end), so the result is ``air + M_z M_y M_x (box - air)``: in real arithmetic exactly
scipy's filter of the box pasted into air and resampled by SimpleITK, in float32 within a few
thousandths of a HU (tests hold it to both). Each product touches only the band of
columns its rows need, so this costs a fraction of filtering every native voxel and resampling the
whole volume.
"""

from __future__ import annotations

import itertools

import numpy as np

Box = tuple[tuple[int, int], ...]  # ((z0, z1), (y0, y1), (x0, x1)), end exclusive

TRUNCATE = 4.0  # scipy's default: the Gaussian's reach in sigmas
ROWS_PER_PRODUCT = 32  # output rows per banded product: the columns they need are a narrow band


def grid_size(n: int, native_mm: float, target_mm: float) -> int:
    """Voxels along an axis of ``n`` native voxels resampled to ``target_mm`` (same field of view)."""
    return max(1, round(n * native_mm / target_mm))


def grid_positions(n: int, native_mm: float, target_mm: float) -> np.ndarray:
    """The native continuous index of each resampled voxel's centre: the grid keeps the field of
    view, its first voxel centred half a (new - old) voxel step in."""
    return (np.arange(grid_size(n, native_mm, target_mm)) + 0.5) * (target_mm / native_mm) - 0.5


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n x n) Gaussian smoothing of a line of ``n`` values, edge values continued (scipy's
    ``gaussian_filter1d(..., mode="nearest")``); the identity for ``sigma`` 0."""
    if sigma <= 0:
        return np.eye(n)
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    matrix = np.zeros((n, n))
    rows = np.arange(n)
    for offset, weight in zip(offsets, kernel, strict=True):
        np.add.at(matrix, (rows, np.clip(rows + offset, 0, n - 1)), weight)
    return matrix


def linear_matrix(positions: np.ndarray, n: int) -> np.ndarray:
    """(len(positions) x n) linear interpolation as ITK does it: a position within half a voxel
    outside the line takes the edge value; one further out gets an all-zero row (``fill``)."""
    matrix = np.zeros((positions.size, n))
    inside = (positions >= -0.5) & (positions < n - 0.5)
    low = np.clip(np.floor(positions), 0, n - 1).astype(np.intp)
    high = np.minimum(low + 1, n - 1)
    frac = np.clip(positions - low, 0.0, 1.0)
    rows = np.flatnonzero(inside)
    np.add.at(matrix, (rows, low[rows]), 1.0 - frac[rows])
    np.add.at(matrix, (rows, high[rows]), frac[rows])
    return matrix


def nearest_index(positions: np.ndarray, n: int) -> np.ndarray:
    """Nearest native index of each position, a position halfway between two taking the upper (as
    ITK rounds; where SimpleITK computes a halfway position a rounding error off, it may take the
    lower); -1 beyond half a voxel outside the line."""
    index = np.floor(positions + 0.5).astype(np.intp)
    index[(positions < -0.5) | (positions >= n - 0.5)] = -1
    return index


def _along(volume: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """``matrix`` (m x n) applied along ``axis`` of the float32 (z, y, x) ``volume`` (n long
    there): for each ``ROWS_PER_PRODUCT`` rows, one BLAS product over the band of columns they use,
    without moving the volume's axes."""
    shape = list(volume.shape)
    shape[axis] = matrix.shape[0]
    out = np.empty(shape, dtype=np.float32)
    lead = (slice(None),) * axis
    for start in range(0, matrix.shape[0], ROWS_PER_PRODUCT):
        rows = matrix[start:start + ROWS_PER_PRODUCT]
        dst = out[(*lead, slice(start, start + rows.shape[0]))]
        used = np.flatnonzero(rows.any(axis=0))
        if used.size == 0:
            dst[...] = 0.0
            continue
        band = slice(int(used[0]), int(used[-1]) + 1)
        weights = rows[:, band].astype(np.float32)
        src = volume[(*lead, band)]
        if axis == 0:  # (k, b) @ (b, y * x): both views of contiguous memory
            np.matmul(weights, src.reshape(src.shape[0], -1), out=dst.reshape(dst.shape[0], -1))
        elif axis == 1:  # (k, b) @ (z, b, x): one product per slice
            np.matmul(weights, src, out=dst)
        else:  # (z, y, b) @ (b, k)
            np.matmul(src, weights.T, out=dst)
    return out


def smooth_and_resample(volume: np.ndarray, box: Box, spacing_mm: tuple[float, ...],
                        target_mm: float, sigmas: list[float],
                        window: tuple[float, float]) -> np.ndarray:
    """The window-clipped volume, smoothed by a Gaussian (``sigmas`` in voxels per axis) and
    linearly resampled to ``target_mm``, computed from ``box`` alone: the box is smoothed on its
    own (edge values continued) and the volume counts as ``window[0]`` (air) outside it and beyond
    its edges.

    Args:
        volume: the native volume (z, y, x); only ``box`` of it is read.
        box: ((z0, z1), (y0, y1), (x0, x1)) native box.
        spacing_mm: native voxel size (z, y, x).
        target_mm: the grid's voxel size.
        sigmas: the Gaussian's sigma per axis in native voxels (0: not smoothed).
        window: HU window (low, high) the values are clipped to.

    Returns:
        float32 (z, y, x) on the grid of ``grid_positions``.
    """
    air = np.float32(window[0])
    shape = tuple(grid_size(n, s, target_mm) for n, s in zip(volume.shape, spacing_mm, strict=True))
    matrices, kept = [], []
    for axis, (n, s) in enumerate(zip(volume.shape, spacing_mm, strict=True)):
        lo, hi = box[axis]
        full = linear_matrix(grid_positions(n, s, target_mm), n)[:, lo:hi]
        matrix = full @ gaussian_matrix(hi - lo, sigmas[axis])
        rows = np.flatnonzero(matrix.any(axis=1))  # grid rows the box reaches
        if rows.size == 0:
            return np.full(shape, air, dtype=np.float32)
        kept.append(slice(int(rows[0]), int(rows[-1]) + 1))
        matrices.append(matrix[kept[-1]])
    part = np.array(volume[tuple(slice(a, b) for a, b in box)], dtype=np.float32)  # a copy
    np.clip(part, *window, out=part)
    part -= air
    # the axes in the order that makes the fewest multiplications (dense count: a fair guide)
    order = min(itertools.permutations(range(3)), key=lambda axes: _cost(part.shape, matrices, axes))
    for axis in order:
        part = _along(part, matrices[axis], axis)
    out = np.full(shape, air, dtype=np.float32)
    out[tuple(kept)] = part + air
    return out


def _cost(shape: tuple[int, ...], matrices: list[np.ndarray], axes: tuple[int, ...]) -> int:
    size, total = list(shape), 0
    for axis in axes:
        total += int(np.prod(size)) * matrices[axis].shape[0]
        size[axis] = matrices[axis].shape[0]
    return total


def resample_labels(mask: np.ndarray, spacing_mm: tuple[float, ...], target_mm: float) -> np.ndarray:
    """A label volume on the grid by nearest neighbour (as ``sitk.Resample``'s, 0 beyond the
    volume)."""
    out = mask
    for axis in range(3):  # one axis at a time: each take shrinks what the next one copies
        n = mask.shape[axis]
        index = nearest_index(grid_positions(n, spacing_mm[axis], target_mm), n)
        out = np.take(out, np.maximum(index, 0), axis=axis)
        if (index < 0).any():
            beyond: list[slice | np.ndarray] = [slice(None)] * 3
            beyond[axis] = index < 0
            out[tuple(beyond)] = 0
    return out
