"""The ways to install kneebatch agree: pyproject, the conda environment and the Apptainer image."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch-cpu", "simpleitk": "simpleitk", "matplotlib": "matplotlib-base"}


def _requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        if "python_version < '3.11'" in requirement:
            continue  # a backport: the conda environment and the image run Python 3.11
        name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower()
        found[name] = requirement[len(name):].split(";")[0].strip()
    return found


def test_conda_environment_has_every_dependency_with_the_same_lower_bound() -> None:
    text = (ROOT / "environment.yml").read_text()
    listed = dict(re.findall(r"^\s+- ([A-Za-z0-9_.-]+)([<>=][^\s#]*)?", text, re.M))
    for name, bound in _requirements().items():
        conda = CONDA_NAMES.get(name, name)
        assert conda in listed, f"{conda} (for {name}) missing from environment.yml"
        lower = re.search(r">=([\d.]+)", bound)
        if lower:
            assert f">={lower.group(1)}" in listed[conda], (name, bound, listed[conda])


def test_apptainer_image_copies_files_that_exist_and_installs_the_package() -> None:
    text = (ROOT / "containers" / "kneebatch.def").read_text()
    files = re.search(r"%files\n(.*?)\n\n", text, re.S)
    assert files is not None
    for line in files.group(1).splitlines():
        assert (ROOT / line.split()[0]).exists(), line
    assert "--index-url {{ TORCH_INDEX }}" in text and "whl/cpu" in text
    assert "pip install --no-cache-dir /opt/kneebatch-src" in text


def test_citation_file_and_the_cite_line_agree(capsys) -> None:  # type: ignore[no-untyped-def]
    from kneebatch import __version__
    from kneebatch.citation import LICENSE, TITLE
    from kneebatch.cli import main

    cff = (ROOT / "CITATION.cff").read_text()
    assert f'title: "{TITLE}"' in cff and f'version: "{__version__}"' in cff
    assert f"license: {LICENSE}" in cff and "Apache License" in (ROOT / "LICENSE").read_text()
    assert main(["info"]) == 0
    assert f"to cite: The kneebatch developers. {TITLE}." in capsys.readouterr().out
