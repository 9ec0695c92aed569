"""Region split: HU window, resampling, crops, padding, missing labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kneebatch.config import CropMode, ExtractionConfig
from kneebatch.errors import RegionError
from kneebatch.scan.read import Scan
from kneebatch.scan.regions import body_mask, make_regions
from kneebatch.schema import PERCENTILES

NATIVE = ExtractionConfig.seed()  # native grid, no crop, the seed's grey normalisation


def _scan(ct: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
          ) -> Scan:
    return Scan("s1", ct.astype(np.float32), mask.astype(np.uint8), spacing, "R", "LPS")


def _blocks(shape: tuple[int, int, int] = (40, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """Air around a soft-tissue box holding a tibia block (label 1) and a femur block (label 2)."""
    ct = np.full(shape, -1000.0)
    ct[5:35, 5:35, 5:35] = 40.0
    mask = np.zeros(shape)
    ct[8:18, 10:30, 10:30] = 700.0
    mask[8:18, 10:30, 10:30] = 1
    ct[22:32, 10:30, 10:30] = 900.0
    mask[22:32, 10:30, 10:30] = 2
    return ct, mask


@pytest.mark.parametrize(("input_norm", "hu", "expected"),
                         [("grey", -1000, -0.449 / 0.226), ("grey", -3024, -0.449 / 0.226),
                          ("grey", 2000, 0.551 / 0.226), ("grey", 2500, 0.551 / 0.226),
                          ("grey", 500, (0.5 - 0.449) / 0.226),
                          ("imagenet", -1000, 0.0), ("imagenet", -3024, 0.0),
                          ("imagenet", 2000, 1.0), ("imagenet", 500, 0.5)],
                         ids=["grey-air", "grey-scanner-padding", "grey-top", "grey-above-window",
                              "grey-middle", "imagenet-air", "imagenet-scanner-padding",
                              "imagenet-top", "imagenet-middle"])
def test_hu_window_and_normalisation_by_hand(input_norm: str, hu: float, expected: float) -> None:
    ct, mask = _blocks()
    ct[20, 20, 20] = hu  # a background voxel
    regions = make_regions(_scan(ct, mask), ExtractionConfig.seed(input_norm=input_norm))
    assert regions.volumes["background"][20, 20, 20] == pytest.approx(expected, abs=1e-5)


def test_each_region_keeps_only_its_voxels() -> None:
    ct, mask = _blocks()
    regions = make_regions(_scan(ct, mask), NATIVE)
    air = NATIVE.air_value
    for name, label in (("tibia", 1), ("femur", 2), ("background", 0)):
        volume = regions.volumes[name]
        assert volume.shape == ct.shape and volume.dtype == np.float32
        assert np.all(volume[mask != label] == pytest.approx(air))
        assert np.all(volume[mask == label] > air)


def test_background_is_label_0_inside_the_body() -> None:
    ct, mask = _blocks()
    ct[:, 38, 10:30] = 150.0  # a couch under the leg: well under 10% of the body
    regions = make_regions(_scan(ct, mask), ExtractionConfig(spacing_mm=None, margin_mm=0.0,
                                                             min_size=1))
    volume, members = regions.region("background")
    box = regions.boxes["background"]
    assert box == ((5, 35), (5, 35), (5, 35))  # the body: the couch and the air are not in it
    body = np.zeros(ct.shape, dtype=bool)
    body[5:35, 5:35, 5:35] = True
    expected = (body & (mask == 0))[5:35, 5:35, 5:35]
    np.testing.assert_array_equal(members, expected)
    assert np.all(volume[~members] == 0.0) and np.all(volume[members] > 0.0)  # air outside


def test_crop_boxes_add_the_margin_and_stay_inside() -> None:
    ct, mask = _blocks()
    config = ExtractionConfig(spacing_mm=None, margin_mm=3.0, min_size=1)
    regions = make_regions(_scan(ct, mask, (1.0, 1.0, 2.0)), config)
    assert regions.boxes["tibia"] == ((5, 21), (7, 33), (8, 32))  # x margin: 3 mm = 2 voxels
    assert regions.boxes["femur"] == ((19, 35), (7, 33), (8, 32))
    assert regions.boxes["background"] == ((2, 38), (2, 38), (3, 37))
    assert regions.volumes["tibia"].shape == (16, 26, 24)


def test_small_regions_are_padded_with_air_to_min_size() -> None:
    ct, mask = _blocks()
    config = ExtractionConfig(spacing_mm=None, margin_mm=0.0, min_size=32)
    regions = make_regions(_scan(ct, mask), config)
    tibia = regions.volumes["tibia"]
    assert tibia.shape == (32, 32, 32)
    assert np.all(tibia[:11] == pytest.approx(config.air_value))  # (32 - 10) // 2 = 11 padded
    assert np.all(tibia[11:21, 6:26, 6:26] > config.air_value)


def test_body_crop_drops_the_couch_and_keeps_two_legs() -> None:
    ct = np.full((20, 60, 80), -1000.0)
    ct[:, 10:40, 5:30] = 40  # right leg
    ct[:, 10:38, 45:72] = 40  # left leg, a bit smaller
    ct[:, 50:51, 10:70] = 200  # couch: a thin slab, under 10% of a leg
    ct[3, 2, 2] = 500  # a speck
    body = body_mask(ct, -500.0, 0.1)
    assert body[:, 10:40, 5:30].all() and body[:, 10:38, 45:72].all()
    assert not body[:, 50:53].any() and not body[3, 2, 2]


def test_resampling_to_1mm_changes_the_grid_not_the_anatomy() -> None:
    ct, mask = _blocks((40, 40, 40))
    config = ExtractionConfig(spacing_mm=1.0, crop=CropMode.NONE)
    regions = make_regions(_scan(ct, mask, (0.5, 0.5, 0.5)), config)
    assert regions.grid_shape == (20, 20, 20) and regions.spacing_mm == (1.0, 1.0, 1.0)
    femur = regions.volumes["femur"] > config.air_value
    assert femur.sum() == pytest.approx(5 * 10 * 10, rel=0.25)


@pytest.mark.parametrize(("label", "name"), [(1, "tibia"), (2, "femur")])
def test_missing_label_fails_the_subject(label: int, name: str) -> None:
    ct, mask = _blocks()
    mask[mask == label] = 0
    with pytest.raises(RegionError, match=f"Subject s1: the mask has no {name} voxels"):
        make_regions(_scan(ct, mask), ExtractionConfig())


def test_unknown_labels_belong_to_no_region() -> None:
    ct, mask = _blocks()
    mask[1:3, 1:3, 1:3] = 7
    regions = make_regions(_scan(ct, mask), NATIVE)
    for volume in regions.volumes.values():
        assert np.all(volume[1:3, 1:3, 1:3] == pytest.approx(NATIVE.air_value))


@pytest.mark.parametrize("antialias", [True, False], ids=["smoothed", "not-smoothed"])
def test_downsampling_averages_noise_without_a_periodic_pattern(antialias: bool) -> None:
    # 12 HU white noise at 0.35 mm in-plane, resampled to 1 mm: an average over the ~8 native
    # voxels of each new one leaves about 12 / sqrt(8.2) = 4.2 HU, the same in every column.
    # Linear interpolation alone keeps 8 HU, more in the columns that fall on native voxels (a
    # pattern with the 7-voxel period of 0.35 mm against 1 mm).
    rng = np.random.default_rng(0)
    ct = (40 + 12 * rng.standard_normal((30, 120, 120))).astype(np.float32)
    mask = np.zeros(ct.shape, np.uint8)
    mask[2:10, 40:80, 40:80] = 1
    mask[15:25, 40:80, 40:80] = 2
    regions = make_regions(_scan(ct, mask, (1.0, 0.35, 0.35)),
                           ExtractionConfig(crop=CropMode.NONE, antialias=antialias))
    grid = regions.grid_hu[5:25, 5:-5, 5:-5]
    per_column = grid.std(axis=(0, 1))
    smooth = bool(grid.std() < 4.6 and per_column.max() / per_column.min() < 1.25)
    assert smooth is antialias, (grid.std(), per_column.max() / per_column.min())


def _knee_on_a_plate(plate: bool) -> Scan:
    """A clinical-size phantom knee (200 mm field of view), with a 6 mm plate of +100 HU
    touching the back of the leg where it is widest (a couch against the calf)."""
    import SimpleITK as sitk

    from kneebatch.inputs.phantom import make_phantom

    ct_img, mask_img, _ = make_phantom((40, 200, 200), (2.0, 1.0, 1.0), seed=3, side="R")
    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(ct_img, "LPS")).astype(np.float32)
    mask = sitk.GetArrayFromImage(sitk.DICOMOrient(mask_img, "LPS"))
    if plate:
        leg = body_mask(ct, -500.0, 0.1)
        back = int(np.flatnonzero(leg.any(axis=(0, 2)))[-1])  # LPS: +y is posterior
        columns = np.flatnonzero(leg.any(axis=(0, 1)))
        ct[:, back + 1:back + 7, columns[0] - 20:columns[-1] + 20] = 100.0
    return Scan("s1", ct, mask, (2.0, 1.0, 1.0), "R", "LPS")


def test_a_plate_touching_the_leg_is_not_background() -> None:
    def background_ml(scan: Scan, config: ExtractionConfig) -> float:
        regions = make_regions(scan, config)
        assert regions.grid_body is not None
        return float(((regions.grid_mask == 0) & regions.grid_body).sum()) / 1000

    config = ExtractionConfig()
    plain = background_ml(_knee_on_a_plate(False), config)
    with_plate = background_ml(_knee_on_a_plate(True), config)
    assert abs(with_plate / plain - 1) < 0.03, (plain, with_plate)
    kept = background_ml(_knee_on_a_plate(True), ExtractionConfig(body_thin_mm=0))
    assert kept / plain - 1 > 0.05  # without the opening the plate is counted as body


def test_region_statistics_take_bounded_memory_whatever_the_hu() -> None:
    import tracemalloc

    from kneebatch.scan.region_stats import region_stats

    ct, mask = _blocks()
    ct[20, 20, 7] = 2e8  # one absurd value in the background: a histogram would take 1.6 GB
    scan = _scan(ct, mask)
    regions = make_regions(scan, NATIVE)  # background: every label-0 voxel
    tracemalloc.start()
    stats = region_stats(scan, regions)["background"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, peak
    values = ct[mask == 0].astype(np.float32)
    assert stats.voxels == values.size
    assert stats.hu_mean == pytest.approx(float(values.mean(dtype=np.float64)))
    assert stats.hu_percentiles == pytest.approx(np.percentile(values, PERCENTILES))


def test_resampling_only_around_the_body_feeds_the_same_inputs() -> None:
    import SimpleITK as sitk

    from kneebatch.config import REGIONS
    from kneebatch.inputs.phantom import make_phantom

    ct_img, mask_img, _ = make_phantom((30, 160, 160), (1.5, 0.4, 0.4), seed=5, side="R")
    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(ct_img, "LPS")).astype(np.float32)
    mask = sitk.GetArrayFromImage(sitk.DICOMOrient(mask_img, "LPS"))
    scan = Scan("s1", ct, mask, (1.5, 0.4, 0.4), "R", "LPS")
    config = ExtractionConfig()
    fast = make_regions(scan, config)
    plain = make_regions(scan, config, in_box=False)
    assert fast.native_box is not None and plain.native_box is None  # the fast path ran
    (_, _), (y0, y1), (x0, x1) = fast.native_box
    assert (y1 - y0) * (x1 - x0) < 0.9 * 160 * 160  # on less than the whole volume
    assert fast.boxes == plain.boxes
    np.testing.assert_array_equal(fast.grid_body, plain.grid_body)
    for name in REGIONS:
        (volume, members), (plain_volume, plain_members) = fast.region(name), plain.region(name)
        np.testing.assert_array_equal(members, plain_members)
        np.testing.assert_allclose(volume, plain_volume, rtol=0, atol=1e-6)  # float32 rounding


def test_region_statistics_read_only_the_box_around_the_regions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23: no second pass over the whole native volume; the same numbers as one."""
    import SimpleITK as sitk

    from kneebatch.config import LABELS, REGIONS
    from kneebatch.inputs.phantom import make_phantom
    from kneebatch.scan import region_stats as rs

    ct_img, mask_img, _ = make_phantom((30, 160, 160), (1.5, 0.4, 0.4), seed=5, side="R")
    ct = np.rint(sitk.GetArrayFromImage(sitk.DICOMOrient(ct_img, "LPS"))).astype(np.float32)
    mask = sitk.GetArrayFromImage(sitk.DICOMOrient(mask_img, "LPS"))
    scan = Scan("s1", ct, mask, (1.5, 0.4, 0.4), "R", "LPS")
    regions = make_regions(scan, ExtractionConfig())
    assert regions.grid_body is not None
    grids = [rs._grid_index(regions, ct.shape, scan.spacing_mm, axis) for axis in range(3)]
    box = rs._stats_box(scan, regions, grids)
    assert np.prod([b.stop - b.start for b in box]) < 0.8 * ct.size  # the fast path reads less
    body = regions.grid_body[np.ix_(*grids)]  # every native voxel's nearest grid voxel
    stats = rs.region_stats(scan, regions)
    # int16 as CT files store it: counted slab by slab (a few rows per slab), the same numbers
    monkeypatch.setattr(rs, "SLAB_VOXELS", 3 * 160 * 160)
    assert rs.region_stats(dataclasses.replace(scan, ct_hu=ct.astype(np.int16)), regions) == stats
    for name in REGIONS:
        members = mask == LABELS.get(name, 0)
        if name == "background":
            members &= body
        values = ct[members]
        assert stats[name].voxels == values.size
        assert stats[name].hu_mean == pytest.approx(float(values.mean(dtype=np.float64)))
        assert stats[name].hu_std == pytest.approx(float(values.std(dtype=np.float64)))
        assert stats[name].hu_percentiles == pytest.approx(np.percentile(values, PERCENTILES))
