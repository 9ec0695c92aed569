"""Tables you can trust (issue 20): covariates are joined, not computed; every row says who it is;
identifiers keep their text; after any stop the Parquet agrees with run.json; the three datasets
change together; a damaged subject folder is found, not trusted."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from kneebatch.cli.main import main
from kneebatch.inputs.manifest import read_manifest
from kneebatch.outdir.key import legacy_key

from ..helpers import BOOKKEEPING_RUN, done, edit_manifest, run_joined

DATASETS = ("similarities", "features", "regions")


def table(out: Path, name: str = "similarities") -> pd.DataFrame:
    return pd.read_parquet(out / name)


def test_a_covariate_edit_or_a_new_column_recomputes_no_knee(
        finished: Path, cohort: Path, model_path: Path, shared_scheduler: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    runs = {s: done(finished, s)["run_id"] for s in ("knee001", "knee002", "knee003")}
    edit_manifest(cohort, "knee001", age="99")
    df = pd.read_csv(cohort, dtype=str, keep_default_na=False)
    df["bmi"] = ["31.5", "", "24"]
    df.to_csv(cohort, index=False)
    capsys.readouterr()
    assert run_joined(shared_scheduler, cohort, finished, model_path) == 0
    printed = capsys.readouterr().out
    assert "0 finished, 0 failed, 3 skipped" in printed
    assert "0 knee(s) computed; covariates updated for 3" in printed
    assert {s: done(finished, s)["run_id"] for s in runs} == runs  # nothing recomputed
    for name in ("similarities", "regions"):
        rows = table(finished, name).drop_duplicates("subject_id").set_index("subject_id")
        assert rows.loc["knee001", "age"] == 99 and rows["bmi"].isna().tolist() == [False, True, False]
        assert rows.loc["knee001", "bmi"] == 31.5
    capsys.readouterr()
    assert run_joined(shared_scheduler, cohort, finished, model_path) == 0
    assert "covariates updated" not in capsys.readouterr().out  # once, not at every rerun


def test_results_keyed_by_an_earlier_version_are_kept_once_rekeyed(
        finished: Path, cohort: Path, model_path: Path, shared_scheduler: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Earlier versions hashed the covariates into the key: such folders still count finished."""
    settings = json.loads((finished / ".kneebatch" / "settings.json").read_text())
    record_path = finished / ".kneebatch" / "manifest.json"
    record = json.loads(record_path.read_text())
    for spec in read_manifest(cohort):
        path = finished / "subjects" / spec.subject_id / "done.json"
        old = json.loads(path.read_text())
        old["key"] = legacy_key(spec, settings["config_hash"], settings["model_sha256"],
                                old["extra"])
        path.write_text(json.dumps(old))
        record["subjects"][spec.subject_id] = old["key"]
        record.pop("extras", None)
    record_path.write_text(json.dumps(record))
    edit_manifest(cohort, "knee002", site="Q")
    capsys.readouterr()
    assert run_joined(shared_scheduler, cohort, finished, model_path) == 0
    printed = capsys.readouterr().out
    assert "0 finished, 0 failed, 3 skipped" in printed and "covariates updated for 1" in printed
    keys = json.loads(record_path.read_text())["subjects"]
    assert all(done(finished, s)["key"] == keys[s] for s in keys)  # migrated to the new key
    assert table(finished).set_index("subject_id").loc["knee002", "site"].unique().tolist() == ["Q"]


def test_every_row_says_which_knee_scan_and_side_it_is(
        finished: Path, tmp_path: Path, model_path: Path, shared_scheduler: str) -> None:
    for name in DATASETS:
        rows = table(finished, name).drop_duplicates("subject_id").set_index("subject_id")
        assert rows["side"].to_dict() == {"knee001": "R", "knee002": "L", "knee003": "R"}
        assert (rows["scan_id"] == rows.index).all()
    from kneebatch import feature_matrix

    wide = feature_matrix(finished, layer="denseblock4", region="tibia")
    assert list(wide.columns[:2]) == ["scan_id", "side"] and wide.shape == (3, 2 + 1024)
    rich = feature_matrix(finished, layer="denseblock4", with_extras=True)
    assert list(rich.columns[:4]) == ["scan_id", "side", "age", "site"]
    assert rich["age"].dtype == np.int64
    target = tmp_path / "wide.csv"
    assert main(["export", str(finished), "--wide", str(target), "--layer", "denseblock4",
                 "--with-extras"]) == 0
    exported = pd.read_csv(target)
    assert list(exported.columns[:5]) == ["subject_id", "scan_id", "side", "age", "site"]
    np.testing.assert_allclose(exported.iloc[:, 5:].to_numpy(),
                               rich.iloc[:, 4:].to_numpy(), rtol=1e-6)


