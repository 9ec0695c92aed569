"""Operations on a shared node (issue 11): Ctrl-C, hangs, memory limits, a private local cluster,
quiet logs, progress, status and provenance. Each test is a case a user met on kneebatch 0.1."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
import pytest
import SimpleITK as sitk

from kneebatch.cli.main import main
from kneebatch.inputs.phantom import write_sample

from .. import helpers

FAST = helpers.BOOKKEEPING_RUN
# localhost directly: urlopen's global opener keeps the proxies of the first process-wide use
# (a test that points them at a closed port to fake no internet)
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
OUR_LINE = re.compile(r"^(\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: |progress: |"
                      r"\s|Traceback)")


def command(manifest: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kneebatch", "run", str(manifest), "--out", str(out),
            "--model", str(model), *FAST, *extra]


def run(manifest: Path, out: Path, model: Path, *extra: str, scheduler: str | None = None) -> int:
    """In-process ``kneebatch run``; joining ``scheduler`` where the cluster is not what is tested."""
    joined = ("--scheduler-address", scheduler) if scheduler else ()
    return helpers.run(manifest, out, model, *FAST, *joined, *extra)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(tmp_path_factory.mktemp("ops"), 4, size="small")


@pytest.fixture(scope="module")
def finished(cohort: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory,
             shared_scheduler: str) -> Path:
    out = tmp_path_factory.mktemp("ops-out") / "out"
    assert run(cohort, out, model_path, scheduler=shared_scheduler) == 0
    return out


def test_ctrl_c_stops_like_sigterm_and_keeps_what_is_finished(
        model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    many = write_sample(tmp_path / "many", 12, size="small")  # far more than are in flight
    proc = subprocess.Popen(command(many, out, model_path, "--subjects-per-worker", "1"),
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("subjects/*/done.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "ended before the Ctrl-C"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stdout.count("To resume, run the same command again") == 1
    record = json.loads((out / "run.json").read_text())
    finished = len(list(out.glob("subjects/*/done.json")))
    assert record["stopped"] is True and 1 <= finished < 12
    assert pd.read_parquet(out / "similarities")["subject_id"].nunique() == finished
    assert main(["gather", str(out)]) == 1  # the rest are pending: say so
    assert not [p for p in psutil.Process().children(recursive=True)
                if "kneebatch" in " ".join(p.cmdline())]


def test_gather_and_report_work_on_an_out_written_by_extract(
        cohort: Path, model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = cohort.parent
    assert main(["extract", "--ct", str(folder / "knee001_ct.nii.gz"), "--mask",
                 str(folder / "knee001_mask.nii.gz"), "--subject-id", "k1", "--out", str(out),
                 "--model", str(model_path), "--spacing", "2"]) == 0
    assert main(["gather", str(out)]) == 0
    assert pd.read_parquet(out / "similarities")["subject_id"].unique().tolist() == ["k1"]
    assert main(["report", str(out), "--no-qc"]) == 0
    assert (out / "report" / "index.html").is_file()


def test_a_file_that_never_answers_fails_alone(cohort: Path, model_path: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    fifo = cohort.parent / "fifo_ct.nii.gz"
    if not fifo.exists():
        os.mkfifo(fifo)
    manifest = cohort.with_name("hung.csv")
    rows = cohort.read_text().splitlines()
    manifest.write_text("\n".join([*rows[:3], "hung,fifo_ct.nii.gz,knee001_mask.nii.gz,R,A,1"])
                        + "\n")
    assert main(["validate", str(manifest)]) == 1
    assert "FAIL hung:" in capsys.readouterr().out
    assert run(manifest, tmp_path / "out", model_path) == 1
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert failures["subject_id"].tolist() == ["hung"] and failures["stage"].tolist() == ["read"]
    assert "not a regular file" in failures["error"][0]
    assert pd.read_parquet(tmp_path / "out" / "similarities")["subject_id"].nunique() == 2


def test_a_read_that_hangs_times_out(knee: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from kneebatch.errors import InputImageError
    from kneebatch.inputs.manifest import subject_spec
    from kneebatch.scan.read import read_image

    release = threading.Event()

    def hung_nfs_read(*_args: object, **_kwargs: object) -> None:  # ITK blocked in the kernel
        release.wait(30)

    monkeypatch.setattr(sitk, "ReadImage", hung_nfs_read)
    spec = subject_spec("k1", *knee)
    start = time.monotonic()
    with pytest.raises(InputImageError, match=r"no answer within 0\.5 s") as caught:
        read_image(spec, "CT", spec.ct, timeout_s=0.5)
    release.set()
    assert time.monotonic() - start < 5
    assert caught.value.stage == "read" and "--read-timeout" in caught.value.message


def test_a_missing_scheduler_file_fails_fast(cohort: Path, model_path: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    assert main(["run", str(cohort), "--out", str(tmp_path / "out"), "--model", str(model_path),
                 "--scheduler-file", str(tmp_path / "nope.json")]) == 2
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert "nope.json does not exist" in err and "dask scheduler --scheduler-file" in err


@pytest.mark.parametrize(("env", "says"), [
    ({"SLURM_MEM_PER_NODE": "1000"}, "SLURM_MEM_PER_NODE=1000 MB"),
    ({"SLURM_MEM_PER_CPU": "300", "SLURM_CPUS_PER_TASK": "2"}, "SLURM_MEM_PER_CPU=300 MB x 2 CPUs"),
], ids=["mem-per-node", "mem-per-cpu"])
def test_a_worker_too_small_for_the_model_is_refused_at_start(
        env: dict[str, str], says: str, cohort: Path, model_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    assert main(["run", str(cohort), "--out", str(tmp_path / "out"), "--model",
                 str(model_path)]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "needs at least 1.00 GiB for torch and the model; you gave" in err and says in err
    assert "--memory-per-worker" in err and "--mem" in err
    assert not list((tmp_path / "out").glob("subjects/*/done.json"))


def test_the_memory_estimate_reads_the_mask_header_too(
        cohort: Path, model_path: Path, tmp_path: Path) -> None:
    ct = sitk.ReadImage(str(cohort.parent / "knee001_ct.nii.gz"))
    huge = sitk.Image(600, 600, 600, sitk.sitkUInt8)  # 216 M voxels, a few hundred kB on disk
    huge.SetSpacing(ct.GetSpacing())
    sitk.WriteImage(huge, str(tmp_path / "huge_mask.mha"), useCompression=True)
    assert (tmp_path / "huge_mask.mha").stat().st_size < 5 * 1024**2
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject_id,ct,mask\nbig,{cohort.parent}/knee001_ct.nii.gz,"
                        f"{tmp_path}/huge_mask.mha\n")
    out = tmp_path / "out"
    assert run(manifest, out, model_path, "--memory-per-worker", "2GB", "--resample-mask") == 1
    failure = pd.read_csv(out / "failures.csv").iloc[0]
    assert failure["stage"] == "memory" and "huge_mask.mha (600x600x600)" in failure["error"]


def test_the_local_cluster_is_private_and_feeds_no_more_than_its_slots(
        finished: Path, cohort: Path, model_path: Path) -> None:
    from distributed import Client

    from kneebatch.cohort.cluster import ALLOWED_FAILURES, local_cluster
    from kneebatch.cohort.run import run_cohort

    with local_cluster(2, 1, 2 * 1024**3, subjects=2) as cluster, Client(cluster) as client:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        listening = {c.laddr for p in [psutil.Process(), *psutil.Process().children(recursive=True)]
                     for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        assert 8787 not in {a.port for a in listening}
        from distributed.security import Security

        with pytest.raises((OSError, TimeoutError)):  # another user, no credentials: refused
            Client(address.replace("tls://", "tcp://"), timeout=3)
        with pytest.raises((OSError, TimeoutError)):  # another user's own credentials: refused
            Client(address, security=Security.temporary(), timeout=3)
        assert client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.allowed_failures) == ALLOWED_FAILURES
        paused_at = client.run(lambda dask_worker: dask_worker.memory_manager.memory_pause_fraction)
        assert set(paused_at.values()) == {False}  # a worker near its limit never waits forever
        http = [cluster.scheduler.http_server.port,
                *client.run(lambda dask_worker: dask_worker.http_server.port).values()]
        for port, path in itertools.product(http, ("/json/identity.json", "/health", "/metrics",
                                                   "/info/main/workers.html")):
            with pytest.raises(urllib.error.HTTPError, match="404"):  # no endpoint serves
                LOCAL.open(f"http://127.0.0.1:{port}{path}", timeout=5)
        most = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                most[0] = max([most[0], *(len(t) for t in client.processing().values())])
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            summary = run_cohort(cohort, finished.parent / "private", model_path, client=client)
        finally:
            stop.set()
            watcher.join()
    # 4 subjects, 2 workers x 2 slots (one reads ahead): none ever queues behind a full worker
    assert summary.ok == 4 and most[0] == 2


def test_dask_logs_are_ours_and_quiet(cohort: Path, model_path: Path, tmp_path: Path) -> None:
    done = subprocess.run(command(cohort, tmp_path / "out", model_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    foreign = [line for line in done.stderr.splitlines() if not OUR_LINE.match(line)]
    assert not foreign, foreign
    assert "distributed" not in done.stderr and "8787" not in done.stderr


def test_progress_counts_only_what_this_run_computes(
        finished: Path, cohort: Path, model_path: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "subjects" / "knee003")
    done = subprocess.run(command(cohort, out, model_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    progress = [line for line in done.stderr.splitlines() if line.startswith("progress:")]
    assert progress and progress[-1].startswith("progress: 1/1 done (1 ok, 0 failed)")
    assert "ETA 0m00s" in progress[-1]


def test_failures_csv_is_written_as_the_run_goes(cohort: Path, model_path: Path,
                                                 tmp_path: Path) -> None:
    manifest = cohort.with_name("broken_first.csv")
    lines = cohort.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], "broken,gone.nii.gz,knee001_mask.nii.gz,R,A,1",
                                   *lines[1:]]) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(command(manifest, out, model_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen_while_running = False
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        csv_file = out / "failures.csv"
        if csv_file.is_file() and "broken" in csv_file.read_text():
            seen_while_running = proc.poll() is None
            break
        time.sleep(0.05)
    assert proc.wait(timeout=300) == 1
    assert seen_while_running


def test_status_counts_the_cohort_from_the_files(
        finished: Path, cohort: Path, model_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from kneebatch.outdir.claims import claim

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "subjects" / "knee004")
    with claim(out, "knee002", "another-run"):
        capsys.readouterr()
        assert main(["status", str(out)]) == 0
        printed = capsys.readouterr().out
    assert "4 subject(s) in the manifest" in printed
    assert re.search(r"finished\s+2\n", printed) and re.search(r"running\s+1\s+on " +
                                                                re.escape(socket.gethostname()),
                                                                printed)
    assert re.search(r"pending\s+1\n", printed) and "knees/h" in printed
    assert main(["status", str(out), str(cohort)]) == 0


def test_run_json_records_where_and_how_each_run_ran(
        finished: Path, cohort: Path, model_path: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    first_run = json.loads((out / "run.json").read_text())["run_id"]
    shutil.rmtree(out / "subjects" / "knee001")
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"}
    done = subprocess.run(command(cohort, out, model_path), capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["manifest"] == str(cohort.resolve()) and len(record["manifest_sha256"]) == 64
    assert record["command"][1:3] == ["run", str(cohort)] and record["host"] == socket.gethostname()
    assert record["slurm"] == {"job_id": "4242", "array_task_id": "3"}
    assert {"python", "numpy", "SimpleITK", "torch", "torchvision"} <= set(record["versions"])
    assert len(list((out / ".kneebatch" / "runs").glob("*.json"))) == 2  # history
    rows = pd.read_parquet(out / "similarities")
    by_subject = rows.groupby("subject_id")["run_id"].unique().to_dict()
    assert list(by_subject.pop("knee001")) == [record["run_id"]]
    assert all(list(ids) == [first_run] for ids in by_subject.values())


def test_a_subject_warning_reaches_done_json_and_the_parquet(
        cohort: Path, model_path: Path, tmp_path: Path, shared_scheduler: str) -> None:
    mask = sitk.ReadImage(str(cohort.parent / "knee002_mask.nii.gz"))
    array = sitk.GetArrayFromImage(mask)
    array[0, 0, :4] = 7
    odd = sitk.GetImageFromArray(array)
    odd.CopyInformation(mask)
    sitk.WriteImage(odd, str(tmp_path / "odd_mask.nii.gz"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject_id,ct,mask\nodd,{cohort.parent}/knee002_ct.nii.gz,"
                        f"{tmp_path}/odd_mask.nii.gz\n")
    out = tmp_path / "out"
    assert run(manifest, out, model_path, scheduler=shared_scheduler) == 0
    done = json.loads((out / "subjects" / "odd" / "done.json").read_text())
    assert len(done["warnings"]) == 1 and "holds labels 7 besides 0" in done["warnings"][0]
    rows = pd.read_parquet(out / "similarities")
    assert set(rows["warnings"]) == {done["warnings"][0]}


def test_a_model_file_that_is_not_ours_is_refused_before_compute(
        cohort: Path, model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import torch

    from kneebatch.network.provenance import file_sha256, sidecar_path

    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    sidecar = json.loads(sidecar_path(model_path).read_text())
    sidecar["sha256"] = file_sha256(other)
    sidecar_path(other).write_text(json.dumps(sidecar))
    start = time.monotonic()
    assert run(cohort, tmp_path / "out", other) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "is not a kneebatch" in err and "kneebatch build-model --weights FILE" in err
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_the_driver_of_a_local_run_never_imports_torch(cohort: Path, model_path: Path,
                                                        tmp_path: Path) -> None:
    """Issue 23: importing torch and torchvision costs the driver seconds it does not need; the
    workers import them (and check the model file's tensors first: the test above)."""
    argv = ["run", str(cohort), "--out", str(tmp_path / "out"), "--model", str(model_path), *FAST]
    code = ("import sys; from kneebatch.cli.main import main; rc = main(sys.argv[1:]); "
            "print('imported:', sorted({'torch', 'torchvision'} & set(sys.modules))); "
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "imported: []"
    assert len(pd.read_parquet(tmp_path / "out" / "similarities")["subject_id"].unique()) == 4


def test_the_dashboard_serves_on_localhost_only_when_asked() -> None:
    from kneebatch.cohort.cluster import local_cluster

    with local_cluster(1, 1, 2 * 1024**3, dashboard=True) as cluster:
        server = cluster.scheduler.http_server
        assert server.address == "127.0.0.1"
        with LOCAL.open(f"http://127.0.0.1:{server.port}/json/identity.json",
                                    timeout=5) as answer:
            assert json.load(answer)["type"] == "Scheduler"
