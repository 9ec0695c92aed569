"""Report stage, per cohort: figures of the similarities, the cohort null and the failures, QC
thumbnails, and ``OUT/report/index.html`` (written by ``report_page``).

Everything reads the Parquet dataset; a 10,000-subject cohort renders in seconds (the heatmap is
drawn for cohorts up to ``HEATMAP_MAX`` subjects, where one row per subject is still legible).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kneebatch.config import PAIRS
from kneebatch.errors import ConfigError
from kneebatch.network.source import WeightsSource
from kneebatch.outdir.atomic import write_bytes_atomic, write_text_atomic
from kneebatch.outdir.folder import run_records
from kneebatch.outdir.records import RunRecord
from kneebatch.report.page import Figure, ReportContent, render
from kneebatch.schema import result_columns

HEATMAP_MAX = 500
MAX_GROUPS = 12
GALLERY_MAX = 1000  # QC thumbnails in the page; a larger cohort links the folder instead
GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939")
NULL_MAX_SUBJECTS = 300  # across-knee pairs grow as n^2: a seeded sample of this many knees


def _png(figure: object) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # type: ignore[attr-defined]
    return buffer.getvalue()


def _pair_names() -> list[str]:
    return [f"{a}-{b}" for a, b in PAIRS]


def mark_random(figure: object, weights: str) -> None:
    """A large "RANDOM WEIGHTS" mark across a figure made from random weights."""
    if WeightsSource.parse(weights).is_random:
        figure.text(0.5, 0.5, "RANDOM WEIGHTS", fontsize=44, color="#d9534f",  # type: ignore[attr-defined]
                    alpha=0.3, ha="center", va="center", rotation=15, weight="bold", zorder=10)


def _groups(sims: pd.DataFrame, by: str | None) -> list[tuple[str, pd.DataFrame]]:
    if by is None:
        return [("", sims)]
    if by not in sims.columns:
        raise ConfigError(f"report --by {by}: no such column in the similarities; the manifest's "
                          f"extra columns are: {', '.join(_extra_columns(sims)) or 'none'}.")
    keys = sims[by].astype("string").fillna("(missing)")
    groups = sorted(keys.unique())
    if len(groups) > MAX_GROUPS:
        raise ConfigError(f"report --by {by}: {len(groups)} groups; a figure shows at most "
                          f"{MAX_GROUPS}. Group by a column with fewer values.")
    return [(f"{by}={g}", sims[keys == g]) for g in groups]


def _extra_columns(sims: pd.DataFrame) -> list[str]:
    known = {*result_columns("similarities"), "pair"}
    return [c for c in sims.columns if c not in known]


def cosine_boxplot(sims: pd.DataFrame, by: str | None = None, weights: str = "") -> bytes:
    """``cosine_figure`` as PNG."""
    return _png(cosine_figure(sims, by, weights))


def cosine_figure(sims: pd.DataFrame, by: str | None = None, weights: str = "") -> Any:
    """Box plots of each pair's cosine, one panel per layer on one shared y-axis; with ``by``,
    one box per value of that manifest column."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = list(dict.fromkeys(sims["layer"]))
    groups = _groups(sims, by)
    figure = Figure(figsize=(min(4 + 1.2 * len(groups), 9) * len(layers) / 1.6 + 1, 4.8), dpi=90)
    axes = figure.subplots(1, len(layers), squeeze=False, sharey=True)[0]
    pairs = _pair_names()
    width = 0.8 / len(groups)
    for ax, layer in zip(axes, layers, strict=True):
        for g, (_, part) in enumerate(groups):
            part = part[part["layer"] == layer]
            data = [part.loc[part["pair"] == p, "cosine"].to_numpy() for p in pairs]
            positions = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(pairs))]
            boxes = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
                               showfliers=True, manage_ticks=False)
            for patch in boxes["boxes"]:
                patch.set_facecolor(GROUP_COLOURS[g] if by else "#9ecae1")
        ax.set_xticks(range(len(pairs)), [p.replace("-", "-\n") for p in pairs])
        ax.set_title(f"{layer} (n={sims.loc[sims['layer'] == layer, 'subject_id'].nunique()})")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("cosine similarity")
    if by:
        figure.legend(handles=[Patch(color=GROUP_COLOURS[g], label=f"{name} (n="
                                     f"{part['subject_id'].nunique()})")
                               for g, (name, part) in enumerate(groups)],
                      loc="upper right", fontsize=8)
    figure.tight_layout()
    mark_random(figure, weights)
    return figure


