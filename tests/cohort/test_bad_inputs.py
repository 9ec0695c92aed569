"""The bad-input matrix: one `kneebatch run` over a cohort of good subjects and every kind of bad
one; each bad subject is in failures.csv with a message naming its file and the fix, the good ones
finish, nothing partial is left, and the exit code is 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from kneebatch.cli.main import main
from kneebatch.inputs.phantom import make_phantom

from ..helpers import write_dicom_series

SHAPE, SPACING = (40, 48, 48), (1.2, 1.0, 1.0)
MEMORY = "3GB"  # per worker; the "too big" CT is predicted to need more


def _pair(seed: int = 1) -> tuple[sitk.Image, sitk.Image]:
    ct, mask, _ = make_phantom(SHAPE, SPACING, seed, "R")
    return sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(mask, "LPS")


def _write(image: sitk.Image, path: Path) -> str:
    """Write; return the path as the manifest gives it: relative to the manifest's folder."""
    sitk.WriteImage(image, str(path))
    return str(path.relative_to(path.parent.parent if path.parent.name == "with, comma"
                                else path.parent))


def _relabel(mask: sitk.Image, old: int, new: int) -> sitk.Image:
    array = sitk.GetArrayFromImage(mask)
    array[array == old] = new
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(mask)
    return out


def _with_value(ct: sitk.Image, value: float) -> sitk.Image:
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[10, 10, 10] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(ct)
    return out


# subject id -> (stage in failures.csv, text the message must hold, which file it must name)
BAD = {
    "missing_file": ("read", "does not exist", "ct"),
    "empty_file": ("read", "is an empty file", "ct"),
    "truncated_gz": ("read", "is truncated", "ct"),
    "text_as_nifti": ("read", "cannot be read as an image", "ct"),
    "dicom_no_series": ("read", "holds no DICOM series", "ct"),
    "dicom_two_series": ("read", "holds 2 DICOM series", "ct"),
    "image_2d": ("read", "not a 3D volume", "ct"),
    "image_4d": ("read", "not a 3D volume", "ct"),
    "float_mask": ("read", "non-integer values", "mask"),
    "no_tibia": ("regions", "no tibia voxels (tibia=1)", ""),
    "no_femur": ("regions", "no femur voxels (femur=2)", ""),
    "size_mismatch": ("geometry", "not on the CT's voxel grid", "mask"),
    "spacing_mismatch": ("geometry", "not on the CT's voxel grid", "mask"),
    "origin_mismatch": ("geometry", "not on the CT's voxel grid", "mask"),
    "direction_mismatch": ("geometry", "not on the CT's voxel grid", "mask"),
    "nan_ct": ("read", "NaN or infinite voxels", "ct"),
    "inf_ct": ("read", "NaN or infinite voxels", "ct"),
    "too_big": ("memory", "need about", "ct"),
}
FIXES = {"read": ("Give", "Check", "Export", "Copy", "Move", "Fix", "Point"), "regions": ("Check",),
         "geometry": ("--resample-mask",), "memory": ("--memory-per-worker",)}


def _build(folder: Path) -> Path:
    ct, mask = _pair()
    rows = ["subject_id,ct,mask,side,site"]

    def add(sid: str, ct_name: str, mask_name: str) -> None:
        rows.append(f'{sid},"{ct_name}","{mask_name}",R,X')

    good_ct, good_mask = _write(ct, folder / "good_ct.nii.gz"), _write(mask, folder / "good_mask.nii.gz")
    add("good_1", good_ct, good_mask)
    (folder / "with, comma").mkdir()
    add("good_2", _write(ct, folder / "with, comma" / "ct.nrrd"), good_mask)
    add("unknown_label", good_ct, _write(_add_label(mask), folder / "label7.nii.gz"))
    add("missing_file", "nope.nii.gz", good_mask)
    (folder / "empty.nii.gz").write_bytes(b"")
    add("empty_file", "empty.nii.gz", good_mask)
    data = (folder / good_ct).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    add("truncated_gz", "truncated.nii.gz", good_mask)
    (folder / "text.nii.gz").write_text("this is a spreadsheet, not a scan\n")
    add("text_as_nifti", "text.nii.gz", good_mask)
    (folder / "dicom_empty").mkdir()
    add("dicom_no_series", "dicom_empty", good_mask)
    write_dicom_series(sitk.Cast(ct, sitk.sitkInt16), folder / "dicom two", prefix="a ")
    write_dicom_series(sitk.Cast(ct, sitk.sitkInt16)[:, :, :8], folder / "other", prefix="b ")
    for f in (folder / "other").iterdir():
        shutil.move(str(f), folder / "dicom two" / f.name)
    add("dicom_two_series", "dicom two", good_mask)
    add("image_2d", _write(ct[:, :, 5], folder / "2d.nii.gz"), good_mask)
    add("image_4d", _write(sitk.JoinSeries([ct, ct]), folder / "4d.nii.gz"), good_mask)
    add("float_mask", good_ct, _write(sitk.Cast(mask, sitk.sitkFloat32) * 0.5,
                                      folder / "prob.nii.gz"))
    add("no_tibia", good_ct, _write(_relabel(mask, 1, 0), folder / "no_tibia.nii.gz"))
    add("no_femur", good_ct, _write(_relabel(mask, 2, 0), folder / "no_femur.nii.gz"))
    add("size_mismatch", good_ct, _write(mask[:, :, :-2], folder / "m_size.nii.gz"))
    shifted = sitk.Image(mask)
    shifted.SetSpacing((1.0, 1.0, 1.5))
    add("spacing_mismatch", good_ct, _write(shifted, folder / "m_spacing.nii.gz"))
    shifted = sitk.Image(mask)
    shifted.SetOrigin(tuple(o + 3 for o in mask.GetOrigin()))
    add("origin_mismatch", good_ct, _write(shifted, folder / "m_origin.nii.gz"))
    shifted = sitk.Image(mask)
    shifted.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    add("direction_mismatch", good_ct, _write(shifted, folder / "m_direction.nii.gz"))
    add("nan_ct", _write(_with_value(ct, np.nan), folder / "nan.nii.gz"), good_mask)
    add("inf_ct", _write(_with_value(ct, np.inf), folder / "inf.mha"), good_mask)
    big = sitk.Image([400, 400, 400], sitk.sitkInt16)
    add("too_big", _write(big, folder / "big_ct.nii.gz"),
        _write(sitk.Image([400, 400, 400], sitk.sitkUInt8), folder / "big_mask.nii.gz"))
    (folder / "cohort.csv").write_text("\n".join(rows) + "\n")
    return folder / "cohort.csv"


