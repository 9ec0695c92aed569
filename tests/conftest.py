"""Shared fixtures: a seeded random-weights model file and tiny synthetic knees on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from kneebatch.network.modelfile import save_model
from kneebatch.network.weights import build_model

from .helpers import write_knee


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model3d_state_dict.pth"
    network, source = build_model(weights="random", seed=0)
    save_model(network, source, path)
    return path




@pytest.fixture
def knee(tmp_path: Path) -> tuple[Path, Path]:
    return write_knee(tmp_path / "in")
