"""Settings files: ``run --config`` (TOML or a run.json) and ``kneebatch config OUT``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kneebatch.cli.main import main

from ..helpers import run


def _record(out: Path) -> dict[str, object]:
    return json.loads((out / "run.json").read_text())


def test_a_toml_file_sets_what_the_command_line_does_not(
        cohort: Path, model_path: Path, tmp_path: Path) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text('[extraction]\nspacing_mm = 2.0\nmargin_mm = 20.0\nhu_max = 1800.0\n\n'
                        '[run]\nworkers = 1\nlabels = "tibia=1,femur=2+9"\n'
                        'subject_timeout_s = 900\n')
    out = tmp_path / "out"
    assert run(cohort, out, model_path, "--config", str(settings), "--margin-mm", "5") == 0
    record = _record(out)
    config = record["config"]
    assert isinstance(config, dict) and isinstance(record["options"], dict)
    assert (config["spacing_mm"], config["margin_mm"], config["hu_max"]) == (2.0, 5.0, 1800.0)
    assert record["options"]["labels"] == "tibia=1,femur=2+9"
    assert record["options"]["subject_timeout_s"] == 900


def test_a_finished_runs_settings_reproduce_its_config_hash(
        cohort: Path, model_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first"
    assert run(cohort, first, model_path, "--workers", "1", "--spacing", "native", "--crop",
               "none", "--margin-mm", "3", "--layers", "denseblock2") == 0
    capsys.readouterr()
    assert main(["config", str(first)]) == 0
    (tmp_path / "again.toml").write_text(capsys.readouterr().out)
    for source, out in ((tmp_path / "again.toml", tmp_path / "toml"),
                        (first / "run.json", tmp_path / "json")):
        assert run(cohort, out, model_path, "--workers", "1", "--config", str(source)) == 0
        assert _record(out)["config_hash"] == _record(first)["config_hash"]
        assert _record(out)["config"] == _record(first)["config"]


def test_an_unknown_setting_is_refused_with_the_known_ones(
        cohort: Path, model_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text("[extraction]\nmargin = 20\n")
    assert run(cohort, tmp_path / "out", model_path, "--config", str(settings)) == 2
    err = capsys.readouterr().err
    assert "unknown extraction.margin" in err and "margin_mm" in err
    assert not (tmp_path / "out").exists()
