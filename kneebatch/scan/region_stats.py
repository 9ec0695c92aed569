"""Region statistics for QC and covariates: each region's volume and HU distribution on the native
grid (the scan as read, before the HU window and resampling), recorded in ``done.json`` and gathered
into the ``regions`` Parquet dataset."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kneebatch.config import LABELS, REGIONS
from kneebatch.inputs.labels import BACKGROUND
from kneebatch.scan.read import Scan
from kneebatch.scan.regions import Regions
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


def _body_on_native(regions: Regions, native_shape: tuple[int, ...],
                    native_mm: tuple[float, float, float]) -> np.ndarray | None:
    """The analysis grid's body mask looked up at each native voxel (nearest grid voxel: the
    resampled grid's voxel 0 is centred half a voxel step in, see ``resample.grid_positions``); one
    axis at a time, smallest result first."""
    if regions.grid_body is None:
        return None
    body = regions.grid_body
    for axis in (2, 1, 0):
        n, old, new = native_shape[axis], native_mm[axis], regions.spacing_mm[axis]
        grid = np.rint((np.arange(n) * old - 0.5 * (new - old)) / new).astype(np.intp)
        body = np.take(body, np.clip(grid, 0, body.shape[axis] - 1), axis=axis)
    return body


HISTOGRAM_SPAN = 1 << 16  # whole HU spanning more than int16's range: sort instead of counting


def _stats(values: np.ndarray, voxel_ml: float) -> RegionStats:
    """Statistics of one region's HU values; a histogram (exact, and much faster than sorting)
    when the values are whole HU within int16's span, as CT stores them; else sorted, so memory
    stays bounded by the region's size whatever the values."""
    whole = values.astype(np.int32)
    if not np.array_equal(whole, values) or int(whole.max()) - int(whole.min()) >= HISTOGRAM_SPAN:
        return RegionStats(int(values.size), round(values.size * voxel_ml, 3),
                           float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64)),
                           tuple(float(v) for v in np.percentile(values, PERCENTILES)))
    low = int(whole.min())
    counts = np.bincount(whole - low)
    hu = np.arange(low, low + counts.size, dtype=np.float64)
    n = int(values.size)
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


def region_stats(scan: Scan, regions: Regions) -> dict[str, RegionStats]:
    """Volume and HU statistics of tibia, femur and background (label 0 inside the body, as the
    network's background region; every label-0 voxel when no body is found, as ``--crop none
    --pooling crop``)."""
    voxel_ml = float(np.prod(scan.spacing_mm)) / 1000.0
    body = _body_on_native(regions, scan.mask.shape, scan.spacing_mm)
    stats = {}
    for name in REGIONS:
        members = scan.mask == LABELS.get(name, BACKGROUND)
        if name == "background" and body is not None:
            members &= body
        values = scan.ct_hu[members]
        if values.size:  # make_regions has already refused a knee without this region
            stats[name] = _stats(values, voxel_ml)
    return stats
