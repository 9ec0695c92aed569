"""Every script in jobs/ and `--cluster slurm`, submitted to a real SLURM started by the tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kneebatch.cli.main import main
from kneebatch.inputs.phantom import write_sample
from kneebatch.network.cache import get_model

from ..helpers import assert_same_results
from ..slurm import start_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
JOBS = Path(__file__).resolve().parents[2] / "jobs"
ATOL = 1e-5  # thread counts differ between layouts: float32 summation order only
RTOL = 1e-5  # float32 rounding of feature values up to about 10


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    yield from start_slurm(tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(tmp_path_factory.mktemp("slurm-cohort"), 4, size="small")


@pytest.fixture(scope="module")
def reference(cohort: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("slurm-ref") / "out"
    assert main(["run", str(cohort), "--out", str(out), "--model", str(model_path),
                 "--workers", "1", "--threads-per-worker", "1"]) == 0
    return out


@pytest.fixture
def job_env(slurm: dict[str, str], model_path: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**slurm, "KNEEBATCH_MODEL": str(model_path),
            "PATH": f"{bin_dir}:{slurm.get('PATH', '')}"}


def sbatch(env: dict[str, str], log: Path, *args: str, wait: bool = True) -> str:
    """Submit a job; with ``wait``, poll until it ends (faster than ``sbatch --wait``)."""
    command = ["sbatch", "--parsable", f"--output={log}", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"sbatch refused the job: {done.stderr}")
    job = done.stdout.strip().split(";")[0]
    if wait:
        state, code = wait_for(env, job)
        if (state, code) != ("COMPLETED", "0:0"):
            pytest.fail(f"job {job} ended {state} {code}:\n{_read(log)[-5000:]}")
    return job


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def job_state(env: dict[str, str], job_id: str) -> tuple[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True,
                           text=True).stdout
    state = re.search(r"JobState=(\S+)", shown)
    code = re.search(r"ExitCode=(\S+)", shown)
    return (state.group(1) if state else "GONE", code.group(1) if code else "")


def wait_for(env: dict[str, str], job_id: str, timeout: float = 600) -> tuple[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state, code = job_state(env, job_id)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state, code
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still running")


def test_cohort_node_script(job_env: dict[str, str], cohort: Path, reference: Path,
                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    sbatch(job_env, tmp_path / "job.log", "--cpus-per-task=2", "--mem=4G",
           str(JOBS / "cohort-node.sbatch"), str(cohort), str(out))
    # sized from the allocation: SLURM_CPUS_PER_TASK=2, SLURM_MEM_PER_NODE=4096
    assert "1 worker(s) x 2 thread(s), 4.0 GiB each" in _read(tmp_path / "job.log")
    assert_same_results(reference, out, atol=ATOL, rtol=RTOL)


FAKE_APPTAINER = """#!/bin/sh
# A stand-in for Apptainer, which cannot be installed here: log the call, run the command on the host.
[ "$1" = exec ] || exit 64
echo "apptainer exec $2" >&2
shift 2
exec "$@"
"""


def test_node_script_with_only_the_variables_it_is_given(
        slurm: dict[str, str], cohort: Path, reference: Path, model_path: Path,
        tmp_path: Path) -> None:
    """A site that submits with --export=NONE: the job sees only SLURM's variables and the ones
    listed; the script runs the prologue, puts KNEEBATCH_ENV on PATH, runs kneebatch through the
    container named in KNEEBATCH_CONTAINER, and logs host, versions and the model's sha256 first."""
    out = tmp_path / "out"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apptainer").write_text(FAKE_APPTAINER)
    (fake / "apptainer").chmod(0o755)
    environment = Path(sys.executable).parent.parent  # the venv (or env) that runs the tests
    exported = (f"--export=KNEEBATCH_ENV={environment},KNEEBATCH_MODEL={model_path},"
                "KNEEBATCH_CONTAINER=/images/kneebatch.sif,"
                f"KNEEBATCH_PROLOGUE=echo prologue ran on $(hostname); export PATH={fake}:$PATH")
    sbatch(slurm, tmp_path / "job.log", exported, "--cpus-per-task=2", "--mem=4G",
           str(JOBS / "cohort-node.sbatch"), str(cohort), str(out))
    log = _read(tmp_path / "job.log")
    assert "prologue ran on" in log
    assert log.count("apptainer exec /images/kneebatch.sif") == 2  # info, then run
    sha256 = get_model(model_path).info.sha256
    first = log.index("kneebatch 0.1.0 on")
    assert first < log.index("starting a LocalCluster") and f"sha256 {sha256}" in log
    assert "torch " in log[first:first + 400]
    assert_same_results(reference, out, atol=ATOL, rtol=RTOL)


