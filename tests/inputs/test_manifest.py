"""Manifest parsing: every problem of every row, found before any compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from kneebatch.errors import ManifestError
from kneebatch.inputs.manifest import read_manifest


def _write(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "cohort" / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_paths_resolve_against_the_manifest_folder_and_extras_are_kept(tmp_path: Path) -> None:
    path = _write(tmp_path, "subject_id,ct,mask,side,site,age\n"
                            "k1,img/k1.nii.gz,/abs/k1_mask.nii.gz,l,A,40\n"
                            'k2,"a, b/ct.nrrd",m.nrrd,,B,\n')
    specs = read_manifest(path)
    assert specs[0].ct == (path.parent / "img" / "k1.nii.gz").resolve()
    assert specs[0].mask == Path("/abs/k1_mask.nii.gz")
    assert specs[0].side == "L" and specs[1].side is None
    assert specs[1].ct == (path.parent / "a, b" / "ct.nrrd").resolve()
    assert specs[0].extra == {"site": "A", "age": "40"} and specs[1].extra == {"site": "B", "age": ""}


def test_bom_and_empty_rows_are_fine(tmp_path: Path) -> None:
    path = _write(tmp_path, "subject_id,ct,mask\n\nk1,a,b\n,,\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [s.subject_id for s in read_manifest(path)] == ["k1"]


def test_missing_column_names_the_header(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"lacks column\(s\) mask"):
        read_manifest(_write(tmp_path, "subject_id,ct\nk1,a\n"))


def test_every_problem_of_every_row_is_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "subject_id,ct,mask,side\n"
                            "k1,a,b,R\n"
                            "../x,a,b,R\n"
                            "a/b,a,b,R\n"
                            "k1,a,b,R\n"
                            "k4,,b,left\n"
                            "k5,a,b,R,extra\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = info.value.message
    assert "6 problem(s)" in message
    assert "row 3: subject id '../x' is not allowed" in message
    assert "row 4: subject id 'a/b' is not allowed" in message
    assert "row 5: subject id 'k1' repeats row 2" in message
    assert "row 6: side 'left' is not allowed" in message
    assert "row 6: column 'ct' is empty" in message
    assert "row 7: more fields than header columns" in message


def test_an_empty_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="lists no subjects"):
        read_manifest(_write(tmp_path, "subject_id,ct,mask\n"))


def test_the_committed_sample_manifest_lists_what_sample_writes(tmp_path: Path) -> None:
    from kneebatch.inputs.phantom import write_sample

    repo = Path(__file__).resolve().parents[2]
    committed = read_manifest(repo / "manifests" / "sample.csv")
    written = read_manifest(write_sample(tmp_path / "sample", 4, size="small"))
    assert [(s.subject_id, s.ct.name, s.mask.name, s.side, s.extra) for s in committed] == [
        (s.subject_id, s.ct.name, s.mask.name, s.side, s.extra) for s in written]
    assert all(s.ct.parent == repo / "data" / "sample" for s in committed)


@pytest.mark.parametrize("column", ["hu_mean", "volume_ml", "voxels", "hu_p5", "hu_p95", "region",
                                    "dim", "warnings"])
def test_every_output_column_is_refused_with_the_rename_advice(tmp_path: Path, column: str) -> None:
    # the region statistics' columns were once missing from the reserved names, so a manifest
    # column hu_mean overwrote the real values and made regions/ unreadable
    with pytest.raises(ManifestError, match=rf"{column} -> my_{column}"):
        read_manifest(_write(tmp_path, f"subject_id,ct,mask,{column}\nk1,a,b,5\n"))


def test_reserved_names_are_the_output_schema_columns() -> None:
    from kneebatch.schema import DATASETS, RESERVED, result_columns

    written = {c for name in DATASETS for c in result_columns(name)} - {"subject_id", "side"}
    assert written <= set(RESERVED) and not {"subject_id", "side"} & set(RESERVED)
    assert "scan_id" in RESERVED