def _add_label(mask: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(mask)
    array[:3, :3, :3] = 7
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(mask)
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> tuple[Path, Path, int]:
    folder = tmp_path_factory.mktemp("bad")
    manifest = _build(folder)
    out = folder / "out"
    code = main(["run", str(manifest), "--out", str(out), "--model", str(model_path),
                 "--workers", "2", "--threads-per-worker", "1", "--memory-per-worker", MEMORY])
    return manifest, out, code


def test_good_subjects_finish_and_the_run_exits_1(matrix: tuple[Path, Path, int]) -> None:
    _, out, code = matrix
    assert code == 1
    sims = pd.read_parquet(out / "similarities")
    assert sorted(sims["subject_id"].unique()) == ["good_1", "good_2", "unknown_label"]
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures["subject_id"]) == sorted(BAD)
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".*.tmp-*"))


@pytest.mark.parametrize("subject", sorted(BAD))
def test_bad_subject_is_listed_with_file_and_fix(matrix: tuple[Path, Path, int],
                                                 subject: str) -> None:
    _manifest, out, _ = matrix
    stage, text, role = BAD[subject]
    failures = pd.read_csv(out / "failures.csv").set_index("subject_id")
    row = failures.loc[subject]
    assert row["stage"] == stage
    assert text in row["error"] and f"Subject {subject}" in row["error"]
    if role:
        assert str(row[role]) in row["error"], "the message names the file"
    assert any(fix in row["error"] for fix in FIXES[stage]), row["error"]
    assert not (out / "subjects" / subject).exists(), "nothing written for a failed subject"


def test_unknown_labels_are_warned_about_not_failed(matrix: tuple[Path, Path, int]) -> None:
    _, out, _ = matrix
    assert (out / "subjects" / "unknown_label" / "done.json").is_file()


@pytest.mark.parametrize(
    ("body", "message"),
    [("subject_id,ct\nk1,a\n", "lacks column(s) mask"),
     ("subject_id,ct,mask\n", "lists no subjects")],
    ids=["missing-column", "no-rows"],
)
def test_unusable_manifest_exits_2_before_any_compute(tmp_path: Path, model_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      body: str, message: str) -> None:
    (tmp_path / "m.csv").write_text(body)
    assert main(["run", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--model",
                 str(model_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_manifest_rows_fail_alone(tmp_path: Path, model_path: Path) -> None:
    ct, mask = _pair()
    _write(ct, tmp_path / "ct.nii.gz")
    _write(mask, tmp_path / "mask.nii.gz")
    text = ("subject_id,ct,mask,side\n"
            "ok1,ct.nii.gz,mask.nii.gz,R\n"
            "../x,ct.nii.gz,mask.nii.gz,R\n"
            "\n"
            "ok1,ct.nii.gz,mask.nii.gz,L\n"
            "ok2,ct.nii.gz,mask.nii.gz,sideways\n")
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "m.csv"), "--out", str(out), "--model", str(model_path),
                 "--workers", "1"]) == 1
    failures = pd.read_csv(out / "failures.csv")
    assert failures["stage"].tolist() == ["manifest"] * 3
    messages = " ".join(failures["error"])
    assert "row 3: subject id '../x' is not allowed" in messages
    assert "row 5: subject id 'ok1' repeats row 2" in messages
    assert "row 6: side 'sideways' is not allowed" in messages
    assert (out / "subjects" / "ok1" / "done.json").is_file()
    assert not (tmp_path / "x").exists() and not (out / "x").exists()


def test_a_subject_over_its_time_limit_fails_with_stage_and_reason(cohort: Path, model_path: Path,
                                                                   tmp_path: Path) -> None:
    from ..helpers import BOOKKEEPING_RUN, run

    out = tmp_path / "out"
    assert run(cohort, out, model_path, "--subject-timeout", "0.001", *BOOKKEEPING_RUN) == 1
    failures = pd.read_csv(out / "failures.csv").set_index("subject_id")
    assert sorted(failures.index) == ["knee001", "knee002", "knee003"]
    assert (failures["stage"] == "timeout").all()
    assert failures["error"].str.contains("over the --subject-timeout of 0.001 s").all()
    assert not list((out / "subjects").glob("*/done.json"))
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error
        run(cohort, tmp_path / "bad", model_path, "--subject-timeout", "0")