def heatmap(sims: pd.DataFrame, weights: str = "") -> bytes | None:
    """``heatmap_figure`` as PNG (None above ``HEATMAP_MAX`` subjects)."""
    figure = heatmap_figure(sims, weights)
    return None if figure is None else _png(figure)


def heatmap_figure(sims: pd.DataFrame, weights: str = "") -> Any:
    """Subject x pair heatmaps, one facet per layer, on one colour scale; None for cohorts above
    ``HEATMAP_MAX``. Subject labels are thinned so they stay legible (at least 8 pt apart)."""
    from matplotlib.figure import Figure

    table = sims.pivot_table(index="subject_id", columns=["layer", "pair"], values="cosine")
    if len(table) > HEATMAP_MAX:
        return None
    layers = list(dict.fromkeys(sims["layer"]))
    pairs = _pair_names()
    height_in = min(max(3.0 + 0.16 * len(table), 4.0), 18.0)
    figure = Figure(figsize=(3.0 * len(layers) + 2.5, height_in), dpi=80)
    axes = figure.subplots(1, len(layers), squeeze=False, sharey=True)[0]
    low, high = np.nanmin(table.to_numpy()), np.nanmax(table.to_numpy())
    row_pt = height_in * 72 * 0.75 / len(table)
    step = max(1, int(np.ceil(9 / row_pt)))
    for ax, layer in zip(axes, layers, strict=True):
        block = table[layer].reindex(columns=pairs)
        image = ax.imshow(block.to_numpy(), aspect="auto", cmap="viridis",
                          interpolation="nearest", vmin=low, vmax=high)
        ax.set_xticks(range(len(pairs)), [p.replace("-", "-\n") for p in pairs], fontsize=9)
        ax.set_title(layer, fontsize=10)
    rows = list(range(0, len(table), step))
    axes[0].set_yticks(rows, [table.index[i] for i in rows], fontsize=8)
    figure.colorbar(image, ax=list(axes), label="cosine similarity", shrink=0.8)
    mark_random(figure, weights)
    return figure


def across_knee_cosines(features: pd.DataFrame, layer: str, region: str,
                        max_subjects: int = NULL_MAX_SUBJECTS) -> np.ndarray:
    """Cosines of one region's vectors between every two knees (of a seeded sample of at most
    ``max_subjects`` knees) at ``layer``."""
    part = features[(features["layer"] == layer) & (features["region"] == region)]
    part = part.sort_values("subject_id")
    if len(part) > max_subjects:
        part = part.sample(max_subjects, random_state=0)
    if len(part) < 2:
        return np.empty(0)
    vectors = np.stack(part["vector"].to_numpy()).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors @ vectors.T)[np.triu_indices(len(vectors), k=1)]


def null_figure(sims: pd.DataFrame, features: pd.DataFrame, weights: str = "") -> bytes | None:
    """Per layer, on one y-axis: the cosines of different regions within a knee (the
    similarities) against those of the same region across knees (the cohort null). Similarities
    that separate anything sit clearly below the null; None with fewer than two knees."""
    from matplotlib.figure import Figure

    if features["subject_id"].nunique() < 2:
        return None
    layers = list(dict.fromkeys(sims["layer"]))
    regions = list(dict.fromkeys(features["region"]))
    figure = Figure(figsize=(4 * len(layers) + 1, 4.8), dpi=90)
    axes = figure.subplots(1, len(layers), squeeze=False, sharey=True)[0]
    pairs = _pair_names()
    for ax, layer in zip(axes, layers, strict=True):
        part = sims[sims["layer"] == layer]
        within = [part.loc[part["pair"] == p, "cosine"].to_numpy() for p in pairs]
        across = [across_knee_cosines(features, layer, r) for r in regions]
        boxes = ax.boxplot(within + across, patch_artist=True, showfliers=False,
                           tick_labels=[p.replace("-", "-\n") for p in pairs] + regions)
        for i, patch in enumerate(boxes["boxes"]):
            patch.set_facecolor("#f0ad4e" if i < len(pairs) else "#5bc0de")
        ax.tick_params(axis="x", labelrotation=90)
        ax.set_title(layer)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("cosine similarity")
    figure.suptitle("orange: other region, same knee   |   blue: same region, other knee (null)")
    figure.tight_layout()
    mark_random(figure, weights)
    return _png(figure)