def _refused(address: str, security: object = None) -> bool:
    from distributed import Client

    try:
        Client(address, security=security, timeout=5).close()
    except (OSError, TimeoutError):
        return True
    return False


def test_cohort_multinode_script(job_env: dict[str, str], cohort: Path, reference: Path,
                                 tmp_path: Path) -> None:
    from distributed.security import Security

    out = tmp_path / "out"
    env = {**job_env, "KNEEBATCH_INTERFACE": "lo"}
    job = sbatch(env, tmp_path / "job.log", "--nodes=1", "--ntasks-per-node=2",
                 "--cpus-per-task=1", "--mem-per-cpu=2G", str(JOBS / "cohort-multinode.sbatch"),
                 str(cohort), str(out), wait=False)
    scheduler_file = out / ".kneebatch" / f"scheduler-{job}.json"
    deadline = time.monotonic() + 300
    while not (scheduler_file.is_file() and scheduler_file.stat().st_size):
        assert time.monotonic() < deadline, _read(tmp_path / "job.log")[-5000:]
        time.sleep(0.1)
    address = json.loads(scheduler_file.read_text())["address"]
    tls_dir = out / ".kneebatch" / f"tls-{job}"
    assert address.startswith("tls://") and not address.endswith(":8786"), address
    assert tls_dir.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in tls_dir.iterdir())
    assert _refused(address.replace("tls://", "tcp://"))  # no TLS: refused
    assert _refused(address, Security.temporary())  # TLS, but not the job's certificate
    assert wait_for(env, job) == ("COMPLETED", "0:0"), _read(tmp_path / "job.log")[-5000:]
    log = _read(tmp_path / "job.log")
    assert "joined scheduler" in log and "with 2 workers" in log, log[-5000:]
    assert_same_results(reference, out, atol=ATOL, rtol=RTOL)
    assert not list((out / ".kneebatch").glob("scheduler-*.json")), "scheduler file not cleaned"
    assert not tls_dir.exists(), "credentials not removed"


def test_multinode_workers_too_small_for_the_model_end_the_job_fast(
        job_env: dict[str, str], cohort: Path, tmp_path: Path) -> None:
    job = sbatch({**job_env, "KNEEBATCH_INTERFACE": "lo"}, tmp_path / "job.log", "--nodes=1",
                 "--ntasks-per-node=2", "--cpus-per-task=1", "--mem-per-cpu=700M",
                 str(JOBS / "cohort-multinode.sbatch"), str(cohort), str(tmp_path / "out"),
                 wait=False)
    state, code = wait_for(job_env, job, timeout=300)
    log = _read(tmp_path / "job.log")
    assert (state, code) == ("FAILED", "2:0"), log[-5000:]
    assert "A worker needs at least" in log and "the memory limit of worker" in log, log[-5000:]
    assert "--mem-per-cpu" in log


def test_array_and_gather_scripts_and_resubmitting_some_shards(
        job_env: dict[str, str], cohort: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**job_env, "SBATCH_OPTIONS": f"--cpus-per-task=1 --mem=2G --output={tmp_path}/%j.log"}
    # shard 1 of 2 alone (as a retry would): its subjects finish, the gather says two are missing
    # (exit 1); then the whole array: shard 1 skips what it has, the gather completes
    for tasks, finished, state in ((["1"], {"knee002", "knee004"}, "FAILED"),
                                   ([], {f"knee00{i}" for i in range(1, 5)}, "COMPLETED")):
        done = subprocess.run([str(JOBS / "submit-array.sh"), str(cohort), str(out), "2", *tasks],
                              env=env, capture_output=True, text=True, check=True)
        gather_id = done.stdout.split()[1]
        assert wait_for(env, gather_id)[0] == state, _read(tmp_path / f"{gather_id}.log")
        assert {p.parent.name for p in out.glob("subjects/*/done.json")} == finished
    assert_same_results(reference, out, atol=ATOL, rtol=RTOL)
    assert len(list((out / ".kneebatch" / "runs").glob("*.json"))) == 3  # shard 1 twice
    record = json.loads((out / "run.json").read_text())
    assert record["parquet"]["subjects"] == 4 and len(record["shards"]) == 2  # over both shards


