"""Synthetic knee phantoms: deterministic, labelled, realistic enough to exercise the pipeline."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kneebatch.cli.main import main
from kneebatch.inputs.phantom import make_phantom


def test_sample_writes_a_deterministic_cohort_and_manifest(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["sample", str(tmp_path / name), "--subjects", "3", "--size", "small"]) == 0
    with (tmp_path / "a" / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["subject_id"] for r in rows] == ["knee001", "knee002", "knee003"]
    assert [r["side"] for r in rows] == ["R", "L", "R"]
    assert {"site", "age"} <= set(rows[0])
    for row in rows:
        for column in ("ct", "mask"):
            a = sitk.ReadImage(str(tmp_path / "a" / row[column]))
            b = sitk.ReadImage(str(tmp_path / "b" / row[column]))
            assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        ct = sitk.ReadImage(str(tmp_path / "a" / row["ct"]))
        mask = sitk.ReadImage(str(tmp_path / "a" / row["mask"]))
        assert ct.GetPixelID() == sitk.sitkInt16 and mask.GetPixelID() == sitk.sitkUInt8
        labels = sitk.GetArrayFromImage(mask)
        assert set(np.unique(labels)) == {0, 1, 2}


def test_phantom_tissues_and_scanner_padding() -> None:
    ct, mask, params = make_phantom((40, 64, 64), (1.2, 1.0, 1.0), seed=3)
    hu = sitk.GetArrayFromImage(ct)
    labels = sitk.GetArrayFromImage(mask)
    assert (hu == -3024).any(), "outside the field of view is scanner padding"
    bone = hu[labels > 0]
    assert np.median(bone) > 250 and bone.max() > 1200  # trabecular inside a cortical shell
    soft = hu[(labels == 0) & (hu > -300)]
    assert -150 < np.median(soft) < 150
    assert (hu[labels == 0] > 250).sum() > 0, "fibula and patella: bone outside the labels"
    assert params.side == "R"


def test_seeds_vary_the_knee() -> None:
    a = sitk.GetArrayFromImage(make_phantom((40, 64, 64), (1.2, 1.0, 1.0), seed=1)[1])
    b = sitk.GetArrayFromImage(make_phantom((40, 64, 64), (1.2, 1.0, 1.0), seed=2)[1])
    assert not np.array_equal(a, b)


def test_the_phantom_has_the_grid_it_was_asked_for() -> None:
    ct, mask, _ = make_phantom((40, 64, 48), (1.2, 0.8, 0.5), seed=0)
    for image in (ct, mask):
        assert image.GetSize() == (48, 64, 40)  # SimpleITK: (x, y, z)
        assert image.GetSpacing() == pytest.approx((0.5, 0.8, 1.2))
