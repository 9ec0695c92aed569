"""Label maps: masks with other label values give the same knee, per cohort or per manifest row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from kneebatch.cli.main import main
from kneebatch.errors import ConfigError
from kneebatch.inputs.labels import LabelMap
from kneebatch.results.subject_files import read_features

from ..helpers import write_knee


def _relabel(mask: Path, target: Path, mapping: dict[int, int], pixel: int = sitk.sitkInt16) -> Path:
    image = sitk.ReadImage(str(mask))
    values = sitk.GetArrayFromImage(image).astype(np.int32)
    out = values.copy()
    for old, new in mapping.items():
        out[values == old] = new
    relabelled = sitk.GetImageFromArray(out)
    relabelled.CopyInformation(image)
    sitk.WriteImage(sitk.Cast(relabelled, pixel), str(target))
    return target


@pytest.mark.parametrize(("text", "tibia", "femur"), [
    ("tibia=10,femur=20", (10,), (20,)),
    ("tibia=1,femur=75+76", (1,), (75, 76)),
    (" tibia = 3 , femur=-1+258 ", (3,), (-1, 258)),
], ids=["both", "several-values", "spaces-and-negative"])
def test_label_maps_parse(text: str, tibia: tuple[int, ...], femur: tuple[int, ...]) -> None:
    labels = LabelMap.parse(text)
    assert (labels.tibia, labels.femur) == (tibia, femur)
    assert LabelMap.parse(str(labels)) == labels


@pytest.mark.parametrize("text", ["tibia=1,femur=1", "patella=3", "tibia=0", "tibia=x",
                                  "tibia=1,tibia=2", "tibia=10", "femur=75+76"],
                         ids=["shared", "unknown-region", "background", "not-a-number", "twice",
                              "femur-missing", "tibia-missing"])
def test_bad_label_maps_are_refused_with_a_hint(text: str) -> None:
    with pytest.raises(ConfigError, match=r"tibia|femur|label"):
        LabelMap.parse(text)


def test_canonical_maps_every_other_value_to_no_region() -> None:
    mask = np.array([0, 10, 20, 21, 258, -1, 7], dtype=np.int32)
    canonical, unknown = LabelMap.parse("tibia=10,femur=20+21").canonical(mask)
    assert canonical.tolist() == [0, 1, 2, 2, 3, 3, 3]
    assert unknown == [-1, 7, 258]


@pytest.mark.slow
def test_relabelled_mask_with_labels_gives_the_same_vectors(tmp_path: Path, model_path: Path) -> None:
    ct, mask = write_knee(tmp_path / "in")
    other = _relabel(mask, tmp_path / "in" / "relabelled.nii.gz", {1: 10, 2: 20})
    common = ["--ct", str(ct), "--model", str(model_path), "--side", "R"]
    assert main(["extract", *common, "--mask", str(mask), "--subject-id", "a",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["extract", *common, "--mask", str(other), "--subject-id", "a",
                 "--out", str(tmp_path / "b"), "--labels", "tibia=10,femur=20"]) == 0
    original, relabelled = (read_features(tmp_path / x / "subjects" / "a") for x in "ab")
    assert original.keys() == relabelled.keys()
    for key in original:
        np.testing.assert_array_equal(original[key], relabelled[key])
    done = json.loads((tmp_path / "b" / "subjects" / "a" / "done.json").read_text())
    assert done["labels"] == "tibia=10,femur=20"
    # Without the map the relabelled mask has no tibia: a clear failure naming the map.
    assert main(["extract", *common, "--mask", str(other), "--subject-id", "a",
                 "--out", str(tmp_path / "c")]) == 1


@pytest.mark.slow
def test_manifest_columns_override_the_cohort_map_and_reach_the_parquet(
        tmp_path: Path, model_path: Path) -> None:
    ct, mask = write_knee(tmp_path / "in")
    _relabel(mask, tmp_path / "in" / "k2_mask.nii.gz", {1: 10, 2: 20})
    _relabel(mask, tmp_path / "in" / "k3_mask.nii.gz", {1: 258, 2: -1, 0: 0})
    manifest = tmp_path / "in" / "manifest.csv"
    manifest.write_text("subject_id,ct,mask,side,tibia_label,femur_label\n"
                        f"k1,{ct.name},{mask.name},R,,\n"
                        f"k2,{ct.name},k2_mask.nii.gz,R,10,20\n"
                        f"k3,{ct.name},k3_mask.nii.gz,R,258,-1\n")
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), "--model", str(model_path),
                 "--workers", "1", "--subjects-per-worker", "1"]) == 0
    sims = pd.read_parquet(out / "similarities")
    assert dict(sims.groupby("subject_id")["labels"].first()) == {
        "k1": "tibia=1,femur=2", "k2": "tibia=10,femur=20", "k3": "tibia=258,femur=-1"}
    assert "tibia_label" not in sims.columns
    by_subject = sims.pivot_table(index=["layer", "region_a", "region_b"], columns="subject_id",
                                  values="cosine")
    np.testing.assert_allclose(by_subject["k2"], by_subject["k1"], rtol=0, atol=0)
    np.testing.assert_allclose(by_subject["k3"], by_subject["k1"], rtol=0, atol=0)
    assert json.loads((out / "run.json").read_text())["labels"] == "tibia=1,femur=2"


def test_validate_reads_mask_values_and_names_what_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct, mask = write_knee(tmp_path / "in")
    _relabel(mask, tmp_path / "in" / "nofemur.nii.gz", {2: 0})
    _relabel(mask, tmp_path / "in" / "other.nii.gz", {2: 300})
    manifest = tmp_path / "in" / "manifest.csv"
    manifest.write_text("subject_id,ct,mask\n"
                        f"good,{ct.name},{mask.name}\n"
                        f"nofemur,{ct.name},nofemur.nii.gz\n"
                        f"other,{ct.name},other.nii.gz\n")
    assert main(["validate", str(manifest)]) == 1
    printed = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in printed.splitlines() if ":" in line}
    assert lines["ok   good"]
    assert "no femur voxels" in lines["FAIL nofemur"]
    assert "no femur voxels" in lines["FAIL other"] and "300" in lines["FAIL other"]
    assert main(["validate", str(manifest), "--labels", "tibia=1,femur=300"]) == 1
    printed = capsys.readouterr().out
    assert "ok   other" in printed and "FAIL good" in printed
