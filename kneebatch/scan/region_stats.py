"""Region statistics for QC and covariates: each region's volume and HU distribution on the native
grid (the scan as read, before the HU window and resampling), recorded in ``done.json`` and gathered
into the ``regions`` Parquet dataset."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kneebatch.config import REGIONS
from kneebatch.scan.read import Scan
from kneebatch.scan.regions import Regions, members_of
from kneebatch.schema import PERCENTILES


@dataclasses.dataclass(frozen=True)
class RegionStats:
    """One region of one knee on the native grid.

    Attributes:
        voxels: native voxels in the region.
        volume_ml: their volume.
        hu_mean, hu_std: HU as read (not windowed).
        hu_percentiles: the HU at ``PERCENTILES``.
    """

    voxels: int
    volume_ml: float
    hu_mean: float
    hu_std: float
    hu_percentiles: tuple[float, ...]

    def to_dict(self) -> dict[str, float]:
        """Flat, JSON-ready: ``hu_p5`` ... ``hu_p95``."""
        values: dict[str, float] = {"voxels": self.voxels, "volume_ml": self.volume_ml,
                                    "hu_mean": self.hu_mean, "hu_std": self.hu_std}
        values |= {f"hu_p{p}": v for p, v in zip(PERCENTILES, self.hu_percentiles, strict=True)}
        return values


def _grid_index(regions: Regions, native_shape: tuple[int, ...],
                native_mm: tuple[float, float, float], axis: int) -> np.ndarray:
    """The analysis grid's voxel nearest to each native voxel along ``axis`` (the grid's voxel 0
    is centred half a voxel step in, see ``resample.grid_positions``)."""
    n, old, new = native_shape[axis], native_mm[axis], regions.spacing_mm[axis]
    grid = np.rint((np.arange(n) * old - 0.5 * (new - old)) / new).astype(np.intp)
    return np.clip(grid, 0, regions.grid_shape[axis] - 1)


def _box(found: np.ndarray) -> list[tuple[int, int]] | None:
    """Index span per axis of the True voxels, None if none."""
    spans = []
    for axis in range(found.ndim):
        hits = np.flatnonzero(found.any(axis=tuple(a for a in range(found.ndim) if a != axis)))
        if hits.size == 0:
            return None
        spans.append((int(hits[0]), int(hits[-1]) + 1))
    return spans


def _stats_box(scan: Scan, regions: Regions, grids: list[np.ndarray]) -> tuple[slice, ...]:
    """The native box that holds every labelled voxel and every native voxel whose nearest grid
    voxel is body (the whole volume where the background is every label-0 voxel): no region has a
    voxel outside it."""
    whole = tuple(slice(0, n) for n in scan.mask.shape)
    body = None if regions.grid_body is None else _box(regions.grid_body)
    if body is None:
        return whole
    native_body = []
    for grid, (g0, g1) in zip(grids, body, strict=True):  # grid index rises with native index
        hits = np.flatnonzero((grid >= g0) & (grid < g1))
        native_body.append((int(hits[0]), int(hits[-1]) + 1))
    spans = [native_body, *[s for s in (_box(scan.mask != 0),) if s]]
    return tuple(slice(min(s[axis][0] for s in spans), max(s[axis][1] for s in spans))
                 for axis in range(3))


HISTOGRAM_SPAN = 1 << 16  # whole HU spanning more than int16's range: sort instead of counting
SLAB_VOXELS = 4 * 1024**2  # a CT of 16-bit or narrower integers is counted this many at a time


def _stats(values: np.ndarray, voxel_ml: float) -> RegionStats:
    """Statistics of one region's HU values; a histogram (exact, and much faster than sorting)
    when the values are whole HU within int16's span, as CT stores them; else sorted, so memory
    stays bounded by the region's size whatever the values."""
    whole = values.astype(np.int32)
    exact = np.issubdtype(values.dtype, np.integer) or np.array_equal(whole, values)
    if not exact or int(whole.max()) - int(whole.min()) >= HISTOGRAM_SPAN:
        return RegionStats(int(values.size), round(values.size * voxel_ml, 3),
                           float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64)),
                           tuple(float(v) for v in np.percentile(values, PERCENTILES)))
    low = int(whole.min())
    return _counted(np.bincount(whole - low), low, voxel_ml)


