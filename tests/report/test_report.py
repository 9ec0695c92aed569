"""Pictures: per-subject QC and cohort figures (matplotlib, headless)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg

from kneebatch.cli.main import main
from kneebatch.config import ExtractionConfig
from kneebatch.errors import ConfigError
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.inputs.phantom import write_sample
from kneebatch.report.figures import (
    HEATMAP_MAX,
    across_knee_cosines,
    cosine_figure,
    failures_by_stage,
    heatmap,
    heatmap_figure,
    write_cohort_report,
)
from kneebatch.report.qc_picture import _centre, qc_panels
from kneebatch.scan.read import Scan, load_scan
from kneebatch.scan.regions import make_regions


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


def test_cohort_figures_and_a_page_with_a_qc_gallery(reported: Path) -> None:
    folder = reported / "report"
    _looks_like_a_picture(folder / "cosine_by_layer.png", 900, 300)
    _looks_like_a_picture(folder / "heatmap.png", 500, 200)
    _looks_like_a_picture(folder / "failures_by_stage.png", 400, 250)
    _looks_like_a_picture(folder / "null.png", 900, 300)
    page = (folder / "index.html").read_text(encoding="utf-8")
    sources = re.findall(r"src='([^']*)'", page)
    embedded = [s for s in sources if s.startswith("data:image/png;base64,")]
    assert "the cohort null" in page and len(embedded) == 4
    assert sorted(s for s in sources if not s.startswith("data:")) == [
        f"qc/knee00{i}.png" for i in (1, 2, 3)]
    for i in (1, 2, 3):
        assert f"href='../subjects/knee00{i}/qc.png'" in page
        _looks_like_a_picture(folder / "qc" / f"knee00{i}.png", 200, 80)
    assert "random:seed=0" in page and "RANDOM WEIGHTS" in page
    assert "How to cite" in page and "CITATION.cff" in page
    assert "broken" in page and "gone.nii.gz: does not exist" in page
    assert "manifest None" not in page and "<th>spacing_mm</th><td>1.0</td>" in page


def test_provenance_is_of_the_run_that_computed_the_results(
        reported: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    computed = json.loads((reported / "run.json").read_text())["run_id"]
    manifest = json.loads((reported / "run.json").read_text())["manifest"]
    assert main(["run", manifest, "--out", str(reported), "--model", str(model_path),
                 "--workers", "1"]) == 1  # a rerun: every subject skipped, the broken one fails
    rerun = json.loads((reported / "run.json").read_text())["run_id"]
    assert rerun != computed
    assert main(["report", str(reported), "--no-qc"]) == 0
    page = (reported / "report" / "index.html").read_text(encoding="utf-8")
    computing = page.split("that computed these results", 1)[1].split("<h3>", 1)[0]
    assert computed in computing and rerun not in computing
    assert "The latest run (it computed none of the results shown)" in page and rerun in page


def test_figures_share_the_y_axis_carry_the_random_mark_and_group_by_a_column() -> None:
    sims = _synthetic(30)
    sims["site"] = ["A" if i % 3 else "B" for i in range(len(sims) // 9) for _ in range(9)]
    figure = cosine_figure(sims, by="site", weights="random:seed=0")
    axes = [ax for ax in figure.axes if ax.get_title()]
    assert len(axes) == 3 and len({ax.get_ylim() for ax in axes}) == 1
    texts = [t.get_text() for t in figure.texts]
    assert "RANDOM WEIGHTS" in texts
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["site=A (n=20)", "site=B (n=10)"]
    assert "RANDOM WEIGHTS" not in [t.get_text() for t in cosine_figure(sims).texts]
    with pytest.raises(ConfigError, match="no such column"):
        cosine_figure(sims, by="scanner")


def test_heatmap_stays_legible_at_400_subjects() -> None:
    figure = heatmap_figure(_synthetic(400))
    width, height = figure.get_size_inches() * figure.dpi
    assert width <= 1200 and height <= 1500
    facets = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in facets] == ["denseblock2", "denseblock3", "denseblock4"]
    assert [t.get_text() for t in facets[0].get_xticklabels()] == [
        "tibia-\nfemur", "tibia-\nbackground", "femur-\nbackground"]
    labels = facets[0].get_yticklabels()
    assert min(label.get_fontsize() for label in labels) >= 8
    assert 10 <= len(labels) < 400  # thinned, but every few subjects named


def test_no_failures_is_said_in_words() -> None:
    assert failures_by_stage(pd.DataFrame(columns=["subject_id", "stage", "error"])) is None


def test_qc_slices_pass_through_both_bones(tmp_path: Path) -> None:
    manifest = write_sample(tmp_path, 1, size="small")
    ct, mask = manifest.parent / "knee001_ct.nii.gz", manifest.parent / "knee001_mask.nii.gz"
    config = ExtractionConfig()
    regions = make_regions(load_scan(SubjectSpec("k", ct, mask, "R"), config), config)
    z, y, x = _centre(regions.grid_mask)
    for cut in (regions.grid_mask[:, :, x], regions.grid_mask[:, y, :]):
        assert (cut == 1).any() and (cut == 2).any()
    tibia_top = np.argwhere(regions.grid_mask == 1)[:, 0].max()
    femur_bottom = np.argwhere(regions.grid_mask == 2)[:, 0].min()
    assert abs(z - (tibia_top + femur_bottom) / 2) <= 15  # near the joint ...
    assert (regions.grid_mask[z] > 0).sum() > 0.05 * regions.grid_mask[z].size  # ... through bone


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("chromium is required under CI=true (.ci/run installs Debian's chromium)")
    return found


CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const width = document.documentElement.clientWidth;
  const result = {
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    overflow: document.documentElement.scrollWidth - width,
    wide: [...document.querySelectorAll('body *')]
      .filter(e => e.getBoundingClientRect().right > width + 1).map(e => e.tagName).slice(0, 5)};
  const out = document.createElement('pre');
  out.id = 'check';
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script></body>"""


