"""One knee in memory: how the forward passes of its three regions share the process's memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kneebatch
from kneebatch.extract import pipeline
from kneebatch.runtime import memory_releases


def test_heap_kept_between_small_regions_and_trimmed_before_large_ones(
        knee: tuple[Path, Path], model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 mm regions: the next forward reuses the pages of the one before (no trim, no faults)
    before = memory_releases()
    kept = kneebatch.extract_subject(knee[0], knee[1], model_path, subject_id="k1", side="R")
    assert memory_releases() == before
    # regions at least RELEASE_FROM_VOXELS large (native resolution): trimmed before each
    monkeypatch.setattr(pipeline, "RELEASE_FROM_VOXELS", 1)
    trimmed = kneebatch.extract_subject(knee[0], knee[1], model_path, subject_id="k1", side="R")
    assert memory_releases() == before + 3
    for region, layers in kept.vectors.items():
        for layer, vector in layers.items():
            np.testing.assert_array_equal(trimmed.vectors[region][layer], vector)