def _counted(counts: np.ndarray, low: int, voxel_ml: float) -> RegionStats:
    """Statistics of the HU whose histogram is ``counts``, ``counts[0]`` counting ``low`` HU."""
    hu = np.arange(low, low + counts.size, dtype=np.float64)
    n = int(counts.sum())
    mean = float(counts @ hu / n)
    std = math.sqrt(max(float(counts @ (hu - mean) ** 2) / n, 0.0))
    # np.percentile's default (linear): between the order statistics floor(q) and floor(q) + 1.
    ends = np.cumsum(counts)
    percentiles = []
    for p in PERCENTILES:
        position = p / 100 * (n - 1)
        below = int(position)
        lo, hi = hu[np.searchsorted(ends, [below, min(below + 1, n - 1)], side="right")]
        percentiles.append(float(lo + (position - below) * (hi - lo)))
    return RegionStats(n, round(n * voxel_ml, 3), mean, std, tuple(percentiles))


def _native_body(regions: Regions, grids: list[np.ndarray],
                 box: tuple[slice, ...]) -> np.ndarray | None:
    """The body on the native voxels of ``box`` (each native voxel's nearest grid voxel's)."""
    if regions.grid_body is None:
        return None
    body = regions.grid_body
    for axis in (2, 1, 0):  # one axis at a time, smallest result first
        body = np.take(body, grids[axis][box[axis]], axis=axis)
    return body


def region_stats(scan: Scan, regions: Regions) -> dict[str, RegionStats]:
    """Volume and HU statistics of tibia, femur and background (label 0 inside the body, as the
    network's background region; every label-0 voxel when no body is found, as ``--crop none
    --pooling crop``), each native voxel counted in the region of its nearest grid voxel's body.
    Only the native box that holds every region is read (``_stats_box``); a CT of 16-bit or
    narrower integers is counted slab by slab into one histogram per region (no copy of a
    region's values: a native knee's background is most of the volume)."""
    voxel_ml = float(np.prod(scan.spacing_mm)) / 1000.0
    grids = [_grid_index(regions, scan.mask.shape, scan.spacing_mm, axis) for axis in range(3)]
    box = _stats_box(scan, regions, grids)
    mask, ct = scan.mask[box], scan.ct_hu[box]
    if not (np.issubdtype(ct.dtype, np.integer) and ct.dtype.itemsize <= 2):
        body = _native_body(regions, grids, box)
        stats = {}
        for name in REGIONS:  # one region's values at a time
            values = ct[members_of(name, mask, body)]
            if values.size:  # make_regions has already refused a knee without tibia or femur
                stats[name] = _stats(values, voxel_ml)
        return stats
    low = int(np.iinfo(ct.dtype).min)
    counts = {name: np.zeros(HISTOGRAM_SPAN, dtype=np.int64) for name in REGIONS}
    step = max(1, SLAB_VOXELS // max(1, ct[0].size))
    for z0 in range(0, ct.shape[0], step):
        rows = (slice(box[0].start + z0, min(box[0].stop, box[0].start + z0 + step)), *box[1:])
        body = _native_body(regions, grids, rows)
        ct_rows, mask_rows = ct[z0:z0 + step], mask[z0:z0 + step]
        for name in REGIONS:
            values = ct_rows[members_of(name, mask_rows, body)]
            counts[name] += np.bincount(values.astype(np.int32) - low, minlength=HISTOGRAM_SPAN)
    stats = {}
    for name, c in counts.items():
        seen = np.flatnonzero(c)
        if seen.size:  # from the lowest HU seen to the highest, as ``_stats`` counts
            stats[name] = _counted(c[seen[0]:seen[-1] + 1], low + int(seen[0]), voxel_ml)
    return stats