@pytest.mark.slow
@pytest.mark.parametrize("width", [1280, 800], ids=["desktop", "narrow"])
def test_the_page_renders_in_a_browser(reported: Path, width: int) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = reported / "report" / "index.html"
    check = page.with_name("_check.html")
    check.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK), encoding="utf-8")
    try:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                              "--allow-file-access-from-files", f"--window-size={width},900",
                              "--virtual-time-budget=15000", "--dump-dom", check.as_uri()],
                             capture_output=True, text=True, timeout=180).stdout
    finally:
        check.unlink()
    found = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["images"] == 4 + 3 and result["broken"] == []
    assert result["overflow"] <= 0 and result["wide"] == []


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


def test_qc_fills_the_regions_the_network_is_fed() -> None:
    from kneebatch.report.qc_picture import COLOURS

    ct, mask = np.full((30, 40, 40), -1000.0), np.zeros((30, 40, 40))
    y, x = np.mgrid[:40, :40]
    ct[:, (y - 17.5) ** 2 / 13**2 + (x - 20) ** 2 / 16**2 <= 1] = 40.0  # a round leg
    ct[:, 31:34, 2:38] = 150.0  # a couch plate touching the back of the leg
    ct[4:14, 10:25, 12:28], mask[4:14, 10:25, 12:28] = 700.0, 1
    ct[16:26, 10:25, 12:28], mask[16:26, 10:25, 12:28] = 900.0, 2
    scan = Scan("k", ct.astype(np.float32), mask.astype(np.uint8), (1.0, 1.0, 1.0), "R", "LPS")
    regions = make_regions(scan, ExtractionConfig(margin_mm=0.0, min_size=1))
    axial = qc_panels(regions)["axial"]
    grey = np.clip((40.0 + 400) / 1800, 0, 1)
    tissue, plate = axial[17, 7], axial[32, 6]  # (y, x) on the axial slice through the bone
    assert tissue == pytest.approx(0.7 * grey + 0.3 * np.array(COLOURS["background"]))
    assert plate[0] == plate[1] == plate[2]  # grey: the couch is not fed to the network
