"""Pictures: per-subject QC and cohort figures (matplotlib, headless)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg

from kneebatch.cli import main
from kneebatch.cohort_report import HEATMAP_MAX, across_knee_cosines, heatmap, write_cohort_report
from kneebatch.config import ExtractionConfig
from kneebatch.io import load_scan
from kneebatch.manifest import SubjectSpec
from kneebatch.phantom import write_sample
from kneebatch.regions import make_regions
from kneebatch.report import qc_panels


def _looks_like_a_picture(path: Path, min_w: int, min_h: int) -> None:
    pixels = mpimg.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_w and height >= min_h, (width, height)
    assert pixels[..., :3].std() > 0.05, "blank picture"


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("report")
    manifest = write_sample(folder / "c", 3, size="small")
    with manifest.open("a") as fh:
        fh.write("broken,gone.nii.gz,knee001_mask.nii.gz,R,A,50\n")
    out = folder / "out"
    assert main(["run", str(manifest), "--out", str(out), "--model", str(model_path),
                 "--workers", "1", "--qc"]) == 1
    (out / "subjects" / "knee003" / "qc.png").unlink()  # `report` draws the missing one
    assert main(["report", str(out)]) == 0
    return out


@pytest.mark.parametrize("subject", ["knee001", "knee002", "knee003"])
def test_every_finished_subject_has_a_qc_picture(reported: Path, subject: str) -> None:
    _looks_like_a_picture(reported / "subjects" / subject / "qc.png", 900, 350)


def test_cohort_figures_and_a_self_contained_page(reported: Path) -> None:
    folder = reported / "report"
    _looks_like_a_picture(folder / "cosine_by_layer.png", 900, 300)
    _looks_like_a_picture(folder / "heatmap.png", 500, 200)
    _looks_like_a_picture(folder / "failures_by_stage.png", 400, 250)
    _looks_like_a_picture(folder / "null.png", 900, 300)
    page = (folder / "index.html").read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', page)
    assert "the cohort null" in page
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "random:seed=0" in page and "RANDOM weights" in page
    assert "broken" in page and "gone.nii.gz: does not exist" in page


def test_left_knee_picture_is_the_mirror_of_the_same_knee_marked_right(tmp_path: Path) -> None:
    manifest = write_sample(tmp_path, 1, size="small")
    ct, mask = manifest.parent / "knee001_ct.nii.gz", manifest.parent / "knee001_mask.nii.gz"
    config = ExtractionConfig()
    panels = {side: qc_panels(make_regions(load_scan(SubjectSpec("k", ct, mask, side), config),
                                           config))
              for side in ("L", "R")}
    np.testing.assert_array_equal(panels["L"]["axial"], panels["R"]["axial"][:, ::-1])
    np.testing.assert_array_equal(panels["L"]["coronal"], panels["R"]["coronal"][:, ::-1])
    np.testing.assert_array_equal(panels["L"]["sagittal"], panels["R"]["sagittal"])
    assert not np.array_equal(panels["L"]["axial"], panels["R"]["axial"])


def _synthetic(subjects: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [(f"s{i:05d}", layer, a, b, float(rng.uniform(0.8, 1.0)))
            for i in range(subjects) for layer in ("denseblock2", "denseblock3", "denseblock4")
            for a, b in (("tibia", "femur"), ("tibia", "background"), ("femur", "background"))]
    sims = pd.DataFrame(rows, columns=["subject_id", "layer", "region_a", "region_b", "cosine"])
    sims["pair"] = sims["region_a"] + "-" + sims["region_b"]
    return sims


def test_across_knee_cosines_by_hand() -> None:
    features = pd.DataFrame({
        "subject_id": ["a", "b", "c", "a"], "layer": ["denseblock2"] * 4,
        "region": ["tibia", "tibia", "tibia", "femur"],
        "vector": [np.array([1.0, 0.0]), np.array([0.0, 2.0]), np.array([3.0, 3.0]),
                   np.array([5.0, 5.0])]})
    got = across_knee_cosines(features, "denseblock2", "tibia")
    np.testing.assert_allclose(sorted(got), [0.0, 2 ** -0.5, 2 ** -0.5])  # a-b, a-c, b-c
    assert len(across_knee_cosines(features, "denseblock2", "tibia", max_subjects=2)) == 1
    assert len(across_knee_cosines(features, "denseblock2", "femur")) == 0


def test_no_heatmap_above_the_legible_limit() -> None:
    assert heatmap(_synthetic(HEATMAP_MAX + 1)) is None
    assert heatmap(_synthetic(20)) is not None


@pytest.mark.slow
def test_a_10000_subject_cohort_renders(tmp_path: Path) -> None:
    (tmp_path / "similarities").mkdir()
    _synthetic(10_000).drop(columns="pair").to_parquet(tmp_path / "similarities" / "p.parquet")
    index = write_cohort_report(tmp_path)
    assert "no heatmap" in index.read_text(encoding="utf-8")
    _looks_like_a_picture(tmp_path / "report" / "cosine_by_layer.png", 900, 300)
