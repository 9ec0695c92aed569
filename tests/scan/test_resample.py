"""Resampling to the analysis grid as per-axis matrices, held to what it replaces: scipy's
``gaussian_filter`` (edge values continued) and SimpleITK's linear and nearest-neighbour
``Resample`` on the whole volume."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from kneebatch.scan.resample import resample_labels, smooth_and_resample

WINDOW = (-1000.0, 2000.0)
TOLERANCE_HU = 2e-3  # float32 rounding of sums of a few hundred HU-sized products


def _sitk_resample(array: np.ndarray, spacing: tuple[float, ...], target: float,
                   interpolator: int, default: float) -> np.ndarray:
    """SimpleITK's resample to ``target`` mm keeping the field of view (the grid kneebatch uses)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing)))
    old = np.array(image.GetSpacing())
    new = np.full(3, target)
    size = [max(1, round(n * s / target)) for n, s in zip(image.GetSize(), old, strict=True)]
    origin = np.array(image.GetOrigin()) + 0.5 * (new - old)
    out = sitk.Resample(image, size, sitk.Transform(), interpolator, origin.tolist(), new.tolist(),
                        image.GetDirection(), default, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def _ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Noisy air (some of it below the window) around a block of tissue and bone."""
    rng = np.random.default_rng(seed)
    ct = (-1010 + 40 * rng.standard_normal(shape)).astype(np.float32)
    z, y, x = shape
    ct[z // 5:-z // 5, y // 4:-y // 4, x // 5:-x // 3] = 60 + 30 * rng.standard_normal()
    ct[z // 3:z // 2, y // 3:y // 2, x // 3:x // 2] = 2400.0  # bone above the window
    return ct


@pytest.mark.parametrize(("shape", "spacing", "target"), [
    ((31, 90, 77), (0.8, 0.35, 0.35), 1.0),  # clinical: in-plane smoothed, slices interpolated
    ((20, 45, 52), (1.5, 0.4, 0.45), 1.0),  # thick slices: z upsampled (edges continued)
    ((24, 30, 33), (0.5, 0.5, 0.5), 1.0),  # every axis smoothed, by a factor of 2
])
def test_the_whole_volume_matches_scipy_and_simpleitk(shape: tuple[int, int, int],
                                                      spacing: tuple[float, float, float],
                                                      target: float) -> None:
    ct = _ct(shape)
    sigmas = [max(0.0, (target - s) / 2) / s for s in spacing]
    sigmas = [s if s >= 1 / 3 else 0.0 for s in sigmas]
    reference = _sitk_resample(
        ndimage.gaussian_filter(np.clip(ct, *WINDOW), sigmas, output=np.float32, mode="nearest"),
        spacing, target, sitk.sitkLinear, WINDOW[0])
    whole = tuple((0, n) for n in shape)
    ours = smooth_and_resample(ct, whole, spacing, target, sigmas, WINDOW)
    assert ours.shape == reference.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE_HU)


def test_a_box_is_smoothed_on_its_own_in_a_volume_of_air() -> None:
    # what kneebatch did before the matrices: the box filtered alone, pasted into air, resampled
    ct = _ct((31, 90, 77), seed=1)
    spacing, sigmas = (0.8, 0.35, 0.35), [0.0, 0.93, 0.93]
    box = ((3, 27), (10, 70), (12, 60))
    inside = tuple(slice(a, b) for a, b in box)
    pasted = np.full(ct.shape, WINDOW[0], dtype=np.float32)
    pasted[inside] = ndimage.gaussian_filter(np.clip(ct[inside], *WINDOW), sigmas,
                                             output=np.float32, mode="nearest")
    reference = _sitk_resample(pasted, spacing, 1.0, sitk.sitkLinear, WINDOW[0])
    np.testing.assert_allclose(smooth_and_resample(ct, box, spacing, 1.0, sigmas, WINDOW),
                               reference, rtol=0, atol=TOLERANCE_HU)


def _as_stored(*spacing: float) -> tuple[float, ...]:
    """Voxel sizes as a NIfTI header stores them (float32): 0.35 is 0.3499999940395355."""
    return tuple(float(np.float32(s)) for s in spacing)


@pytest.mark.parametrize(("shape", "spacing"), [((31, 90, 77), _as_stored(0.8, 0.35, 0.35)),
                                                ((20, 45, 52), _as_stored(1.5, 0.4, 0.45))])
def test_labels_match_simpleitk_nearest_neighbour(shape: tuple[int, int, int],
                                                  spacing: tuple[float, float, float]) -> None:
    labels = np.random.default_rng(2).integers(0, 4, shape).astype(np.uint8)
    np.testing.assert_array_equal(
        resample_labels(labels, spacing, 1.0),
        _sitk_resample(labels, spacing, 1.0, sitk.sitkNearestNeighbor, 0))


def test_a_grid_voxel_centred_between_two_native_ones_takes_the_upper() -> None:
    # 0.35 mm exactly: grid voxel 10 of 1 mm is centred at native index 29.5
    labels = np.zeros((3, 3, 60), np.uint8)
    labels[..., 30] = 1
    assert resample_labels(labels, (1.0, 1.0, 0.35), 1.0)[1, 1, 10] == 1
