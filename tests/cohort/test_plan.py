"""``run --dry-run``: what a run would do, checked against the run itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kneebatch.cli.main import main
from kneebatch.cohort.cluster import ClusterSpec
from kneebatch.cohort.plan import plan_run
from kneebatch.cohort.run import RunOptions

from ..helpers import edit_manifest, run

ONE = ("--workers", "1", "--threads-per-worker", "2")
TOLERANCE = 0.5  # the estimate from earlier results is within 50% of the real run's wall time


def _wall(out: Path) -> float:
    return float(json.loads((out / "run.json").read_text())["wall_s"])


def test_the_estimate_is_near_the_real_run(cohort: Path, model_path: Path,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["run", str(cohort), "--out", str(out), "--model", str(model_path), *ONE,
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "compute 3: knee001, knee002, knee003" in printed and "calibration" in printed
    assert not out.exists()  # nothing written
    spec = ClusterSpec(workers=1, threads_per_worker=2)
    calibrated = plan_run(cohort, out, model_path, RunOptions(), spec)
    assert run(cohort, out, model_path, *ONE) == 0
    first = _wall(out)
    assert 1 / 3 < calibrated.wall_s / first < 3, (calibrated, first)
    planned = plan_run(cohort, out, model_path, RunOptions(overwrite=True), spec)
    assert "already computed" in planned.basis and len(planned.redo) == 3
    assert run(cohort, out, model_path, *ONE, "--overwrite") == 0
    assert abs(planned.wall_s / _wall(out) - 1) < TOLERANCE, (planned, _wall(out))


def test_redo_reasons_and_shards(cohort: Path, model_path: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run(cohort, out, model_path, "--workers", "1", "--spacing", "2") == 0
    edit_manifest(cohort, "knee002", side="R")
    (out / "subjects" / "knee003" / "features.npz").write_bytes(b"broken")
    capsys.readouterr()
    assert main(["run", str(cohort), "--out", str(out), "--model", str(model_path),
                 "--spacing", "2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "redo    knee002: inputs, settings or model changed" in printed
    assert "redo    knee003:" in printed and "features.npz" in printed
    assert "skip    1 already finished" in printed and "compute 0" in printed
    assert main(["run", str(cohort), "--out", str(out), "--model", str(model_path),
                 "--spacing", "2", "--dry-run", "--shard", "0/2"]) == 0
    printed = capsys.readouterr().out
    assert "knee002" not in printed and "redo    knee003:" in printed
    assert main(["run", str(cohort), "--out", str(out), "--model", str(model_path),
                 "--dry-run"]) == 2  # other settings: the run would refuse
    assert "spacing_mm 2.0 -> 1.0" in capsys.readouterr().out
