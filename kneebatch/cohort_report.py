"""Report stage, per cohort: figures of the similarities, the cohort null and the failures, and one
self-contained ``OUT/report/index.html`` with the run's provenance and the failure list.

Everything reads the Parquet dataset; a 10,000-subject cohort renders in seconds (the heatmap is
drawn for cohorts up to ``HEATMAP_MAX`` subjects, where one row per subject is still legible).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kneebatch.config import PAIRS
from kneebatch.records import RunRecord
from kneebatch.store import write_bytes_atomic, write_text_atomic

HEATMAP_MAX = 500
NULL_MAX_SUBJECTS = 300  # across-knee pairs grow as n^2: a seeded sample of this many knees


def _png(figure: object) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # type: ignore[attr-defined]
    return buffer.getvalue()


def _pair_names() -> list[str]:
    return [f"{a}-{b}" for a, b in PAIRS]


def cosine_boxplot(sims: pd.DataFrame) -> bytes:
    """Box plots of each pair's cosine, one panel per layer."""
    from matplotlib.figure import Figure

    layers = list(dict.fromkeys(sims["layer"]))
    figure = Figure(figsize=(4 * len(layers) + 1, 4.5), dpi=90)
    axes = figure.subplots(1, len(layers), squeeze=False)[0]
    pairs = _pair_names()
    for ax, layer in zip(axes, layers, strict=True):
        part = sims[sims["layer"] == layer]
        data = [part.loc[part["pair"] == p, "cosine"].to_numpy() for p in pairs]
        ax.boxplot(data, tick_labels=[p.replace("-", "-\n") for p in pairs], showfliers=True)
        ax.set_title(f"{layer} (n={part['subject_id'].nunique()})")
        ax.set_ylabel("cosine similarity")
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def heatmap(sims: pd.DataFrame) -> bytes | None:
    """Subject x (pair, layer) heatmap, or None for cohorts above ``HEATMAP_MAX``."""
    from matplotlib.figure import Figure

    table = sims.pivot_table(index="subject_id", columns=["layer", "pair"], values="cosine")
    if len(table) > HEATMAP_MAX:
        return None
    figure = Figure(figsize=(10, min(2 + 0.18 * len(table), 60)), dpi=80)
    ax = figure.subplots()
    image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(table.shape[1]), [f"{layer}\n{pair}" for layer, pair in table.columns],
                  rotation=90, fontsize=7)
    ax.set_yticks(range(len(table)), table.index, fontsize=6 if len(table) > 40 else 8)
    figure.colorbar(image, ax=ax, label="cosine similarity")
    figure.tight_layout()
    return _png(figure)


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


def null_figure(sims: pd.DataFrame, features: pd.DataFrame) -> bytes | None:
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
    return _png(figure)


def failures_by_stage(failures: pd.DataFrame) -> bytes:
    """Bar chart of failed subjects per stage."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=90)
    ax = figure.subplots()
    counts = failures["stage"].value_counts() if len(failures) else pd.Series(dtype=int)
    ax.bar(counts.index.astype(str), counts.to_numpy(), color="#d9534f")
    ax.set_ylabel("failed subjects")
    ax.set_title(f"Failures by stage ({len(failures)} in all)")
    figure.tight_layout()
    return _png(figure)


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def write_cohort_report(out: Path) -> Path:
    """Write ``OUT/report/`` (PNG figures and a self-contained ``index.html``).

    Returns:
        The path of ``index.html``.
    """
    import matplotlib

    matplotlib.use("Agg")
    folder = out / "report"
    folder.mkdir(exist_ok=True)
    sims = pd.read_parquet(out / "similarities",
                           columns=["subject_id", "layer", "region_a", "region_b", "cosine"])
    sims["pair"] = sims["region_a"] + "-" + sims["region_b"]
    failures_csv = out / "failures.csv"
    failures = pd.read_csv(failures_csv) if failures_csv.is_file() else pd.DataFrame(
        columns=["subject_id", "error", "stage"])
    features = (pd.read_parquet(out / "features", columns=["subject_id", "region", "layer",
                                                            "vector"])
                if (out / "features").is_dir() else pd.DataFrame(columns=["subject_id"]))
    figures = {"cosine_by_layer.png": cosine_boxplot(sims) if len(sims) else None,
               "null.png": null_figure(sims, features) if len(sims) else None,
               "heatmap.png": heatmap(sims) if len(sims) else None,
               "failures_by_stage.png": failures_by_stage(failures)}
    for name, data in figures.items():
        if data is not None:
            write_bytes_atomic(folder / name, data)
    record = RunRecord.read(out / "run.json") or RunRecord(run_id="", started="")
    provenance = {"run_id": record.run_id, "weights": record.weights,
                  "model_sha256": record.model_sha256, "config_hash": record.config_hash,
                  "started": record.started, "ended": record.ended, "manifest": record.manifest,
                  "subjects in Parquet": sims["subject_id"].nunique(), "failed": len(failures),
                  "settings": json.dumps(record.config)}
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in provenance.items())
    heat = figures["heatmap.png"]
    body = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kneebatch report</title>",
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}img{max-width:100%}"
        "td,th{text-align:left;padding:2px 8px;vertical-align:top}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}</style>",
        "</head><body><h1>kneebatch report</h1>",
        f"<h2>Run</h2><table>{rows}</table>",
    ]
    if record.weights.startswith("random"):
        body.append("<p><b>These features come from RANDOM weights: for testing only.</b></p>")
    boxes, bars = figures["cosine_by_layer.png"], figures["failures_by_stage.png"]
    if boxes:
        body.append("<h2>Cosine similarity by layer</h2>" + _img(boxes, "cosine by layer"))
    if figures["null.png"]:
        body.append("<h2>Do the similarities separate anything?</h2><p>Cosine of different "
                    "regions within a knee against the same region across knees (the cohort "
                    "null). Where the two overlap, the similarities carry little beyond what "
                    "every knee shares.</p>" + _img(figures["null.png"], "cohort null"))
    body.append("<h2>Per subject</h2>" + (_img(heat, "heatmap") if heat else
                f"<p>{sims['subject_id'].nunique()} subjects: more than {HEATMAP_MAX}, no heatmap; "
                "query the Parquet instead.</p>"))
    body.append("<h2>Failures</h2>" + (_img(bars, "failures") if bars else ""))
    body.append(failures.to_html(index=False, columns=[c for c in ("subject_id", "stage", "error")
                                                        if c in failures.columns],
                                 border=0, escape=True))
    body.append("</body></html>")
    index = folder / "index.html"
    write_text_atomic(index, "\n".join(body))
    return index
