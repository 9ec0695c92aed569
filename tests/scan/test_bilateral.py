"""Bilateral scans: side 'both' splits one CT with both legs into two knees, <id>_L and <id>_R."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from kneebatch.cli.main import main
from kneebatch.errors import ManifestError
from kneebatch.inputs.manifest import read_manifest
from kneebatch.inputs.phantom import make_bilateral_phantom
from kneebatch.results.subject_files import read_features

from ..helpers import SMALL_SHAPE, SMALL_SPACING, write_knee


def _write_bilateral(folder: Path, seed: int = 3) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ct, mask = make_bilateral_phantom(SMALL_SHAPE, SMALL_SPACING, seed)
    paths = folder / "both_ct.nii.gz", folder / "both_mask.nii.gz"
    sitk.WriteImage(ct, str(paths[0]))
    sitk.WriteImage(mask, str(paths[1]))
    return paths


def test_side_both_makes_two_knees_in_the_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,ct,mask,side,site\nscan1,a.nii.gz,b.nii.gz,both,X\n"
                        "scan1_L,c.nii.gz,d.nii.gz,L,X\n")
    with pytest.raises(ManifestError, match=r"scan1_L.*repeats row 2"):
        read_manifest(manifest)
    manifest.write_text("subject_id,ct,mask,side,site\nscan1,a.nii.gz,b.nii.gz,Both,X\n")
    specs = read_manifest(manifest)
    assert [(s.subject_id, s.side, s.bilateral, s.extra) for s in specs] == [
        ("scan1_L", "L", True, {"site": "X"}), ("scan1_R", "R", True, {"site": "X"})]


@pytest.mark.slow
def test_each_leg_of_a_bilateral_scan_is_the_knee_alone(tmp_path: Path, model_path: Path) -> None:
    ct, mask = _write_bilateral(tmp_path / "in", seed=3)
    common = ["--model", str(model_path)]
    assert main(["extract", "--ct", str(ct), "--mask", str(mask), "--subject-id", "scan",
                 "--side", "both", "--out", str(tmp_path / "both"), *common]) == 0
    split, single = {}, {}
    for side, seed in (("R", 3), ("L", 4)):
        alone = write_knee(tmp_path / "in", f"alone_{side}", seed=seed, side=side)
        assert main(["extract", "--ct", str(alone[0]), "--mask", str(alone[1]), "--subject-id",
                     f"scan_{side}", "--side", side, "--out", str(tmp_path / "alone"),
                     *common]) == 0
        split[side] = read_features(tmp_path / "both" / "subjects" / f"scan_{side}")
        single[side] = read_features(tmp_path / "alone" / "subjects" / f"scan_{side}")
        assert split[side].keys() == single[side].keys()

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    # The cut runs through the middle of the gap between the legs, so each knee is the knee alone
    # up to the couch (one piece under both legs, cut at the split): the same vectors within
    # rounding, and far closer to its own knee than to the other leg.
    for side, other in (("R", "L"), ("L", "R")):
        for key, vector in split[side].items():
            assert cos(vector, single[side][key]) > 1 - 1e-4, (side, key)
        tibia = "tibia.denseblock2"
        assert cos(split[side][tibia], single[side][tibia]) > cos(split[side][tibia],
                                                                  single[other][tibia])


@pytest.mark.slow
def test_a_scan_whose_legs_cannot_be_separated_fails_that_subject(
        tmp_path: Path, model_path: Path) -> None:
    ct, mask = write_knee(tmp_path / "in", "one_leg")
    bilateral_ct, bilateral_mask = _write_bilateral(tmp_path / "in")
    manifest = tmp_path / "in" / "m.csv"
    manifest.write_text("subject_id,ct,mask,side\n"
                        f"single,{ct.name},{mask.name},both\n"
                        f"pair,{bilateral_ct.name},{bilateral_mask.name},both\n")
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), "--model", str(model_path),
                 "--workers", "1"]) == 1
    failures = pd.read_csv(out / "failures.csv").set_index("subject_id")
    assert sorted(failures.index) == ["single_L", "single_R"]
    assert "legs cannot be separated" in failures.loc["single_L", "error"]
    sims = pd.read_parquet(out / "similarities")
    assert sorted(sims["subject_id"].unique()) == ["pair_L", "pair_R"]


def test_validate_names_rows_that_look_bilateral(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ct, mask = _write_bilateral(tmp_path / "in")
    single = write_knee(tmp_path / "in", "single")
    manifest = tmp_path / "in" / "m.csv"
    manifest.write_text("subject_id,ct,mask,side\n"
                        f"pair,{ct.name},{mask.name},R\n"
                        f"fine,{ct.name},{mask.name},both\n"
                        f"single,{single[0].name},{single[1].name},R\n")
    assert main(["validate", str(manifest)]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "bilateral scan?" in lines["ok   pair"]
    assert "bilateral" not in lines["ok   fine_L"] + lines["ok   single"]