def test_a_bilateral_scan_gives_its_id_as_scan_id(tmp_path: Path, model_path: Path,
                                                  shared_scheduler: str) -> None:
    import SimpleITK as sitk

    from kneebatch.inputs.phantom import make_bilateral_phantom

    ct, mask = make_bilateral_phantom((40, 64, 48), (1.2, 1.0, 1.0), seed=3)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,ct,mask,side,mrn\nbil01,ct.nii.gz,mask.nii.gz,both,00123\n")
    out = tmp_path / "out"
    assert run_joined(shared_scheduler, manifest, out, model_path) == 0
    for name in DATASETS:
        rows = table(out, name).drop_duplicates("subject_id").set_index("subject_id")
        assert rows["scan_id"].to_dict() == {"bil01_L": "bil01", "bil01_R": "bil01"}
        assert rows["side"].to_dict() == {"bil01_L": "L", "bil01_R": "R"}
        if name != "features":  # the covariates ride with similarities and regions
            assert rows["mrn"].tolist() == ["00123", "00123"]


def test_identifiers_keep_their_text_and_types_can_be_declared(
        finished: Path, cohort: Path, model_path: Path, shared_scheduler: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(cohort, dtype=str, keep_default_na=False)
    df["mrn"] = ["00123", "456", "789"]
    df["accession"] = ["12345678901234567890", "1", "2"]
    df["visit"] = ["1", "2", "3"]
    df.to_csv(cohort, index=False)
    assert run_joined(shared_scheduler, cohort, finished, model_path,
                      "--column-types", "visit=string") == 0
    sims = table(finished).drop_duplicates("subject_id").set_index("subject_id")
    assert sims["mrn"].tolist() == ["00123", "456", "789"]
    assert sims["accession"].tolist() == ["12345678901234567890", "1", "2"]
    assert sims["visit"].tolist() == ["1", "2", "3"] and sims["age"].dtype == np.int64
    meta = json.loads(pq.read_schema(finished / "similarities" / "part-0.parquet")
                      .metadata[b"kneebatch"])
    assert meta["extra_types"]["mrn"] == meta["extra_types"]["accession"] == "string"
    capsys.readouterr()
    assert run_joined(shared_scheduler, cohort, finished, model_path,
                      "--column-types", "site=int64") == 2
    err = capsys.readouterr().err
    assert "Subject knee001" in err and "'site'" in err and "site=string" in err
    assert run_joined(shared_scheduler, cohort, finished, model_path,
                      "--column-types", "weight=float64") == 2
    assert "not a column of the manifest" in capsys.readouterr().err


def _command(manifest: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kneebatch", "run", str(manifest), "--out", str(out),
            "--model", str(model), *BOOKKEEPING_RUN, *extra]


def test_a_stopped_overwrite_leaves_only_rows_of_the_settings_run_json_names(
        finished: Path, cohort: Path, model_path: Path) -> None:
    """Ctrl-C (SLURM's walltime signal alike) after the first subject of an --overwrite run with
    other settings and a subject withdrawn: the Parquet holds no row of the old settings, nor of
    the withdrawn subject."""
    lines = cohort.read_text().splitlines()
    consenting = cohort.with_name(f"consenting-{finished.parent.name}.csv")
    consenting.write_text("\n".join(line for line in lines if not line.startswith("knee003")) + "\n")
    proc = subprocess.Popen(_command(consenting, finished, model_path, "--overwrite",
                                     "--margin-mm", "20"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = done(finished, "knee001")["run_id"]
    deadline = time.monotonic() + 120
    while done(finished, "knee001")["run_id"] == first if (
            finished / "subjects" / "knee001" / "done.json").is_file() else True:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    printed = proc.communicate(timeout=120)[0]
    assert proc.returncode in (0, 75), printed
    record = json.loads((finished / "run.json").read_text())
    assert record["config"]["margin_mm"] == 20
    for name in DATASETS:
        rows = table(finished, name)
        assert set(rows["config_hash"]) == {record["config_hash"]}, name
        assert "knee003" not in set(rows["subject_id"]) and "knee001" in set(rows["subject_id"])
    # a merge with a genuine folder of the old settings is refused
    other = finished.parent / "other"
    subprocess.run(_command(cohort, other, model_path), check=True, capture_output=True)
    assert main(["merge", str(finished), str(other), "--out", str(finished.parent / "m")]) == 2
    assert not (finished.parent / "m").exists()


_KILL_AT = textwrap.dedent("""
    import os, signal, sys
    from kneebatch.outdir import publish
    calls = 0
    real = os.replace
    def replace(src, dst):
        global calls
        calls += 1
        if calls == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    publish.os.replace = replace
    from kneebatch.cli.main import main
    main(["gather", sys.argv[1]])
""")


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_a_gather_killed_anywhere_leaves_three_datasets_of_one_gather(
        finished: Path, kill_at: int) -> None:
    (finished / "subjects" / "knee003" / "done.json").unlink()  # the next gather differs
    result = subprocess.run([sys.executable, "-c", _KILL_AT, str(finished), str(kill_at)],
                            capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    subjects = [set(table(finished, name)["subject_id"]) for name in DATASETS]
    assert subjects[0] == subjects[1] == subjects[2], subjects
    assert main(["gather", str(finished)]) == 1  # knee003 pending
    assert [set(table(finished, name)["subject_id"]) for name in DATASETS] == [
        {"knee001", "knee002"}] * 3
    tables = finished / ".kneebatch" / "tables"
    assert len([p for p in tables.iterdir() if p.name != "current"]) <= 2  # debris removed


def _rewrite_npz(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Replace a subject's features.npz and make done.json vouch for it (checksums match)."""
    import hashlib

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    data = buffer.getvalue()
    (folder / "features.npz").write_bytes(data)
    record = json.loads((folder / "done.json").read_text())
    record["files"]["features.npz"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "done.json").write_text(json.dumps(record))


def _vectors(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "features.npz") as data:
        return {k: data[k] for k in data.files}


def test_a_damaged_subject_folder_is_found_reported_and_recomputed(
        finished: Path, cohort: Path, model_path: Path, shared_scheduler: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    subjects = finished / "subjects"
    cases = {
        "knee001": lambda v: {**v, "tibia.denseblock4": np.float32(1.0)},  # 0-d
        "knee002": lambda v: {**v, "femur.denseblock2": np.full(512, np.nan, np.float32)},
        "knee003": lambda v: {**{k.replace(".", "_") if k.startswith("tibia.denseblock2") else k: a
                                 for k, a in v.items()}},  # a key without a dot
    }
    for subject, change in cases.items():
        _rewrite_npz(subjects / subject, change(_vectors(subjects / subject)))
    capsys.readouterr()
    assert main(["gather", str(finished)]) == 0
    failures = pd.read_csv(finished / "failures.csv").set_index("subject_id")
    assert sorted(failures.index) == ["knee001", "knee002", "knee003"]
    assert "shape ()" in failures.loc["knee001", "error"]
    assert "NaN" in failures.loc["knee002", "error"]
    assert "tibia_denseblock2" in failures.loc["knee003", "error"]
    assert main(["status", str(finished)]) == 0
    printed = capsys.readouterr().out
    assert "finished      0" in printed and "failed        3" in printed and "NaN" in printed
    # a wrong shape of done.json itself and an 'extra' list
    record = json.loads((subjects / "knee001" / "done.json").read_text())
    (subjects / "knee001" / "done.json").write_text(json.dumps({**record, "regions": []}))
    record = json.loads((subjects / "knee002" / "done.json").read_text())
    (subjects / "knee002" / "done.json").write_text(json.dumps({**record, "extra": ["x"]}))
    assert main(["gather", str(finished)]) == 0
    assert run_joined(shared_scheduler, cohort, finished, model_path) == 0
    assert "3 finished, 0 failed, 0 skipped" in capsys.readouterr().out
    assert len(pd.read_csv(finished / "failures.csv")) == 0
    assert sorted(set(table(finished)["subject_id"])) == ["knee001", "knee002", "knee003"]


def test_export_writes_what_its_extension_says_and_never_into_out(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = table(finished, "features")
    capsys.readouterr()
    assert main(["export", str(finished), "--wide",
                 str(finished / "features" / "part-0.parquet")]) == 2
    assert "inside the kneebatch output folder" in capsys.readouterr().err
    assert main(["export", str(finished), "--wide", str(finished / "wide.parquet")]) == 2
    pd.testing.assert_frame_equal(table(finished, "features"), before)
    assert main(["export", str(finished), "--wide", str(tmp_path / "x.xlsx")]) == 2
    assert ".parquet or .csv" in capsys.readouterr().err and not (tmp_path / "x.xlsx").exists()
    assert main(["export", str(finished), "--wide", str(tmp_path / "x.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "x.parquet").shape == (3, 2 + 3 * (512 + 1024 + 1024))


def test_report_never_writes_through_a_link(finished: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "index.html").write_text("theirs")
    (finished / "report").symlink_to(elsewhere, target_is_directory=True)
    assert main(["report", str(finished), "--no-qc"]) == 2
    assert str(finished / "report") in capsys.readouterr().err
    assert sorted(os.listdir(elsewhere)) == ["index.html"]
    assert (elsewhere / "index.html").read_text() == "theirs"
    (finished / "report").unlink()
    (finished / "report").symlink_to(finished / ".kneebatch", target_is_directory=True)
    assert main(["report", str(finished), "--no-qc"]) == 2
    assert not (finished / ".kneebatch" / "index.html").exists()


def _split(manifest: Path, ids: set[str]) -> tuple[Path, Path]:
    """Two manifests beside ``manifest``: the rows of ``ids``, and the others."""
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    parts = []
    for name, rows in (("in", df[df["subject_id"].isin(ids)]), ("out", df[~df["subject_id"].isin(ids)])):
        path = manifest.with_name(f"{manifest.stem}-{name}.csv")
        rows.to_csv(path, index=False)
        parts.append(path)
    return parts[0], parts[1]


def test_merge_refuses_clashes_before_writing_anything_and_replaces_an_earlier_merge(
        cohort: Path, model_path: Path, shared_scheduler: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, b, typed = tmp_path / "a", tmp_path / "b", tmp_path / "typed"
    first, second = _split(cohort, {"knee001", "knee003"})
    assert run_joined(shared_scheduler, first, a, model_path) == 0
    assert run_joined(shared_scheduler, second, b, model_path) == 0
    assert run_joined(shared_scheduler, second, typed, model_path,
                      "--column-types", "age=string") == 0
    target = tmp_path / "all"
    capsys.readouterr()
    assert main(["merge", str(a), str(typed), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "column 'age' is int64" in err and "--column-types" in err
    assert not target.exists()
    # knee002 finished in b, failed in a folder whose manifest points it at a missing file
    broken = second.with_name(f"broken-{tmp_path.name}.csv")
    broken.write_text(second.read_text().replace("knee002_ct.nii.gz", "gone.nii.gz"))
    failed = tmp_path / "failed"
    assert run_joined(shared_scheduler, broken, failed, model_path) == 1
    capsys.readouterr()
    assert main(["merge", str(b), str(failed), "--out", str(target)]) == 2
    assert "knee002 finished in" in capsys.readouterr().err and not target.exists()
    assert main(["merge", str(a), str(b), "--out", str(target)]) == 0
    assert main(["merge", str(b), "--out", str(target)]) == 0  # an earlier merge: replaced
    assert set(table(target)["subject_id"]) == {"knee002"}
    assert not (target / "subjects").exists()


def test_status_counts_bad_rows_reads_extract_folders_and_sees_dead_runs(
        cohort: Path, model_path: Path, shared_scheduler: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    with cohort.open("a") as fh:
        fh.write("bad id,a.nii.gz,b.nii.gz,R,A,1\n")
        fh.write("knee009,,b.nii.gz,R,A,1\n")
    out = tmp_path / "out"
    assert run_joined(shared_scheduler, cohort, out, model_path) == 1
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 subject(s)" in printed and "failed        2" in printed and "manifest 2" in printed
    assert main(["status", str(out), str(cohort)]) == 0
    assert "failed        2" in capsys.readouterr().out
    # a folder `extract` wrote
    spec = read_manifest(cohort.with_name("manifest.csv"))[0]
    solo = tmp_path / "solo"
    assert main(["extract", "--ct", str(spec.ct), "--mask", str(spec.mask), "--subject-id", "s1",
                 "--out", str(solo), "--model", str(model_path), "--spacing", "2"]) == 0
    capsys.readouterr()
    assert main(["status", str(solo)]) == 0
    assert "finished      1" in capsys.readouterr().out
    # status imports neither torch nor dask
    probe = ("import sys, runpy; sys.argv = ['kneebatch', 'status', sys.argv[1]]\n"
             "try:\n    runpy.run_module('kneebatch', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'dask', 'distributed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip().endswith("[]"), result.stdout
    # a run killed with SIGKILL is shown stopped, not running
    proc = subprocess.Popen(_command(cohort, out, model_path, "--overwrite"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = out / ".kneebatch" / "runs"
    before = set(runs.iterdir())
    deadline = time.monotonic() + 120
    while not set(runs.iterdir()) - before:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "stopped: its process is gone" in capsys.readouterr().out
