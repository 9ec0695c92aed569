"""Reading CT and mask: formats, orientation, mirroring, geometry checks and bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kneebatch.config import REGIONS, CropMode, ExtractionConfig
from kneebatch.errors import GeometryError, InputImageError
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.inputs.phantom import make_phantom
from kneebatch.scan.read import load_scan
from kneebatch.scan.region_stats import region_stats
from kneebatch.scan.regions import make_regions

from ..helpers import SMALL_SHAPE, SMALL_SPACING, write_dicom_series

CONFIG = ExtractionConfig()


def _phantom() -> tuple[sitk.Image, sitk.Image]:
    ct, mask, _ = make_phantom(SMALL_SHAPE, SMALL_SPACING, seed=4, side="R")
    return sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(mask, "LPS")


def _spec(ct: Path, mask: Path, side: str | None = None) -> SubjectSpec:
    return SubjectSpec("s1", ct, mask, side)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha", "dicom"],
                         ids=["nii", "nii.gz", "nrrd", "mha", "dicom-folder-with-spaces"])
def test_every_format_gives_the_same_scan(tmp_path: Path, ext: str) -> None:
    ct, mask = _phantom()
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    sitk.WriteImage(ct, str(ref_dir / "ct.mha"))
    sitk.WriteImage(mask, str(ref_dir / "mask.mha"))
    reference = load_scan(_spec(ref_dir / "ct.mha", ref_dir / "mask.mha"), CONFIG)
    if ext == "dicom":
        ct_path = tmp_path / "my series"
        write_dicom_series(sitk.Cast(ct, sitk.sitkInt16), ct_path)
    else:
        ct_path = tmp_path / f"ct{ext}"
        sitk.WriteImage(ct, str(ct_path))
    mask_path = tmp_path / f"mask{'.nrrd' if ext == 'dicom' else ext}"
    sitk.WriteImage(mask, str(mask_path))
    scan = load_scan(_spec(ct_path, mask_path), CONFIG.__class__(resample_mask=ext == "dicom"))
    np.testing.assert_array_equal(scan.ct_hu, reference.ct_hu)
    np.testing.assert_array_equal(scan.mask, reference.mask)
    np.testing.assert_allclose(scan.spacing_mm, SMALL_SPACING, atol=1e-4)


def test_int16_ct_is_kept_as_read_and_gives_the_float_cts_inputs(tmp_path: Path) -> None:
    """CT files store int16: kept so (no float32 copy of the whole volume; at native spacing the
    windowed grid stays int16 too), with the same network inputs and region statistics as the same
    values stored as float32."""
    ct, mask = _phantom()
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    scans = {}
    for pixel in (sitk.sitkInt16, sitk.sitkFloat32):
        path = tmp_path / f"ct{pixel}.nii.gz"
        sitk.WriteImage(sitk.Cast(ct, pixel), str(path))
        scans[pixel] = load_scan(_spec(path, tmp_path / "mask.nii.gz"), CONFIG)
    assert scans[sitk.sitkInt16].ct_hu.dtype == np.int16
    assert scans[sitk.sitkFloat32].ct_hu.dtype == np.float32
    for config in (CONFIG, ExtractionConfig(spacing_mm=None, crop=CropMode.NONE),
                   ExtractionConfig.seed(hu_max=3000.5)):
        regions = {p: make_regions(scan, config) for p, scan in scans.items()}
        native_int = config.spacing_mm is None and config.hu_max == 2000
        assert regions[sitk.sitkInt16].grid_hu.dtype == (np.int16 if native_int else np.float32)
        assert regions[sitk.sitkFloat32].grid_hu.dtype == np.float32
        for name in REGIONS:
            np.testing.assert_array_equal(regions[sitk.sitkInt16].volume(name),
                                          regions[sitk.sitkFloat32].volume(name))
        assert (region_stats(scans[sitk.sitkInt16], regions[sitk.sitkInt16])
                == region_stats(scans[sitk.sitkFloat32], regions[sitk.sitkFloat32]))


def test_orientation_is_made_canonical(tmp_path: Path) -> None:
    ct, mask = _phantom()
    for code in ("LPS", "RAS", "PIL"):
        sitk.WriteImage(sitk.DICOMOrient(ct, code), str(tmp_path / f"ct_{code}.nii.gz"))
        sitk.WriteImage(sitk.DICOMOrient(mask, code), str(tmp_path / f"mask_{code}.nii.gz"))
    scans = {c: load_scan(_spec(tmp_path / f"ct_{c}.nii.gz", tmp_path / f"mask_{c}.nii.gz"),
                          CONFIG) for c in ("LPS", "RAS", "PIL")}
    assert scans["RAS"].source_orientation == "RAS"
    for code in ("RAS", "PIL"):
        np.testing.assert_array_equal(scans[code].ct_hu, scans["LPS"].ct_hu)
        np.testing.assert_array_equal(scans[code].mask, scans["LPS"].mask)
    assert scans["PIL"].spacing_mm == pytest.approx(scans["LPS"].spacing_mm)


def test_left_knee_is_mirrored_along_x(tmp_path: Path) -> None:
    ct, mask = _phantom()
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    right = load_scan(_spec(tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz", "R"), CONFIG)
    left = load_scan(_spec(tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz", "L"), CONFIG)
    np.testing.assert_array_equal(left.ct_hu, right.ct_hu[:, :, ::-1])
    np.testing.assert_array_equal(left.mask, right.mask[:, :, ::-1])


def test_phantom_left_knee_mirrored_matches_right_knee(tmp_path: Path) -> None:
    ct_r, mask_r, _ = make_phantom(SMALL_SHAPE, SMALL_SPACING, seed=6, side="R")
    ct_l, mask_l, _ = make_phantom(SMALL_SHAPE, SMALL_SPACING, seed=6, side="L")
    for name, img in {"ctr": ct_r, "mr": mask_r, "ctl": ct_l, "ml": mask_l}.items():
        sitk.WriteImage(img, str(tmp_path / f"{name}.nii.gz"))
    right = load_scan(_spec(tmp_path / "ctr.nii.gz", tmp_path / "mr.nii.gz", "R"), CONFIG)
    left = load_scan(_spec(tmp_path / "ctl.nii.gz", tmp_path / "ml.nii.gz", "L"), CONFIG)
    np.testing.assert_array_equal(left.mask, right.mask)
    assert np.mean(np.abs(left.ct_hu - right.ct_hu) < 60) > 0.99  # same anatomy, own noise


@pytest.mark.parametrize("change", ["size", "spacing", "origin", "direction"])
def test_geometry_mismatch_prints_both_geometries(tmp_path: Path, change: str) -> None:
    ct, mask = _phantom()
    if change == "size":
        mask = mask[:, :, :-1]
    elif change == "spacing":
        mask.SetSpacing((1.0, 1.0, 1.25))
    elif change == "origin":
        mask.SetOrigin(tuple(o + 0.5 for o in mask.GetOrigin()))
    else:
        mask.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    spec = _spec(tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz")
    with pytest.raises(GeometryError) as info:
        load_scan(spec, CONFIG)
    message = info.value.message
    assert "s1" in message and "--resample-mask" in message
    assert f"CT   {spec.ct}: size=" in message and f"mask {spec.mask}: size=" in message
    scan = load_scan(spec, ExtractionConfig(resample_mask=True))
    assert scan.mask.shape == scan.ct_hu.shape


def test_small_rounding_in_the_header_is_tolerated(tmp_path: Path) -> None:
    ct, mask = _phantom()
    mask.SetOrigin(tuple(o + 2e-4 for o in mask.GetOrigin()))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    load_scan(_spec(tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"), CONFIG)


def _bad_file(tmp_path: Path, kind: str) -> Path:
    ct, _ = _phantom()
    path = tmp_path / "bad.nii.gz"
    if kind == "missing":
        return tmp_path / "nope.nii.gz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("subject_id,ct\nthis is not an image\n")
    elif kind == "truncated":
        sitk.WriteImage(ct, str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif kind == "2d":
        sitk.WriteImage(ct[:, :, 5], str(path))
    elif kind == "4d":
        sitk.WriteImage(sitk.JoinSeries([ct, ct]), str(path))
    elif kind == "vector":
        sitk.WriteImage(sitk.Compose(ct, ct), str(path))
    elif kind == "gzip-of-garbage":
        path.write_bytes(gzip.compress(b"\x00" * 4000))
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated", "2d", "4d", "vector",
                                  "gzip-of-garbage"])
def test_bad_ct_file_is_named_in_a_clear_error(tmp_path: Path, kind: str) -> None:
    _, mask = _phantom()
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    bad = _bad_file(tmp_path, kind)
    with pytest.raises(InputImageError) as info:
        load_scan(_spec(bad, tmp_path / "mask.nii.gz"), CONFIG)
    assert info.value.message.startswith(f"Subject s1: CT {bad}")
    assert info.value.subject_failure


def test_float_mask_with_fractions_is_refused_but_integral_floats_pass(tmp_path: Path) -> None:
    ct, mask = _phantom()
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    as_float = sitk.Cast(mask, sitk.sitkFloat32)
    sitk.WriteImage(as_float, str(tmp_path / "ok.nii.gz"))
    load_scan(_spec(tmp_path / "ct.nii.gz", tmp_path / "ok.nii.gz"), CONFIG)
    sitk.WriteImage(as_float * 0.5, str(tmp_path / "prob.nii.gz"))
    with pytest.raises(InputImageError, match="non-integer values"):
        load_scan(_spec(tmp_path / "ct.nii.gz", tmp_path / "prob.nii.gz"), CONFIG)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_ct_is_refused(tmp_path: Path, value: float, ext: str) -> None:
    ct, mask = _phantom()
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[3, 4, 5] = value
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(ct)
    sitk.WriteImage(bad, str(tmp_path / f"ct{ext}"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    with pytest.raises(InputImageError, match="1 NaN or infinite voxels"):
        load_scan(_spec(tmp_path / f"ct{ext}", tmp_path / "mask.nii.gz"), CONFIG)


def test_dicom_folders_with_no_or_two_series_are_refused(tmp_path: Path) -> None:
    ct, mask = _phantom()
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputImageError, match="no DICOM series"):
        load_scan(_spec(tmp_path / "empty", tmp_path / "mask.nii.gz"), CONFIG)
    two = tmp_path / "two"
    write_dicom_series(sitk.Cast(ct, sitk.sitkInt16), two, prefix="a")
    write_dicom_series(sitk.Cast(ct, sitk.sitkInt16)[:, :, :10], two / "x", prefix="b")
    for f in (two / "x").iterdir():
        f.rename(two / f.name)
    with pytest.raises(InputImageError, match="2 DICOM series"):
        load_scan(_spec(two, tmp_path / "mask.nii.gz"), CONFIG)


def _tibia_to_femur_mm(ct_path: Path, mask_path: Path) -> np.ndarray:
    scan = load_scan(_spec(ct_path, mask_path, "R"), ExtractionConfig())
    centres = [np.argwhere(scan.mask == label).mean(axis=0) * scan.spacing_mm for label in (1, 2)]
    return (centres[1] - centres[0]) / np.linalg.norm(centres[1] - centres[0])  # (z, y, x)


def test_an_oblique_scan_is_resampled_onto_an_axis_aligned_grid(tmp_path: Path) -> None:
    # The same knee stored on a grid tilted 20 degrees about the L-R axis (a tilted gantry): its
    # voxel array is rotated, its direction says so. Read as axis-aligned, the femur would sit 20
    # degrees off the tibia's axis.
    ct, mask = _phantom()
    tilt = np.radians(20.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)],
                         [0, np.sin(tilt), np.cos(tilt)]])
    size, spacing = np.array(ct.GetSize()), np.array(ct.GetSpacing())
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    grid = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(rotation.ravel().tolist())
    grid.SetOrigin((centre - rotation @ ((size - 1) / 2 * spacing)).tolist())
    tilted_ct = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, ct.GetPixelID())
    tilted_mask = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                mask.GetPixelID())
    paths = {}
    for name, images in (("straight", (ct, mask)), ("tilted", (tilted_ct, tilted_mask))):
        paths[name] = (tmp_path / f"{name}_ct.nii.gz", tmp_path / f"{name}_mask.nii.gz")
        for image, path in zip(images, paths[name], strict=True):
            sitk.WriteImage(image, str(path))
    straight = _tibia_to_femur_mm(*paths["straight"])
    tilted = _tibia_to_femur_mm(*paths["tilted"])
    angle = np.degrees(np.arccos(np.clip(straight @ tilted, -1, 1)))
    assert angle < 2.0, f"the tilted scan's bones are {angle:.1f} degrees off"
    warnings = load_scan(_spec(*paths["tilted"], "R"), ExtractionConfig()).warnings
    assert any("oblique (20.0 degrees" in w for w in warnings)


@pytest.mark.parametrize("spacing", [1e-6, 50.0])
def test_an_implausible_voxel_size_is_refused_at_the_header(tmp_path: Path,
                                                            spacing: float) -> None:
    from kneebatch.scan.headers import check_headers

    ct, mask = _phantom()
    for image in (ct, mask):
        image.SetSpacing((spacing, 1.0, 1.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    spec = _spec(tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz")
    for check in (check_headers, load_scan):
        with pytest.raises(InputImageError, match=r"voxel size of .* mm, outside 0.05-20 mm"):
            check(spec, CONFIG)


def test_ct_and_mask_swapped_are_refused_by_run_and_validate(tmp_path: Path) -> None:
    from kneebatch.scan.preflight import check_mask

    ct, mask = _phantom()
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    swapped = _spec(tmp_path / "mask.nii.gz", tmp_path / "ct.nii.gz")
    with pytest.raises(InputImageError, match="swapped"):
        load_scan(swapped, CONFIG)
    with pytest.raises(InputImageError, match=r"looks like a label mask.*swapped"):
        check_mask(swapped)
    mask_as_ct = _spec(tmp_path / "mask.nii.gz", tmp_path / "mask.nii.gz")
    with pytest.raises(InputImageError, match=r"CT .*mask\.nii\.gz: looks like a label mask"):
        check_mask(mask_as_ct)
    ct_as_mask = _spec(tmp_path / "ct.nii.gz", tmp_path / "ct.nii.gz")
    with pytest.raises(InputImageError, match=r"mask .*ct\.nii\.gz: looks like a CT"):
        check_mask(ct_as_mask)


def test_validate_and_run_agree_on_a_mask_of_almost_integers(tmp_path: Path) -> None:
    from kneebatch.scan.preflight import check_mask

    ct, mask = _phantom()
    nearly = sitk.Cast(mask, sitk.sitkFloat32) * 1.0000001
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(nearly, str(tmp_path / "mask.nii.gz"))
    spec = _spec(tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz")
    for check in (lambda: load_scan(spec, CONFIG), lambda: check_mask(spec)):
        with pytest.raises(InputImageError, match="non-integer"):
            check()


def _bgzf(data: bytes, block: int = 65280) -> bytes:
    """bgzip's blocked gzip: independent members of at most 64 KiB, each naming its size."""
    import struct
    import zlib

    out = bytearray()
    for start in range(0, len(data), block):
        piece = data[start:start + block]
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = packer.compress(piece) + packer.flush()
        out += struct.pack("<4BI2BH2BHH", 0x1F, 0x8B, 8, 4, 0, 0, 0xFF, 6, 66, 67, 2,
                           len(body) + 25)
        out += body + struct.pack("<II", zlib.crc32(piece), len(piece))
    return bytes(out)


