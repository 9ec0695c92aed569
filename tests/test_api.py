"""The notebook API: the same numbers as the command line, in memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import kneebatch
from kneebatch.cli.main import main


def test_extract_subject_matches_the_files_of_extract(knee: tuple[Path, Path], tmp_path: Path,
                                                      model_path: Path) -> None:
    result = kneebatch.extract_subject(knee[0], knee[1], model_path, subject_id="k1", side="R")
    assert main(["extract", "--ct", str(knee[0]), "--mask", str(knee[1]), "--subject-id", "k1",
                 "--side", "R", "--out", str(tmp_path / "out"), "--model", str(model_path)]) == 0
    with np.load(tmp_path / "out" / "subjects" / "k1" / "features.npz", allow_pickle=False) as stored:
        for region, layers in result.vectors.items():
            for layer, vector in layers.items():
                np.testing.assert_array_equal(stored[f"{region}.{layer}"], vector)


def test_run_cohort_with_a_manifest_path_and_read_results(tmp_path: Path, model_path: Path) -> None:
    from kneebatch.inputs.phantom import write_sample

    manifest = write_sample(tmp_path / "c", 2, size="small")
    summary = kneebatch.run_cohort(manifest, tmp_path / "out", model_path,
                                   config=kneebatch.ExtractionConfig(layers=("denseblock2",)))
    assert (summary.ok, summary.failed, summary.skipped) == (2, 0, 0)
    results = kneebatch.read_results(tmp_path / "out")
    assert len(results.similarities) == 2 * 3 and len(results.features) == 2 * 3
    assert results.failures.empty


def test_import_is_light() -> None:
    code = "import sys, kneebatch, kneebatch.cli.main; print('torch' in sys.modules, 'dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
