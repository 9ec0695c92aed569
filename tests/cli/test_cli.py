"""`kneebatch extract` and friends, run in-process through ``main(argv)``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kneebatch.cli.main import build_parser, main
from kneebatch.config import ExtractionConfig
from kneebatch.network.cache import get_model
from kneebatch.results.subject_files import read_features, read_similarities

from ..helpers import SMALL_SHAPE


def _extract(knee: tuple[Path, Path], out: Path, model: Path, *extra: str) -> int:
    return main(["extract", "--ct", str(knee[0]), "--mask", str(knee[1]), "--subject-id", "k1",
                 "--out", str(out), "--model", str(model), "--side", "R", *extra])


def test_extract_writes_the_contract_and_prints_the_table(
        knee: tuple[Path, Path], tmp_path: Path, model_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _extract(knee, out, model_path) == 0
    folder = out / "subjects" / "k1"
    assert sorted(p.name for p in folder.iterdir()) == ["done.json", "features.npz",
                                                         "similarities.csv"]
    features = read_features(folder)
    dims = {"denseblock2": 512, "denseblock3": 1024, "denseblock4": 1024}
    assert {k: v.shape for k, v in features.items()} == {
        f"{r}.{layer}": (dim,) for r in ("tibia", "femur", "background")
        for layer, dim in dims.items()}
    assert all(v.dtype == np.float32 for v in features.values())
    header = (folder / "similarities.csv").read_text().splitlines()[0]
    assert header == "subject_id,layer,region_a,region_b,cosine"
    rows = read_similarities(folder)
    assert [(r.layer, r.region_a, r.region_b) for r in rows][:3] == [
        ("denseblock2", "tibia", "femur"), ("denseblock2", "tibia", "background"),
        ("denseblock2", "femur", "background")]
    assert len(rows) == 9 and all(-1 <= r.cosine <= 1 for r in rows)
    done = json.loads((folder / "done.json").read_text())
    assert done["weights"] == "random:seed=0"
    assert done["config_hash"] == ExtractionConfig().hash()
    assert done["model_sha256"] == get_model(model_path).info.sha256
    assert {"read", "preprocess", "forward.tibia", "forward.femur", "forward.background",
            "write", "total"} <= set(done["timings_s"])
    printed = capsys.readouterr().out
    assert "random:seed=0" in printed and "tibia-femur" in printed
    for r in rows:
        assert f"{r.cosine:.6f}" in printed


def test_preset_seed_feeds_the_whole_native_volume(
        knee: tuple[Path, Path], tmp_path: Path, model_path: Path) -> None:
    assert _extract(knee, tmp_path / "out", model_path, "--preset", "seed") == 0
    done = json.loads((tmp_path / "out" / "subjects" / "k1" / "done.json").read_text())
    assert done["shapes"] == {r: list(SMALL_SHAPE) for r in ("tibia", "femur", "background")}
    assert done["config"] == ExtractionConfig.seed().to_dict()
    assert (done["config"]["spacing_mm"], done["config"]["crop"], done["config"]["pooling"],
            done["config"]["input_norm"]) == (None, "none", "crop", "grey")
    assert done["config_hash"] != ExtractionConfig().hash()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], ExtractionConfig()),
     (["--preset", "seed", "--spacing", "1.5"], ExtractionConfig.seed(spacing_mm=1.5)),
     (["--margin-mm", "30", "--pooling", "crop"], ExtractionConfig(margin_mm=30.0, pooling="crop")),
     (["--spacing", "native", "--input-norm", "grey"],
      ExtractionConfig(spacing_mm=None, input_norm="grey"))],
    ids=["defaults", "preset-with-override", "margin-and-pooling", "native-grey"])
def test_settings_from_the_command_line(argv: list[str], expected: ExtractionConfig) -> None:
    from kneebatch.cli.main import build_parser
    from kneebatch.cli.options import config_from_args

    args = build_parser().parse_args(["validate", "m.csv", *argv])
    assert config_from_args(args) == expected


def test_a_bad_subject_exits_1_writes_nothing_and_names_the_file(
        knee: tuple[Path, Path], tmp_path: Path, model_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no such ct.nii.gz"
    out = tmp_path / "out"
    assert _extract((missing, knee[1]), out, model_path) == 1
    err = capsys.readouterr().err
    assert f"Subject k1: CT {missing}: does not exist" in err
    assert "Traceback" not in err
    assert not (out / "subjects" / "k1").exists()


def test_debug_shows_the_traceback(knee: tuple[Path, Path], tmp_path: Path, model_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "extract", "--ct", str(tmp_path / "x.nii"), "--mask", str(knee[1]),
                 "--subject-id", "k1", "--out", str(tmp_path / "out"), "--model", str(model_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--layers", "denseblok3"], "Did you mean 'denseblock3'?"),
     (["--model", "/nonexistent/m.pth"], "kneebatch build-model"),
     (["--spacing", "-1"], "spacing must be a positive")],
    ids=["unknown-layer", "missing-model", "bad-spacing"],
)
def test_usage_errors_exit_2(knee: tuple[Path, Path], tmp_path: Path, model_path: Path,
                             capsys: pytest.CaptureFixture[str], args: list[str],
                             message: str) -> None:
    argv = ["extract", "--ct", str(knee[0]), "--mask", str(knee[1]), "--subject-id", "k1",
            "--out", str(tmp_path / "out"), "--model", str(model_path), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "subjects").exists()


def test_unsafe_subject_id_is_refused(knee: tuple[Path, Path], tmp_path: Path,
                                      model_path: Path) -> None:
    assert main(["extract", "--ct", str(knee[0]), "--mask", str(knee[1]), "--subject-id",
                 "../evil", "--out", str(tmp_path / "out"), "--model", str(model_path)]) == 2
    assert not (tmp_path / "evil").exists()


def test_model_from_environment(knee: tuple[Path, Path], tmp_path: Path, model_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNEEBATCH_MODEL", str(model_path))
    assert main(["extract", "--ct", str(knee[0]), "--mask", str(knee[1]), "--subject-id", "k1",
                 "--out", str(tmp_path / "out")]) == 0


def test_python_dash_m_and_console_script_answer_help() -> None:
    done = subprocess.run([sys.executable, "-m", "kneebatch", "--help"], capture_output=True,
                          text=True, check=True)
    assert "extract" in done.stdout and "build-model" in done.stdout
    script = Path(sys.executable).with_name("kneebatch")
    assert subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          check=True).stdout.startswith("kneebatch ")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_argument_of_every_command_has_help() -> None:
    parser = build_parser()
    missing = [f"{name} {action.dest}" for name, sub in {"": parser, **_subparsers(parser)}.items()
               for action in sub._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []
    assert "knee CT" in parser.description and "Command line" not in parser.description


@pytest.mark.parametrize("argv", [["gather", "OUT", "--quiet"], ["--quiet", "gather", "OUT"],
                                  ["gather", "--out", "OUT", "--quiet"]],
                         ids=["flag-after", "flag-before", "out-option"])
def test_global_flags_and_out_work_on_either_side_of_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.debug is False
    assert Path("OUT") in (args.out, args.out_option)


def test_every_command_that_takes_an_output_folder_accepts_out() -> None:
    for name, sub in _subparsers(build_parser()).items():
        if name in ("job-script", "validate", "info", "tls-credentials"):
            continue
        assert "--out" in sub._option_string_actions, name


@pytest.mark.parametrize("command", ["report", "gather", "status"])
def test_missing_output_folder_is_one_line(command: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--out", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "Traceback" not in err


def test_an_internal_error_exits_3_and_asks_for_a_report(
        knee: tuple[Path, Path], tmp_path: Path, model_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from kneebatch.cli import validate
    from kneebatch.cohort.task import process_subject
    from kneebatch.config import ExtractionConfig
    from kneebatch.inputs.manifest import SubjectSpec

    def bug(*_: object, **__: object) -> int:
        raise ZeroDivisionError("division by zero")  # stands in for a bug of ours

    monkeypatch.setattr(validate, "_cmd_validate", bug)
    assert main(["validate", str(tmp_path / "cohort.csv")]) == 3
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and "please report it" in err
    monkeypatch.setattr("kneebatch.cohort.task.prepare_subject", bug)
    outcome = process_subject(SubjectSpec("k1", *knee), ExtractionConfig(), model_path,
                              tmp_path / "out", run_id="r")
    assert outcome.status == "failed" and outcome.internal
    assert "probably a kneebatch bug" in (outcome.error or "")


def test_info_says_whether_this_cpu_has_native_bf16(capsys: pytest.CaptureFixture[str]) -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("native bf"))
    assert line.startswith(f"native bfloat16: {'yes' if native else 'no'}")