def failures_by_stage(failures: pd.DataFrame) -> bytes | None:
    """Bar chart of failed subjects per stage (whole-number ticks); None when nothing failed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if failures.empty:
        return None
    figure = Figure(figsize=(6, 3.5), dpi=90)
    ax = figure.subplots()
    counts = failures["stage"].astype(str).value_counts()
    ax.bar(counts.index, counts.to_numpy(), color="#d9534f")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("failed subjects")
    ax.set_title(f"Failures by stage ({len(failures)} in all)")
    figure.tight_layout()
    return _png(figure)


def qc_gallery(out: Path, subjects: list[str], limit: int = GALLERY_MAX) -> list[tuple[str, str, str]]:
    """Thumbnails of the subjects' ``qc.png`` in ``OUT/report/qc/`` (made when missing or older
    than the picture): (subject, thumbnail, picture) paths relative to ``OUT/report``."""
    from PIL import Image

    folder = out / "report" / "qc"
    gallery = []
    for subject in subjects[:limit]:
        picture = out / "subjects" / subject / "qc.png"
        if not picture.is_file():
            continue
        thumb = folder / f"{subject}.png"
        if not thumb.is_file() or thumb.stat().st_mtime < picture.stat().st_mtime:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{subject}.tmp.png"
            with Image.open(picture) as image:
                image.thumbnail((image.width // 4, image.height // 4))
                image.save(tmp)
            tmp.replace(thumb)
        gallery.append((subject, f"qc/{subject}.png", f"../subjects/{subject}/qc.png"))
    return gallery


def computing_runs(out: Path, run_ids: list[str]) -> list[RunRecord]:
    """The records of the runs that computed the results in the Parquet (not a later rerun that
    only skipped them), oldest first; ``extract`` results have none."""
    wanted = set(run_ids)
    return [r for r in run_records(out) if r.run_id in wanted]


def write_cohort_report(out: Path, by: str | None = None) -> Path:
    """Write ``OUT/report/`` (PNG figures, QC thumbnails and ``index.html``).

    Args:
        out: a run's output folder.
        by: a manifest column: the cosine figure shows one box per value.

    Returns:
        The path of ``index.html``.

    Raises:
        ConfigError: ``by`` is not a column, or has too many values.
    """
    import matplotlib  # a plotting backend is chosen only when a report is drawn

    matplotlib.use("Agg")
    folder = out / "report"
    folder.mkdir(exist_ok=True)
    sims = pd.read_parquet(out / "similarities")
    sims["pair"] = sims["region_a"] + "-" + sims["region_b"]
    failures_csv = out / "failures.csv"
    failures = pd.read_csv(failures_csv) if failures_csv.is_file() else pd.DataFrame(
        columns=["subject_id", "error", "stage"])
    features = (pd.read_parquet(out / "features", columns=["subject_id", "region", "layer",
                                                            "vector"])
                if (out / "features").is_dir() else pd.DataFrame(columns=["subject_id"]))
    record = RunRecord.read(out / "run.json") or RunRecord(run_id="", started="")
    weights = ", ".join(sorted(sims["weights"].unique())) if "weights" in sims else record.weights
    figures = [
        Figure("cosine_by_layer.png", "Cosine similarity by layer",
               "One y-axis for every layer" + (f"; one box per {by}" if by else "") + ".",
               cosine_boxplot(sims, by, weights) if len(sims) else None),
        Figure("null.png", "Do the similarities separate anything?",
               "Cosine of different regions within a knee against the same region across knees "
               "(the cohort null). Where the two overlap, the similarities carry little beyond "
               "what every knee shares.",
               null_figure(sims, features, weights) if len(sims) else None),
        Figure("heatmap.png", "Per subject",
               "" if len(sims) and sims["subject_id"].nunique() <= HEATMAP_MAX else
               f"More than {HEATMAP_MAX} subjects: no heatmap; query the Parquet instead.",
               heatmap(sims, weights) if len(sims) else None),
        Figure("failures_by_stage.png", "Failures", "" if len(failures) else
               "No subject failed.", failures_by_stage(failures)),
    ]
    for figure in figures:
        if figure.png is not None:
            write_bytes_atomic(folder / figure.name, figure.png)
    subjects = sorted(sims["subject_id"].unique())
    content = ReportContent(
        out=out, weights=weights, subjects=len(subjects), failures=failures, figures=figures,
        gallery=qc_gallery(out, subjects), gallery_limit=GALLERY_MAX,
        runs=computing_runs(out, sorted(sims["run_id"].unique()) if "run_id" in sims else []),
        latest=record)
    index = folder / "index.html"
    write_text_atomic(index, render(content))
    return index
