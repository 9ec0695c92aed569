"""Cohort runs on a real dask LocalCluster: outputs, failures, resume, determinism, faults."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

from kneebatch.cli.main import main
from kneebatch.cohort.run import shard
from kneebatch.inputs.manifest import read_manifest

from ..helpers import assert_same_results, features, make_cohort, run

GOOD = ["knee001", "knee002", "knee003", "knee004"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def first_run(cohort: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "results" / "sample"
    assert run(cohort, out, model_path, "--workers", "2", "--threads-per-worker", "1") == 1
    return out


def test_a_cohort_gives_parquet_per_subject_files_and_a_failure_list(first_run: Path,
                                                                     model_path: Path) -> None:
    sims = pd.read_parquet(first_run / "similarities")
    assert sorted(sims["subject_id"].unique()) == GOOD
    assert len(sims) == 4 * 9
    assert {"site", "age", "run_id", "weights", "model_sha256", "config_hash"} <= set(sims.columns)
    assert set(sims["weights"]) == {"random:seed=0"}
    assert sims.loc[sims["subject_id"] == "knee002", "site"].unique().tolist() == ["A"]
    meta = json.loads(pq.read_schema(first_run / "similarities" / "part-0.parquet")
                      .metadata[b"kneebatch"])
    assert meta["weights"] == "random:seed=0" and len(meta["model_sha256"]) == 64
    feats = pd.read_parquet(first_run / "features")
    assert len(feats) == 4 * 9
    assert sorted(set(zip(feats["layer"], feats["dim"], strict=True))) == [
        ("denseblock2", 512), ("denseblock3", 1024), ("denseblock4", 1024)]
    assert all(len(v) == d for v, d in zip(feats["vector"], feats["dim"], strict=True))
    failures = pd.read_csv(first_run / "failures.csv")
    assert failures["subject_id"].tolist() == ["broken"]
    assert failures["stage"].tolist() == ["read"]
    assert "missing_ct.nii.gz: does not exist" in failures["error"][0]
    assert not (first_run / "subjects" / "broken").exists()
    record = json.loads((first_run / "run.json").read_text())
    assert record["counts"] == {"total": 5, "ok": 4, "failed": 1, "skipped": 0, "changed": 0}
    assert record["parquet"] == {"subjects": 4, "failures": 1, "pending": 0, "left_out_folders": 0,
                                 "extra_types": {"age": "int64", "site": "string"}}
    assert record["schema_version"] == meta["schema_version"] == 3
    assert sims["age"].dtype == np.int64 and pd.api.types.is_string_dtype(sims["site"])
    assert record["weights"] == "random:seed=0" and record["stopped"] is False
    assert {"read", "preprocess", "forward.background", "write"} <= set(record["stage_seconds"])
    # the per-subject files hold the same numbers as the Parquet
    subject = pd.read_csv(first_run / "subjects" / "knee003" / "similarities.csv")
    parquet = sims[sims["subject_id"] == "knee003"].reset_index(drop=True)
    np.testing.assert_array_equal(subject["cosine"], parquet["cosine"])
    filtered = pd.read_parquet(first_run / "similarities",
                               filters=[("layer", "==", "denseblock4")])
    assert set(filtered["layer"]) == {"denseblock4"} and len(filtered) == 12


def test_regions_dataset_has_volumes_and_hu_of_each_region(first_run: Path) -> None:
    regions = pd.read_parquet(first_run / "regions")
    assert sorted(regions["subject_id"].unique()) == GOOD and len(regions) == 4 * 3
    assert set(regions["region"]) == {"tibia", "femur", "background"}
    one = regions[regions["subject_id"] == "knee001"].set_index("region")
    done = json.loads((first_run / "subjects" / "knee001" / "done.json").read_text())
    voxel_ml = np.prod(sitk.ReadImage(done["ct"]).GetSpacing()) / 1000  # the native grid's
    assert voxel_ml != pytest.approx(np.prod(done["spacing_mm"]) / 1000)  # not the 1 mm grid's
    for region in ("tibia", "femur", "background"):
        assert one.loc[region, "volume_ml"] == pytest.approx(one.loc[region, "voxels"] * voxel_ml,
                                                             abs=1e-3)
        assert (one.loc[region, "hu_p5"] <= one.loc[region, "hu_p50"]
                <= one.loc[region, "hu_p95"])
    assert one.loc["tibia", "hu_mean"] > 200 > one.loc["background", "hu_mean"]  # bone vs tissue
    assert regions["age"].dtype == np.int64


def test_feature_matrix_and_export_wide(first_run: Path, tmp_path: Path) -> None:
    from kneebatch import feature_matrix

    wide = feature_matrix(first_run).drop(columns=["scan_id", "side"])
    assert wide.index.tolist() == GOOD and wide.shape == (4, 3 * (512 + 1024 + 1024))
    assert wide.columns[0] == "tibia.denseblock2.0" and wide.columns[-1] == "background.denseblock4.1023"
    one = feature_matrix(first_run, layer="denseblock4", region="femur").drop(
        columns=["scan_id", "side"])
    assert one.shape == (4, 1024)
    vectors = features(first_run)
    for sid in GOOD:
        np.testing.assert_array_equal(one.loc[sid].to_numpy(), vectors[(sid, "femur", "denseblock4")])
        np.testing.assert_array_equal(wide.loc[sid, one.columns].to_numpy(), one.loc[sid].to_numpy())
    target = tmp_path / "wide.parquet"
    assert main(["export", str(first_run), "--wide", str(target), "--layer", "denseblock4"]) == 0
    exported = pd.read_parquet(target).drop(columns=["scan_id", "side"])
    assert exported.shape == (4, 3 * 1024)
    pd.testing.assert_frame_equal(exported, wide[exported.columns])


def test_readme_queries_run_as_written(first_run: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Querying results", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    monkeypatch.chdir(first_run.parents[1])  # where results/sample is
    exec(compile(code.group(1), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "tibia" in printed and "mean" in printed and "count" in printed


def test_rerun_skips_finished_subjects_and_retries_failed_ones(
        first_run: Path, cohort: Path, model_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    before = {s: (out / "subjects" / s / "done.json").read_text() for s in GOOD}
    assert run(cohort, out, model_path) == 1
    assert "0 finished, 1 failed, 4 skipped" in capsys.readouterr().out
    assert {s: (out / "subjects" / s / "done.json").read_text() for s in GOOD} == before
    assert_same_results(first_run, out)
    # the user fixes the broken subject: only it is computed, and the failure list empties
    shutil.copy(cohort.parent / "knee001_ct.nii.gz", cohort.parent / "missing_ct.nii.gz")
    try:
        assert run(cohort, out, model_path) == 0
    finally:
        (cohort.parent / "missing_ct.nii.gz").unlink()
    assert "1 finished, 0 failed, 4 skipped" in capsys.readouterr().out
    assert len(pd.read_csv(out / "failures.csv")) == 0
    assert pd.read_parquet(out / "similarities")["subject_id"].nunique() == 5


def test_overwrite_and_changed_settings_recompute(first_run: Path, cohort: Path,
                                                  model_path: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    assert run(cohort, out, model_path, "--overwrite") == 1
    assert "4 finished, 1 failed, 0 skipped" in capsys.readouterr().out
    assert run(cohort, out, model_path, "--layers", "denseblock4") == 2  # other settings: refused
    assert run(cohort, out, model_path, "--layers", "denseblock4", "--overwrite") == 1
    assert "4 finished, 1 failed, 0 skipped" in capsys.readouterr().out
    assert set(pd.read_parquet(out / "similarities")["layer"]) == {"denseblock4"}


def test_same_vectors_with_one_worker_and_any_order(first_run: Path, cohort: Path,
                                                    model_path: Path, tmp_path: Path) -> None:
    lines = cohort.read_text().splitlines()
    body = lines[1:]
    random.Random(3).shuffle(body)
    shuffled = cohort.with_name("shuffled.csv")
    shuffled.write_text("\n".join([lines[0], *body]) + "\n")
    out = tmp_path / "out"
    assert run(shuffled, out, model_path, "--workers", "1", "--threads-per-worker", "2") == 1
    # two threads instead of one change float summation order only (float32 rounding of values
    # up to about 10)
    assert_same_results(first_run, out, atol=1e-5, rtol=1e-5)


def test_each_worker_loads_the_model_once(cohort: Path, model_path: Path, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from kneebatch.cohort.run import run_cohort
    from kneebatch.network.cache import model_loads

    specs = [s for s in read_manifest(cohort) if s.subject_id != "broken"] * 1
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        summary = run_cohort(specs, tmp_path / "out", model_path, client=client)
        loads = client.run(model_loads)
    assert summary.ok == 4
    assert sorted(loads.values()) in ([1, 1], [0, 1])
    assert sum(loads.values()) >= 1


@pytest.mark.parametrize("subjects", [2, 1], ids=["read-ahead", "one-at-a-time"])
def test_a_worker_reads_its_next_subject_while_one_computes(
        cohort: Path, model_path: Path, tmp_path: Path, subjects: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client

    from kneebatch.cohort.cluster import local_cluster
    from kneebatch.cohort.run import run_cohort

    def stats() -> tuple[int, int, str | None, str | None]:  # runs in the worker
        import os

        from kneebatch import runtime
        from kneebatch.network import cache

        return (runtime.SUBJECTS_IN_PROGRESS.peak, cache.model_loads(),
                os.environ.get("OMP_WAIT_POLICY"), os.environ.get("MALLOC_ARENA_MAX"))

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    specs = [s for s in read_manifest(cohort) if s.subject_id != "broken"]
    with local_cluster(1, 1, 4 * 1024**3, subjects=subjects) as cluster, \
            Client(cluster) as client:
        summary = run_cohort(specs, tmp_path / "out", model_path, client=client)
        (peak, loads, wait_policy, arenas), = client.run(stats).values()
    assert summary.ok == 4
    assert (peak, loads) == (subjects, 1)  # two subjects held at once, one model loaded
    assert wait_policy == "PASSIVE"  # OpenMP threads that wait sleep (a user's value would win)
    assert arenas == "1"  # the reader thread allocates from the worker's heap (test_runtime.py)


def test_shards_split_the_cohort(cohort: Path) -> None:
    specs = read_manifest(cohort)
    parts = [shard(specs, f"{i}/2") for i in range(2)]
    assert [s.subject_id for s in parts[0]] == ["knee001", "knee003", "broken"]
    assert sorted(s.subject_id for p in parts for s in p) == sorted(s.subject_id for s in specs)


@pytest.mark.parametrize("bad", ["2/2", "x", "-1/3", "1/0"])
def test_bad_shard_is_a_usage_error(cohort: Path, model_path: Path, tmp_path: Path,
                                    bad: str) -> None:
    assert run(cohort, tmp_path / "out", model_path, f"--shard={bad}") == 2


def test_validate_reports_every_problem_from_headers(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest = make_cohort(tmp_path / "c")
    shutil.copy(tmp_path / "c" / "knee001_mask.nii.gz", tmp_path / "c" / "wrong_mask.nii.gz")
    with manifest.open("a") as fh:
        fh.write("mismatch,knee002_ct.nii.gz,wrong_mask.nii.gz,R,A,50\n")
    assert main(["validate", str(manifest)]) == 1
    printed = capsys.readouterr().out
    assert printed.count("ok   knee") == 4
    assert "FAIL broken: Subject broken: CT" in printed and "does not exist" in printed
    assert "FAIL mismatch: Subject mismatch: mask" in printed and "size=" in printed
    assert "4 of 6 subject(s) look fine; 2 problem(s)." in printed


@pytest.mark.slow
def test_merge_of_shard_folders_equals_one_run_and_refuses_mixtures(
        first_run: Path, cohort: Path, model_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    halves = [tmp_path / "a", tmp_path / "b"]
    for i, out in enumerate(halves):
        run(cohort, out, model_path, "--shard", f"{i}/2", "--workers", "2",
            "--threads-per-worker", "1")  # first_run's layout: the same rounding
    merged = tmp_path / "all"
    assert main(["merge", *map(str, halves), "--out", str(merged)]) == 0
    assert_same_results(merged, first_run)
    regions = pd.read_parquet(merged / "regions").sort_values(["subject_id", "region"])
    expected = pd.read_parquet(first_run / "regions").sort_values(["subject_id", "region"])
    pd.testing.assert_frame_equal(regions.drop(columns="run_id").reset_index(drop=True),
                                  expected.drop(columns="run_id").reset_index(drop=True))
    assert pd.read_csv(merged / "failures.csv")["subject_id"].tolist() == ["broken"]
    record = json.loads((merged / "run.json").read_text())
    assert record["sources"] == [str(h.resolve()) for h in halves]
    assert record["schema_version"] == 3
    capsys.readouterr()
    # a subject in two folders, other settings, and a run into the merged folder are refused
    assert main(["merge", str(first_run), str(halves[0]), "--out", str(tmp_path / "x")]) == 2
    assert "are in both" in capsys.readouterr().err
    other = tmp_path / "coarse"
    manifest = read_manifest(cohort)
    assert main(["extract", "--ct", str(manifest[0].ct), "--mask", str(manifest[0].mask),
                 "--subject-id", "solo", "--out", str(other), "--model", str(model_path),
                 "--spacing", "2"]) == 0
    assert main(["gather", str(other)]) == 0
    capsys.readouterr()
    assert main(["merge", str(first_run), str(other), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "spacing_mm 1.0 -> 2.0" in err and not (tmp_path / "y" / "similarities").exists()
    assert run(cohort, merged, model_path) == 2
    assert "made by `kneebatch merge`" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parquet(first_run: Path, cohort: Path, model_path: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "kneebatch", "run", str(cohort), "--out", str(out),
               "--model", str(model_path), "--workers", "2", "--threads-per-worker", "1"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("subjects/*/done.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= len(list(out.glob("subjects/*/done.json"))) < 4, "killed too late to test resume"
    assert main(["run", str(cohort), "--out", str(out), "--model", str(model_path), "--workers",
                 "2", "--threads-per-worker", "1"]) == 1
    assert_same_results(first_run, out)
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


@pytest.mark.slow
def test_a_worker_killed_mid_subject_is_replaced_and_the_subject_retried(
        first_run: Path, cohort: Path, model_path: Path, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from kneebatch.cohort.run import run_cohort

    specs = read_manifest(cohort)
    killed: list[str] = []

    def kill_a_busy_worker(client: Client, pids: dict[str, int]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy:
                time.sleep(0.3)  # into the subject: reading, preprocessing or the forward pass
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(busy[0])
                return
            time.sleep(0.02)

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        killer = threading.Thread(target=kill_a_busy_worker, args=(client, client.run(os.getpid)))
        killer.start()
        summary = run_cohort(specs, tmp_path / "out", model_path, client=client)
        killer.join()
    assert killed, "no worker was killed"
    assert (summary.ok, summary.failed) == (4, 1)
    assert_same_results(first_run, tmp_path / "out")
