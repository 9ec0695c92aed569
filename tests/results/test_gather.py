"""Gather at scale: the helper of ``benchmarks/gather.py`` makes finished subjects cheaply; gather
takes them all, reading each result file once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from kneebatch.results.gather import gather_run

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gather.py"


def _helper():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_gather", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_finished_out


def test_gather_reads_each_result_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _helper()(out, 40)
    reads: list[str] = []
    original = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self.name)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    result = gather_run(out)
    assert result.subjects == 40 and result.failures == 0
    assert reads.count("features.npz") == 40 and reads.count("similarities.csv") == 40
    sims = pd.read_parquet(out / "similarities")
    assert len(sims) == 40 * 9 and set(sims["site"]) == {"A", "B"}
    feats = pd.read_parquet(out / "features")
    assert len(feats) == 40 * 9


def test_gather_removes_what_killed_writers_left_in_the_failure_records(tmp_path: Path) -> None:
    """A run killed while it wrote a failure record left its temporary; the next gather removes
    it (and keeps a live writer's)."""
    import os
    import subprocess
    import sys

    from kneebatch.outdir.failures import ROW_FAILURES, SUBJECT_FAILURES

    out = tmp_path / "out"
    _helper()(out, 2)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = []
    for folder in (SUBJECT_FAILURES, ROW_FAILURES):
        (out / folder).mkdir(parents=True, exist_ok=True)
        left.append(out / folder / f".broken.json.{gone}.867b08dc.tmp")
        left[-1].write_text("{")
    alive = out / SUBJECT_FAILURES / f".other.json.{os.getpid()}.0123abcd.tmp"
    alive.write_text("{")
    gather_run(out)
    assert not any(path.exists() for path in left) and alive.exists()
