"""Integrity of OUT across reruns (issue 10): a rerun never keeps a stale result, never hides a
failure, never deletes what is not kneebatch's. Each test is a case a user met on kneebatch 0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from kneebatch.cli.main import main
from kneebatch.inputs.phantom import write_sample

from .. import helpers
from ..helpers import done, edit_manifest, features

FAST = helpers.BOOKKEEPING_RUN


@pytest.fixture(autouse=True)
def _join_the_shared_cluster(shared_scheduler: str) -> Iterator[None]:
    """In-process runs of this module join the session's cluster (bookkeeping is what is tested
    here, not the cluster); subprocess runs (``command``) start their own."""
    global _SCHEDULER
    _SCHEDULER = shared_scheduler
    yield
    _SCHEDULER = None


_SCHEDULER: str | None = None


def run(manifest: Path, out: Path, model: Path, *extra: str) -> int:
    joined = ("--scheduler-address", _SCHEDULER) if _SCHEDULER else ()
    return helpers.run(manifest, out, model, *FAST, *joined, *extra)


def command(manifest: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kneebatch", "run", str(manifest), "--out", str(out),
            "--model", str(model), *FAST, *extra]


def sims(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "similarities")


@pytest.fixture
def own_cohort(tmp_path: Path) -> Path:
    """Knees of this test alone (it changes their files)."""
    return write_sample(tmp_path / "cohort", 3, size="small")


def test_a_corrected_manifest_redoes_the_changed_subjects(
        cohort: Path, finished: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = cohort.parent
    shutil.copy(folder / "knee001_ct.nii.gz", folder / "other_ct.nii.gz")
    shutil.copy(folder / "knee001_mask.nii.gz", folder / "other_mask.nii.gz")
    knee001_before = {k[1:]: v for k, v in features(finished).items() if k[0] == "knee001"}
    assert done(finished, "knee001")["side"] == "R"
    capsys.readouterr()
    assert run(cohort, finished, model_path) == 0  # nothing changed yet: nothing redone
    assert "0 finished, 0 failed, 3 skipped" in capsys.readouterr().out
    edit_manifest(cohort, "knee001", side="L")
    # knee002 now points at copies of knee001's files, as a right knee like knee001 was
    edit_manifest(cohort, "knee002", ct="other_ct.nii.gz", mask="other_mask.nii.gz", side="R")
    edit_manifest(cohort, "knee003", site="Z")
    capsys.readouterr()
    assert run(cohort, finished, model_path) == 0
    printed = capsys.readouterr().out
    assert "2 finished, 0 failed, 1 skipped" in printed  # a covariate edit recomputes nothing
    assert "2 subject(s) were redone because their inputs" in printed
    assert "covariates updated for 1" in printed
    assert done(finished, "knee001")["side"] == "L"
    assert str(done(finished, "knee002")["ct"]).endswith("other_ct.nii.gz")
    table = sims(finished)
    assert table.loc[table["subject_id"] == "knee003", "site"].unique().tolist() == ["Z"]
    after = features(finished)
    # the same knee read from the copies gives the numbers knee001 had before its edit
    assert knee001_before
    for key, vector in knee001_before.items():
        np.testing.assert_allclose(after[("knee002", *key)], vector, rtol=1e-4, atol=2e-5)
    assert run(cohort, finished, model_path) == 0
    assert "0 finished, 0 failed, 3 skipped" in capsys.readouterr().out


def test_overwrite_never_hides_a_new_failure(own_cohort: Path, model_path: Path,
                                             tmp_path: Path) -> None:
    cohort, finished = own_cohort, tmp_path / "own-out"
    assert run(cohort, finished, model_path) == 0
    mask_path = cohort.parent / "knee002_mask.nii.gz"
    mask = sitk.ReadImage(str(mask_path))
    sitk.WriteImage(mask * 0, str(mask_path))  # the user's segmentation came back empty
    assert run(cohort, finished, model_path, "--overwrite") == 1
    failures = pd.read_csv(finished / "failures.csv")
    assert failures["subject_id"].tolist() == ["knee002"]
    assert failures["stage"].tolist() == ["regions"]
    assert "knee002" not in set(sims(finished)["subject_id"])
    assert sorted(set(pd.read_parquet(finished / "features")["subject_id"])) == ["knee001", "knee003"]
    assert not (finished / "subjects" / "knee002" / "done.json").exists()


def test_foreign_files_in_out_are_refused_and_kept(cohort: Path, model_path: Path,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    proj = tmp_path / "proj"
    (proj / "features").mkdir(parents=True)
    (proj / "features" / "radiomics.csv").write_text("x\n")
    (proj / "run.json").write_text("{}")
    assert run(cohort, proj, model_path) == 2
    err = capsys.readouterr().err
    assert str(proj / "features") in err and "did not make" in err
    assert (proj / "features" / "radiomics.csv").read_text() == "x\n"
    assert (proj / "run.json").read_text() == "{}"
    assert not (proj / "subjects").exists()


def test_a_file_put_into_a_kneebatch_out_is_never_deleted(
        finished: Path, cohort: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (finished / "features" / "radiomics.csv").write_text("x\n")
    (finished / "notes.txt").write_text("mine")
    assert run(cohort, finished, model_path) == 2
    assert main(["gather", str(finished)]) == 2
    err = capsys.readouterr().err
    assert str(finished / "features" / "radiomics.csv") in err and str(finished / "notes.txt") in err
    assert (finished / "features" / "radiomics.csv").read_text() == "x\n"
    assert (finished / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("column", ["layer", "cosine", "region_a", "run_id", "weights",
                                    "config_hash"])
def test_a_manifest_column_named_like_an_output_is_refused_before_compute(
        column: str, cohort: Path, model_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(cohort, dtype=str)
    df[column] = "x"
    df.to_csv(cohort, index=False)
    out = tmp_path / "clash-out"
    assert run(cohort, out, model_path) == 2
    err = capsys.readouterr().err
    assert column in err and "reserved names" in err
    assert not out.exists() or not list(out.glob("subjects/*"))


def test_a_renamed_column_runs_without_overwrite(cohort: Path, model_path: Path,
                                                 tmp_path: Path) -> None:
    df = pd.read_csv(cohort, dtype=str)
    df["layer"] = "x"
    df.to_csv(cohort, index=False)
    out = tmp_path / "clash-out"
    assert run(cohort, out, model_path) == 2
    df.rename(columns={"layer": "my_layer"}).to_csv(cohort, index=False)
    assert run(cohort, out, model_path) == 0
    assert set(sims(out)["my_layer"]) == {"x"}


def test_a_damaged_subject_folder_fails_alone_and_is_recomputed(
        finished: Path, cohort: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subjects = finished / "subjects"
    npz = subjects / "knee001" / "features.npz"
    npz.write_bytes(npz.read_bytes()[:100])  # truncated
    csv_file = subjects / "knee002" / "similarities.csv"
    text = csv_file.read_text()
    csv_file.write_text(text.replace("cosine", "cosinX"))  # malformed, same size
    capsys.readouterr()
    assert main(["gather", str(finished)]) == 0
    failures = pd.read_csv(finished / "failures.csv")
    assert sorted(failures["subject_id"]) == ["knee001", "knee002"]
    assert set(failures["stage"]) == {"gather"}
    assert str(npz) in failures["error"][0] and str(csv_file) in failures["error"][1]
    assert all("kneebatch run" in e for e in failures["error"])
    assert set(sims(finished)["subject_id"]) == {"knee003"}
    assert run(cohort, finished, model_path) == 0
    assert "2 finished, 0 failed, 1 skipped" in capsys.readouterr().out
    assert sorted(set(sims(finished)["subject_id"])) == ["knee001", "knee002", "knee003"]
    assert len(pd.read_csv(finished / "failures.csv")) == 0
    (subjects / "knee003" / "features.npz").unlink()  # missing
    assert main(["gather", str(finished)]) == 0
    assert pd.read_csv(finished / "failures.csv")["subject_id"].tolist() == ["knee003"]
    assert sorted(set(sims(finished)["subject_id"])) == ["knee001", "knee002"]
    assert run(cohort, finished, model_path) == 0
    assert "1 finished, 0 failed, 2 skipped" in capsys.readouterr().out


def test_a_run_with_other_settings_is_refused_without_overwrite(
        finished: Path, cohort: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sims(finished)
    assert run(cohort, finished, model_path, "--layers", "denseblock4") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--overwrite" in err and "new --out" in err
    assert "layers" in err
    pd.testing.assert_frame_equal(sims(finished), before)
    assert run(cohort, finished, model_path, "--layers", "denseblock4", "--overwrite") == 0
    assert set(sims(finished)["layer"]) == {"denseblock4"}


def test_two_runs_at_once_compute_each_subject_once(cohort: Path, shared_finished: Path,
                                                    model_path: Path, tmp_path: Path) -> None:
    reference = shared_finished  # one run alone
    out = tmp_path / "shared"
    procs = [subprocess.Popen(command(cohort, out, model_path), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    computed = [int(o.split(" finished,")[0].rsplit(" ", 1)[1]) for o in outputs]
    assert sum(computed) == 3, outputs
    a = sims(out).drop(columns="run_id").sort_values(["subject_id", "layer", "region_a",
                                                       "region_b"]).reset_index(drop=True)
    b = sims(reference).drop(columns="run_id").sort_values(["subject_id", "layer", "region_a",
                                                             "region_b"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="cosine"), b.drop(columns="cosine"))
    np.testing.assert_allclose(a["cosine"], b["cosine"], atol=1e-5)


def test_a_run_waits_for_a_subject_another_process_holds(
        finished: Path, cohort: Path, model_path: Path) -> None:
    from kneebatch.outdir.claims import claim

    folder = finished / "subjects" / "knee002"
    first = done(finished, "knee002")["run_id"]
    with claim(finished, "knee002", "someone-else") as held:
        assert held
        tmp = folder / ".features.npz.99999.deadbeef.tmp"
        tmp.write_bytes(b"being written by the other run")
        proc = subprocess.Popen(command(cohort, finished, model_path, "--overwrite"),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 120
        while not all((finished / "subjects" / s / "done.json").is_file()
                      and done(finished, s)["run_id"] != first for s in ("knee001", "knee003")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.5)
        assert proc.poll() is None, "the run ended without the claimed subject"
        assert tmp.read_bytes() == b"being written by the other run"
    printed = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, printed
    assert "3 finished" in printed
    assert not tmp.exists()


def test_subjects_dropped_from_the_manifest_leave_the_parquet(
        finished: Path, cohort: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = cohort.read_text().splitlines()
    consenting = cohort.with_name("consenting.csv")
    consenting.write_text("\n".join(line for line in lines if not line.startswith("knee002"))
                          + "\n")
    capsys.readouterr()
    assert run(consenting, finished, model_path) == 0
    assert "1 folder(s)" in capsys.readouterr().out
    assert sorted(set(sims(finished)["subject_id"])) == ["knee001", "knee003"]
    assert json.loads((finished / "run.json").read_text())["parquet"]["left_out_folders"] == 1
    assert main(["gather", str(finished)]) == 0
    assert sorted(set(sims(finished)["subject_id"])) == ["knee001", "knee003"]


def test_every_failure_reaches_failures_csv(cohort: Path, model_path: Path, tmp_path: Path) -> None:
    long_id = "k" * 200
    with cohort.open("a") as fh:
        fh.write(f"{long_id},gone.nii.gz,knee001_mask.nii.gz,R,A,1\n")
        fh.write(f"{'t' * 230},knee001_ct.nii.gz,knee001_mask.nii.gz,R,A,1\n")
        fh.write("manifest-row-6,gone.nii.gz,knee001_mask.nii.gz,R,A,1\n")
        fh.write("bad id,knee001_ct.nii.gz,knee001_mask.nii.gz,R,A,1\n")
    out = tmp_path / "out"
    assert run(cohort, out, model_path) == 1
    failures = pd.read_csv(out / "failures.csv", keep_default_na=False)
    assert len(failures) == 4
    assert set(failures["subject_id"]) == {long_id, "t" * 230, "manifest-row-6", "bad id"}
    stages = dict(zip(failures["subject_id"], failures["stage"], strict=True))
    assert stages[long_id] == "read" and stages["manifest-row-6"] == "read"
    assert stages["bad id"] == "manifest" and stages["t" * 230] == "manifest"


def test_symlinks_under_subjects_are_refused_on_read_and_write(
        finished: Path, cohort: Path, model_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.move(finished / "subjects" / "knee001", elsewhere)
    (finished / "subjects" / "knee001").symlink_to(elsewhere, target_is_directory=True)
    assert main(["gather", str(finished)]) == 0
    assert "knee001" not in set(sims(finished)["subject_id"])
    assert pd.read_csv(finished / "failures.csv")["subject_id"].tolist() == ["knee001"]
    assert run(cohort, finished, model_path) == 1  # not skipped as finished, not written through
    failures = pd.read_csv(finished / "failures.csv")
    assert failures["subject_id"].tolist() == ["knee001"] and "symlink" in failures["error"][0]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["done.json", "features.npz",
                                                          "similarities.csv"]
    # OUT/subjects itself must be a real folder inside OUT
    out2 = tmp_path / "out2"
    (out2 / ".kneebatch").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (out2 / "subjects").symlink_to(tmp_path / "outside", target_is_directory=True)
    capsys.readouterr()
    assert run(cohort, out2, model_path) == 2
    assert str(out2 / "subjects") in capsys.readouterr().err
    assert not any((tmp_path / "outside").iterdir())


def test_gather_debris_is_removed_and_never_hides_the_dataset(finished: Path) -> None:
    before = sims(finished)
    pending = finished / ".kneebatch" / "tables" / ".pending-20260101T000000-abcdef12"
    (pending / "similarities").mkdir(parents=True)
    (pending / "similarities" / "part-0.parquet").write_bytes(b"half a parquet file")
    old = finished / ".similarities.old-1a2b3c4d"
    old.mkdir()
    dead = 2**22 + 12345  # above the largest pid Linux gives: a writer that is gone
    tmp = finished / f".failures.csv.{dead}.abcdef12.tmp"
    tmp.write_text("half")
    pd.testing.assert_frame_equal(sims(finished), before)  # readers skip the debris
    assert main(["gather", str(finished)]) == 0
    assert not pending.exists() and not old.exists() and not tmp.exists()
    pd.testing.assert_frame_equal(sims(finished).drop(columns="run_id"),
                                  before.drop(columns="run_id"))


def test_records_of_another_version_are_read(finished: Path) -> None:
    path = finished / "subjects" / "knee001" / "done.json"
    record = json.loads(path.read_text())
    record["config"]["future_setting"] = 3
    record["from_the_future"] = {"x": 1}
    path.write_text(json.dumps(record))
    assert main(["report", str(finished), "--redo-qc"]) == 0
    assert (finished / "subjects" / "knee001" / "qc.png").is_file()


def test_long_ids_get_short_record_names(tmp_path: Path) -> None:
    from kneebatch.outdir.folder import record_name

    names = {record_name("a" * n) for n in (99, 100, 101, 200)} | {record_name("a" * 150 + "b")}
    assert len(names) == 5 and all(len(n) <= 100 for n in names)
    assert record_name("manifest-row-3") == "manifest-row-3"
    if os.name == "posix":
        (tmp_path / f"{record_name('x' * 200)}.json").write_text("{}")
