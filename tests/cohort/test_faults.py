"""Faults: full or read-only output, concurrent gathers, and a soak of 200 subjects.
(Worker SIGKILL and a run killed mid-write are in test_run.py; symlinks in test_integrity.py.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from kneebatch.cli.main import main
from kneebatch.inputs.phantom import write_sample
from kneebatch.results.gather import gather_run


def _finished_intact(out: Path, subject: str) -> bool:
    folder = out / "subjects" / subject
    done = json.loads((folder / "done.json").read_text())
    with np.load(folder / "features.npz", allow_pickle=False) as data:
        complete = len(data.files) == 9 and all(np.isfinite(data[k]).all() for k in data.files)
    return complete and done["subject_id"] == subject and len(
        (folder / "similarities.csv").read_text().splitlines()) == 10


@pytest.fixture(params=["120k"])
def tiny_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of ``request.param`` bytes (the disk that fills up)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs under CI: {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(tmp_path_factory.mktemp("six"), 6, size="small")


def test_full_disk_fails_clearly_and_keeps_finished_subjects(
        tiny_fs: Path, six: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny_fs / "out"
    code = main(["run", str(six), "--out", str(out), "--model", str(model_path),
                 "--workers", "1"])
    assert code != 0
    err = capsys.readouterr().err
    assert "free space" in err or "No space left" in err
    finished = sorted(p.parent.name for p in out.glob("subjects/*/done.json"))
    assert 1 <= len(finished) < 6
    assert all(_finished_intact(out, s) for s in finished)
    for folder in out.glob("subjects/*"):
        if folder.name not in finished:
            assert not any(folder.iterdir()), f"partial files left in {folder}"
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("tiny_fs", ["8m"], indirect=True)
def test_read_only_output_fails_clearly_and_keeps_results(
        tiny_fs: Path, model_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_sample(tmp_path / "two", 2, size="small")
    out = tiny_fs / "out"
    assert main(["run", str(manifest), "--out", str(out), "--model", str(model_path),
                 "--workers", "1"]) == 0
    before = {p: p.read_bytes() for p in out.glob("subjects/*/*")}
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    code = main(["run", str(manifest), "--out", str(out), "--model", str(model_path),
                 "--workers", "1", "--overwrite"])
    assert code != 0
    assert "writable" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.glob("subjects/*/*")} == before


def _gather(out: str) -> None:
    gather_run(Path(out))


def test_two_gathers_at_once_leave_complete_parquet(six: Path, model_path: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", str(six), "--out", str(out), "--model", str(model_path),
                 "--workers", "1"]) == 0
    expected = pd.read_parquet(out / "similarities").drop(columns="run_id")
    ctx = multiprocessing.get_context("spawn")
    for _ in range(3):
        procs = [ctx.Process(target=_gather, args=(str(out),)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        got = pd.read_parquet(out / "similarities").drop(columns="run_id")
        pd.testing.assert_frame_equal(got, expected)
        assert len(pd.read_parquet(out / "features")) == 6 * 9
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".kneebatch"]


@pytest.mark.slow
def test_soak_200_subjects_two_workers(tmp_path: Path, model_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from distributed import Client, LocalCluster

    from kneebatch.cohort.run import run_cohort

    source = write_sample(tmp_path / "src", 5, size="small")
    rows = source.read_text().splitlines()
    lines = [rows[0]]
    bad = set()
    for i in range(200):
        base = rows[1 + i % 5].split(",")
        base[0] = f"s{i:03d}"
        if i % 40 == 7:  # five injected failures
            base[1] = "gone.nii.gz"
            bad.add(base[0])
        lines.append(",".join(base))
    manifest = tmp_path / "src" / "soak.csv"
    manifest.write_text("\n".join(lines) + "\n")
    from kneebatch.config import ExtractionConfig

    config = ExtractionConfig(spacing_mm=2.0)  # tiny volumes: this is about bookkeeping, not speed
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        summary = run_cohort(manifest, tmp_path / "out", model_path, client=client, config=config)
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    assert (summary.ok, summary.failed) == (195, 5)
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert set(failures["subject_id"]) == bad
    assert pd.read_parquet(tmp_path / "out" / "similarities")["subject_id"].nunique() == 195
    peak_gib = max(peaks.values()) / 1024**3
    with capsys.disabled():
        sizes = [f'{v / 1024**3:.2f} GiB' for v in peaks.values()]
        print(f"\nsoak: 200 subjects, peak RSS per worker {sizes}")
    assert peak_gib < 3.0, f"worker memory grew to {peak_gib:.2f} GiB"
    assert not list((tmp_path / "out").rglob("*.tmp"))
    leftover = [p for p in psutil.Process().children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(p.cmdline())]  # multiprocessing's own
    assert not leftover, f"processes left behind: {leftover}"
    shutil.rmtree(tmp_path / "out")
