"""Regions stage: HU window, resample, split by label, crop, pad.

Input is a ``Scan`` (z, y, x) in HU; output is one float32 network input per region (the window
mapped to the network's input, air outside the region), the region's voxels in it (for region
pooling), and the crop boxes (for QC and provenance).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kneebatch.config import LABELS, REGIONS, CropMode, ExtractionConfig
from kneebatch.errors import RegionError
from kneebatch.scan.body import body_mask, coarse_steps
from kneebatch.scan.read import Scan
from kneebatch.scan.resample import TRUNCATE, Box, resample_labels, smooth_and_resample


def members_of(name: str, mask: np.ndarray, body: np.ndarray | None) -> np.ndarray:
    """Where region ``name`` is in ``mask`` (labels): its label's voxels; for the background,
    label 0 inside ``body`` (not the air around the leg) where a body is given."""
    members = mask == LABELS.get(name, 0)
    if name == "background" and body is not None:
        members &= body
    return members


@dataclasses.dataclass(frozen=True)
class Regions:
    """What the network sees for one subject: the grid and the crop boxes. Region volumes are cut
    on demand, one at a time, so only one exists during a forward pass.

    Attributes:
        grid_hu: the resampled volume in HU, clipped to the window, float32 (z, y, x); at native
            spacing the CT's own integer type where it has one (int16: half the memory).
        grid_mask: its labels, uint8 (z, y, x).
        grid_body: the body (see ``body_mask``), bool (z, y, x), or None where the background is
            every label-0 voxel (``--crop none`` with ``--pooling crop``: the seed's).
        boxes: region name -> ((z0, z1), (y0, y1), (x0, x1)) crop box on the grid.
        spacing_mm: voxel size of the grid (z, y, x).
        config: the settings (window, normalisation, padding).
        native_box: the native box the grid's CT was computed from (None: the whole volume).
    """

    grid_hu: np.ndarray
    grid_mask: np.ndarray
    grid_body: np.ndarray | None
    boxes: dict[str, Box]
    spacing_mm: tuple[float, float, float]
    config: ExtractionConfig
    native_box: Box | None = None

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Shape of the grid (z, y, x)."""
        z, y, x = self.grid_hu.shape
        return (z, y, x)

    def _members(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
        return members_of(name, self.grid_mask[box],
                          None if self.grid_body is None else self.grid_body[box])

    def members(self, name: str) -> np.ndarray:
        """Where a region is on the whole grid: bool (z, y, x), its voxels inside its crop box
        (what the network is fed of it; for QC)."""
        box = tuple(slice(a, b) for a, b in self.boxes[name])
        out = np.zeros(self.grid_shape, dtype=bool)
        out[box] = self._members(name, box)
        return out

    def region(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The network input of one region and where the region is in it.

        Returns:
            float32 (z, y, x): the CT in the region, air elsewhere and in the padding up to
            ``min_size``; and bool (z, y, x), the same shape: the region's voxels.
        """
        config = self.config
        box = tuple(slice(a, b) for a, b in self.boxes[name])  # (z, y, x)
        scale, offset = config.input_scale_offset
        volume = self.grid_hu[box].astype(np.float32)  # one copy, mapped in place: a native
        volume *= np.float32(scale)  # knee's regions are whole volumes
        volume += np.float32(offset)
        members = self._members(name, box)
        np.copyto(volume, np.float32(config.air_value), where=~members)
        return (_pad(volume, config.min_size, config.air_value),
                _pad(members, config.min_size, False))

    def volume(self, name: str) -> np.ndarray:
        """The network input of one region: float32 (z, y, x), air outside it."""
        return self.region(name)[0]

    @property
    def volumes(self) -> dict[str, np.ndarray]:
        """All three region volumes at once (for tests and notebooks; costs their memory)."""
        return {name: self.volume(name) for name in REGIONS}


def antialias_sigmas_mm(spacing_mm: tuple[float, ...], target_mm: float) -> tuple[float, ...]:
    """Gaussian sigma per axis before resampling to ``target_mm``: ``(target - native) / 2`` where
    the grid gets coarser, 0 elsewhere (scikit-image ``resize``'s ``(factor - 1) / 2`` voxels)."""
    return tuple(max(0.0, (target_mm - s) / 2) for s in spacing_mm)


def _sigmas_voxels(spacing_mm: tuple[float, ...], target_mm: float) -> list[float]:
    """The anti-aliasing sigmas in voxels; under a third of a voxel a neighbour weighs < 1%: not
    worth it (0.8 mm slices to 1 mm give 0.125 voxels)."""
    sigmas = [s_mm / s for s_mm, s in zip(antialias_sigmas_mm(spacing_mm, target_mm), spacing_mm,
                                          strict=True)]
    return [sigma if sigma >= 1 / 3 else 0.0 for sigma in sigmas]


def _resampled(scan: Scan, config: ExtractionConfig, target_mm: float, in_box: bool
               ) -> tuple[np.ndarray, Box | None]:
    """The window-clipped CT on the ``target_mm`` grid, Gaussian-smoothed first along the axes that
    get coarser (``resample.smooth_and_resample``).

    With ``in_box``, computed from the native box that holds every voxel above the body threshold
    (seen on a coarse copy) and every labelled voxel, grown by the filter's reach and a coarse
    step, as if the volume were air outside it (the box smoothed on its own). Every grid voxel the
    body mask looks at as possibly body, and every voxel the network is fed (body, bones), then
    takes the values of the whole volume's (to float32 rounding): the filter's and interpolation's
    reach from any of them stays inside the box. Only air far from anything above the threshold
    differs, and it is never fed (tests compare both ways).

    Returns:
        The grid's CT and the native box it was computed from (None: the whole volume).
    """
    sigmas = _sigmas_voxels(scan.spacing_mm, target_mm) if config.antialias else [0.0] * 3
    box = _native_box(scan, config, sigmas) if in_box else None
    whole = tuple((0, n) for n in scan.ct_hu.shape)
    return smooth_and_resample(scan.ct_hu, box or whole, scan.spacing_mm, target_mm, sigmas,
                               (config.hu_min, config.hu_max)), box


def _native_box(scan: Scan, config: ExtractionConfig, sigmas: list[float]) -> Box | None:
    """See ``_resampled``; None when nothing is above the threshold or labelled."""
    steps = coarse_steps(scan.spacing_mm)
    above = scan.ct_hu[::steps[0], ::steps[1], ::steps[2]] > config.body_threshold_hu
    spans = [s for s in (_extent(above, steps), _extent(scan.mask != 0, [1, 1, 1])) if s]
    if not spans:
        return None
    box = []
    for axis, n in enumerate(scan.ct_hu.shape):
        reach = int(TRUNCATE * sigmas[axis] + 0.5) + steps[axis] + 2  # Gaussian + linear + coarse
        box.append((max(0, min(s[axis][0] for s in spans) - reach),
                    min(n, max(s[axis][1] for s in spans) + reach)))
    return tuple(box)


def _extent(found: np.ndarray, steps: list[int]) -> tuple[tuple[int, int], ...] | None:
    """Native index span per axis of the True voxels of a (strided) array, None if none."""
    if not found.any():
        return None
    box = _bbox(found, (0, 0, 0))
    return tuple((a * step, b * step) for (a, b), step in zip(box, steps, strict=True))


def _bbox(found: np.ndarray, margin: tuple[int, ...]) -> Box:
    """Bounding box of the True voxels, grown by ``margin`` voxels and clipped to the volume."""
    box = []
    for axis, pad in enumerate(margin):
        other = tuple(a for a in range(found.ndim) if a != axis)
        hits = np.flatnonzero(found.any(axis=other))
        box.append((max(0, int(hits[0]) - pad), min(found.shape[axis], int(hits[-1]) + 1 + pad)))
    return tuple(box)


def _clipped(ct_hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """A copy of the CT clipped to the window: in the CT's own integer type where that gives the
    same values (whole-number window ends; a native-resolution knee's int16 grid takes half the
    memory of float32), else float32."""
    if np.issubdtype(ct_hu.dtype, np.integer) and float(low).is_integer() and \
            float(high).is_integer():
        info = np.iinfo(ct_hu.dtype)
        lowest, highest = max(low, info.min), min(high, info.max)  # the type's own range
        if lowest <= highest:
            return np.clip(ct_hu, ct_hu.dtype.type(lowest), ct_hu.dtype.type(highest))
    ct = ct_hu.astype(np.float32)  # a copy, clipped in place
    np.clip(ct, low, high, out=ct)
    return ct


def _pad(volume: np.ndarray, min_size: int, air: float) -> np.ndarray:
    missing = [max(0, min_size - n) for n in volume.shape]
    if not any(missing):
        return volume
    return np.pad(volume, [(m // 2, m - m // 2) for m in missing], constant_values=air)


def make_regions(scan: Scan, config: ExtractionConfig, *, in_box: bool = True) -> Regions:
    """Window, resample and find the crop boxes of a scan's three regions.

    Args:
        scan: CT (HU) and mask, (z, y, x).
        config: window, spacing, crop, margin, padding settings.
        in_box: with ``--crop bbox``, resample only the box around the body and bones (the same
            network inputs; False: the whole volume, for tests).

    Returns:
        The grid and boxes; ``Regions.volume(name)`` cuts each network input.

    Raises:
        RegionError: tibia or femur (or background) has no voxels.
    """
    mask = scan.mask
    spacing = scan.spacing_mm
    native_box = None
    if config.spacing_mm is not None:
        ct, native_box = _resampled(scan, config, config.spacing_mm,
                                    in_box and config.crop is CropMode.BBOX)
        mask = resample_labels(mask, spacing, config.spacing_mm)
        spacing = (config.spacing_mm,) * 3
    else:
        ct = _clipped(scan.ct_hu, config.hu_min, config.hu_max)
    full: Box = tuple((0, n) for n in ct.shape)
    boxes: dict[str, Box] = dict.fromkeys(REGIONS, full)
    margin = tuple(math.ceil(config.margin_mm / s) for s in spacing)
    for name in REGIONS:
        members = mask == LABELS.get(name, 0)
        if not members.any():
            raise RegionError(
                f"Subject {scan.subject_id}: the mask has no {name} voxels ({name}="
                f"{'+'.join(map(str, scan.labels.values_of(name)))}) on the "
                f"{'resampled' if config.spacing_mm else 'native'} grid. Check the segmentation "
                "and its label values (--labels, or the manifest's tibia_label / femur_label "
                "columns) or drop the subject."
            )
        if config.crop is CropMode.BBOX and name in LABELS:
            boxes[name] = _bbox(members, margin)
    body = None
    if config.crop is CropMode.BBOX or config.pooling == "region":
        body = body_mask(ct, config.body_threshold_hu, config.body_min_fraction, spacing,
                         config.body_thin_mm)
        if not (body & (mask == 0)).any():
            raise RegionError(
                f"Subject {scan.subject_id}: no background voxels inside the body (nothing above "
                f"{config.body_threshold_hu:g} HU outside the bones). Check that the CT is in HU "
                "and belongs to this mask.")
        if config.crop is CropMode.BBOX:
            boxes["background"] = _bbox(body, margin)
    return Regions(
        grid_hu=ct,
        grid_mask=mask,
        grid_body=body,
        boxes=boxes,
        spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        config=config,
        native_box=native_box,
    )
