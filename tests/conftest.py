"""Shared fixtures: a seeded random-weights model file and tiny synthetic knees on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk

from kneebatch.inputs.phantom import make_phantom
from kneebatch.network.modelfile import save_model
from kneebatch.network.weights import build_model

SMALL_SHAPE = (40, 64, 64)  # (z, y, x)
SMALL_SPACING = (1.2, 1.0, 1.0)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model3d_state_dict.pth"
    network, source = build_model(weights="random", seed=0)
    save_model(network, source, path)
    return path


def write_knee(folder: Path, name: str = "knee", seed: int = 1, side: str = "R",
               ext: str = ".nii.gz") -> tuple[Path, Path]:
    """Write a small phantom's CT and mask; return their paths."""
    ct, mask, _ = make_phantom(SMALL_SHAPE, SMALL_SPACING, seed, side)
    folder.mkdir(parents=True, exist_ok=True)
    ct_path, mask_path = folder / f"{name}_ct{ext}", folder / f"{name}_mask{ext}"
    sitk.WriteImage(ct, str(ct_path))
    sitk.WriteImage(mask, str(mask_path))
    return ct_path, mask_path


@pytest.fixture
def knee(tmp_path: Path) -> tuple[Path, Path]:
    return write_knee(tmp_path / "in")