def test_walltime_signal_stops_cleanly_and_a_resubmit_finishes(
        job_env: dict[str, str], model_path: Path, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    cohort = write_sample(tmp_path / "cohort", 10, size="small")
    out = tmp_path / "out"
    job = sbatch(job_env, tmp_path / "job.log", "--cpus-per-task=1", "--mem=2G",
                 str(JOBS / "cohort-node.sbatch"), str(cohort), str(out), wait=False)
    end = time.monotonic() + 300
    while len(list(out.glob("subjects/*/done.json"))) < 2 and time.monotonic() < end:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=job_env, check=True)
    state, code = wait_for(job_env, job)
    assert code == "75:0", f"{state} {code}\n{_read(tmp_path / 'job.log')}"
    finished = len(list(out.glob("subjects/*/done.json")))
    assert 2 <= finished < 10
    assert not list(out.rglob("*.tmp")), "a half-written file was left"
    record = json.loads((out / "run.json").read_text())
    assert record["stopped"] is True and record["parquet"]["subjects"] == finished
    sbatch(job_env, tmp_path / "again.log", "--cpus-per-task=1", "--mem=2G",
           str(JOBS / "cohort-node.sbatch"), str(cohort), str(out))
    assert f"{10 - finished} finished, 0 failed, {finished} skipped" in _read(
        tmp_path / "again.log")
    reference = tmp_path / "ref"
    assert main(["run", str(cohort), "--out", str(reference), "--model", str(model_path),
                 "--workers", "1", "--threads-per-worker", "1"]) == 0
    assert_same_results(reference, out, atol=ATOL, rtol=RTOL)


def test_cluster_slurm_submits_worker_jobs(job_env: dict[str, str], cohort: Path,
                                           reference: Path, model_path: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "kneebatch", "run", str(cohort), "--out", str(out),
               "--model", str(model_path), "--cluster", "slurm", "--slurm-cores", "2",
               "--slurm-memory", "4GB", "--slurm-walltime", "00:30:00", "--slurm-max-jobs", "1",
               "--threads-per-worker", "1",
               f"--slurm-directive=--output={tmp_path}/worker-%j.log"]
    done = subprocess.run(command, env=job_env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(tmp_path.glob("worker-*.log")), "no SLURM worker job ran"
    assert_same_results(reference, out, atol=ATOL, rtol=RTOL)


def test_cluster_slurm_with_a_job_sbatch_refuses_fails_fast(
        job_env: dict[str, str], cohort: Path, model_path: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kneebatch", "run", str(cohort), "--out",
               str(tmp_path / "out"), "--model", str(model_path), "--cluster", "slurm",
               "--slurm-partition", "no_such_partition", "--slurm-cores", "1",
               "--threads-per-worker", "1"]
    start = time.monotonic()
    done = subprocess.run(command, env=job_env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert time.monotonic() - start < 60
    assert "sbatch refused the worker job" in done.stderr
    assert "partition" in done.stderr.lower() and "Traceback" not in done.stderr


def test_exported_environment_reaches_jobs(job_env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "env.sh"
    script.write_text("#!/bin/bash\necho model=$KNEEBATCH_MODEL; kneebatch --version\n")
    sbatch(job_env, tmp_path / "env.log", str(script))
    text = _read(tmp_path / "env.log")
    assert f"model={os.environ.get('KNEEBATCH_MODEL', job_env['KNEEBATCH_MODEL'])}" in text
    assert "kneebatch 0.1.0" in text