def test_a_huge_bgzip_header_is_checked_from_its_framing(tmp_path: Path) -> None:
    import tracemalloc

    from kneebatch.scan.headers import read_header

    image = sitk.Image([512, 512, 256], sitk.sitkUInt8)  # 64 MiB of zeros, 0.3 MiB on disk
    image.SetSpacing((0.5, 0.5, 1.0))
    sitk.WriteImage(image, str(tmp_path / "plain.nii"))
    raw = (tmp_path / "plain.nii").read_bytes()
    (tmp_path / "big.nii.gz").write_bytes(_bgzf(raw))
    cut = _bgzf(raw)
    (tmp_path / "cut.nii.gz").write_bytes(cut[: len(cut) // 2])
    spec = _spec(tmp_path / "big.nii.gz", tmp_path / "big.nii.gz")
    tracemalloc.start()
    assert read_header(spec, "CT", tmp_path / "big.nii.gz").size == (512, 512, 256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8e6, peak  # the voxel data was never inflated
    with pytest.raises(InputImageError, match="is truncated"):
        read_header(spec, "CT", tmp_path / "cut.nii.gz")


def test_a_multi_member_gzip_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    import tracemalloc

    from kneebatch.scan.headers import read_header

    image = sitk.Image([256, 256, 128], sitk.sitkFloat32)  # 32 MiB of float voxels
    image.SetSpacing((0.5, 0.5, 1.0))
    sitk.WriteImage(image, str(tmp_path / "plain.nii"))
    raw = (tmp_path / "plain.nii").read_bytes()
    half = len(raw) // 2
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:-8]))
    spec = _spec(tmp_path / "two.nii.gz", tmp_path / "two.nii.gz")
    tracemalloc.start()
    read_header(spec, "CT", tmp_path / "two.nii.gz")
    from kneebatch.scan.files import check_file
    check_file(spec, "CT", tmp_path / "two.nii.gz", scan_values=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24e6, peak  # pieces of 4 MiB, never the whole 32 MiB
    with pytest.raises(InputImageError, match="is truncated"):
        read_header(spec, "CT", tmp_path / "short.nii.gz")


def test_validate_checks_a_dicom_series_grid_from_its_headers(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    from kneebatch.cli import main
    from kneebatch.scan.geometry import header_of, same_grid
    from kneebatch.scan.headers import read_header

    ct, mask = _phantom()
    tilted = sitk.Image(ct)
    tilted.SetDirection((1, 0, 0, 0, 0.8, -0.6, 0, 0.6, 0.8))  # an oblique series
    for name, image in (("axial", ct), ("oblique", tilted)):
        write_dicom_series(sitk.Cast(image, sitk.sitkInt16), tmp_path / name)
        full = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / name)))
        header = read_header(_spec(tmp_path / name, tmp_path / name), "CT", tmp_path / name)
        assert same_grid(header, header_of(full)), (header, header_of(full))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    other = sitk.Image(mask)
    other.SetOrigin((0.0, 0.0, 50.0))
    sitk.WriteImage(other, str(tmp_path / "other.nrrd"))
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"subject_id,ct,mask,side\nsame,{tmp_path / 'axial'},{tmp_path / 'mask.nrrd'},R\n"
                        f"moved,{tmp_path / 'axial'},{tmp_path / 'other.nrrd'},R\n")
    assert main(["validate", str(manifest), "--headers-only"]) == 1
    out = capsys.readouterr().out
    assert "ok   same" in out
    assert "FAIL moved" in out and "is not on the CT's voxel grid" in out and "origin=" in out
    assert "Not checked: each mask's values and anatomy and the CT's middle slice" in out
