"""Anatomy checks from the mask and header: swapped labels, the wrong side, fragments for bones;
``validate`` and ``run`` report them alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kneebatch.cli import main
from kneebatch.config import ExtractionConfig
from kneebatch.errors import InputImageError
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.inputs.phantom import make_phantom
from kneebatch.scan.read import load_scan

from ..helpers import SMALL_SHAPE, SMALL_SPACING


def _write(tmp_path: Path, side: str = "R", shift_x_mm: float = 0.0,
           edit: object = None) -> tuple[Path, Path]:
    ct, mask, _ = make_phantom(SMALL_SHAPE, SMALL_SPACING, seed=4, side=side)
    ct, mask = sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(mask, "LPS")
    if callable(edit):
        mask = edit(mask)
    for image in (ct, mask):
        x, y, z = image.GetOrigin()
        image.SetOrigin((x + shift_x_mm, y, z))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    return tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"


def _manifest(tmp_path: Path, ct: Path, mask: Path, side: str) -> Path:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"subject_id,ct,mask,side\nk1,{ct},{mask},{side}\n")
    return manifest


def test_swapped_labels_are_refused_as_femur_below_tibia(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    ct, mask = _write(tmp_path)
    manifest = _manifest(tmp_path, ct, mask, "R")
    assert main(["validate", str(manifest)]) == 0
    capsys.readouterr()
    assert main(["validate", str(manifest), "--labels", "tibia=2,femur=1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL k1" in out and "femur below tibia: labels swapped?" in out and "--labels" in out
    spec = SubjectSpec("k1", ct, mask, "R", labels=LabelMap.parse("tibia=2,femur=1"))
    with pytest.raises(InputImageError, match="femur below tibia"):
        load_scan(spec, ExtractionConfig())


def test_a_knee_on_the_patients_left_marked_r_is_warned_about(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct, mask = _write(tmp_path, side="L", shift_x_mm=120.0)  # LPS: +x is the patient's left
    manifest = _manifest(tmp_path, ct, mask, "R")
    assert main(["validate", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "note: side is R, but the knee's centre lies" in out and "patient's left" in out
    scan = load_scan(SubjectSpec("k1", ct, mask, "L"), ExtractionConfig())
    assert not any("side is" in w for w in scan.warnings)
    scan = load_scan(SubjectSpec("k1", ct, mask, "R"), ExtractionConfig())
    assert any("side is R" in w and "patient's left" in w for w in scan.warnings)


def test_a_centred_knee_gives_no_side_warning(tmp_path: Path) -> None:
    ct, mask = _write(tmp_path)
    for side in ("L", "R"):
        scan = load_scan(SubjectSpec("k1", ct, mask, side), ExtractionConfig())
        assert scan.warnings == ()


def _one_voxel_femur(mask: sitk.Image) -> sitk.Image:
    values = sitk.GetArrayFromImage(mask)
    z, y, x = (int(a[0]) for a in np.nonzero(values == 2))
    values[values == 2] = 0
    values[z, y, x] = 2
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(mask)
    return out


def test_a_bone_below_one_ml_is_warned_about(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ct, mask = _write(tmp_path, edit=_one_voxel_femur)
    assert main(["validate", str(_manifest(tmp_path, ct, mask, "R"))]) == 0
    assert "the femur holds 0.0012 mL (1 voxels), below 1 mL" in capsys.readouterr().out
    scan = load_scan(SubjectSpec("k1", ct, mask, "R"), ExtractionConfig())
    assert any("femur holds" in w for w in scan.warnings)
