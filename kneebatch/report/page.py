"""Report stage, the page: ``OUT/report/index.html``, a report a person opens in a browser.

Figures are embedded (the page can be mailed on its own); the QC gallery links thumbnails in
``report/qc/`` to each subject's ``qc.png``. Provenance is that of the runs that computed the
results, not of the last rerun (which may have skipped them all). Nothing here reads files.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path

import pandas as pd

from kneebatch.citation import citation
from kneebatch.outdir.records import RunRecord

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;
     color:#222;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
img{max-width:100%;height:auto}
table{border-collapse:collapse;width:100%;table-layout:fixed;margin:.5em 0}
th,td{text-align:left;padding:3px 8px;vertical-align:top;overflow-wrap:anywhere}
th{width:14em;font-weight:600} tr:nth-child(even){background:#f5f5f5}
table.failures th{width:auto}
.banner{background:#d9534f;color:#fff;padding:.6em 1em;font-weight:700;border-radius:4px}
.summary{font-size:1.1em}
.gallery{display:flex;flex-wrap:wrap;gap:8px}
.gallery figure{margin:0;width:200px} .gallery img{width:200px;border:1px solid #ccc}
.gallery figcaption{font-size:.85em;overflow-wrap:anywhere}
code{overflow-wrap:anywhere}
"""


@dataclasses.dataclass(frozen=True)
class Figure:
    """One figure of the page: its file name, heading, a sentence, and the PNG (None: text only)."""

    name: str
    heading: str
    text: str
    png: bytes | None


@dataclasses.dataclass(frozen=True)
class ReportContent:
    """Everything the page shows."""

    out: Path
    weights: str
    subjects: int
    failures: pd.DataFrame
    figures: list[Figure]
    gallery: list[tuple[str, str, str]]
    gallery_limit: int
    runs: list[RunRecord]
    latest: RunRecord


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _table(rows: dict[str, object]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
                               for k, v in rows.items()) + "</table>"


def _value(value: object) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _run(record: RunRecord) -> dict[str, object]:
    rows: dict[str, object] = {
        "run": record.run_id, "started": record.started, "ended": record.ended or "(running)",
        "computed": ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(record.counts).items())
        if record.counts else "-",
        "command": " ".join(record.command) or "-", "host": record.host or "-"}
    if record.manifest:
        rows["manifest"] = f"{record.manifest} (sha256 {str(record.manifest_sha256)[:16]}...)"
    if record.shard:
        rows["shard"] = record.shard
    if record.slurm:
        rows["SLURM"] = ", ".join(f"{k}={v}" for k, v in record.slurm.items())
    return rows


def _provenance(content: ReportContent) -> list[str]:
    latest = content.latest
    parts = ["<h2>Provenance</h2>",
             _table({"weights": content.weights or latest.weights,
                     "model sha256": latest.model_sha256 or "-",
                     "settings hash": latest.config_hash or "-",
                     "label map": latest.labels or "-",
                     "versions": ", ".join(f"{k} {v}" for k, v in latest.versions.items()) or "-",
                     "output folder": content.out.resolve()})]
    if latest.sources:
        parts.append("<p>Merged from these run folders:</p>" +
                     _table({str(i + 1): s for i, s in enumerate(latest.sources)}))
    if content.runs:
        parts.append(f"<h3>The run{'s' if len(content.runs) > 1 else ''} that computed these "
                     "results</h3>")
        parts += [_table(_run(r)) for r in content.runs]
    if latest.run_id and latest.run_id not in {r.run_id for r in content.runs}:
        parts.append("<h3>The latest run (it computed none of the results shown)</h3>" +
                     _table(_run(latest)))
    if latest.config:
        parts.append("<h3>Extraction settings</h3>" +
                     _table({k: _value(v) for k, v in sorted(latest.config.items())}))
    return parts


def _gallery(content: ReportContent) -> list[str]:
    parts = ["<h2>QC pictures</h2>"]
    if not content.gallery:
        parts.append("<p>No QC pictures yet: <code>kneebatch report OUT</code> draws them (or "
                     "run with <code>--qc</code>).</p>")
        return parts
    parts.append("<p>What the network was fed, per knee (left knees mirrored to look right). "
                 "Click a picture for full size.</p><div class='gallery'>")
    parts += [f"<figure><a href='{_e(link)}'><img src='{_e(thumb)}' alt='QC {_e(subject)}'>"
              f"</a><figcaption>{_e(subject)}</figcaption></figure>"
              for subject, thumb, link in content.gallery]
    parts.append("</div>")
    if content.subjects > content.gallery_limit:
        parts.append(f"<p>The first {content.gallery_limit} of {content.subjects} subjects; "
                     "every picture is in <code>subjects/&lt;id&gt;/qc.png</code>.</p>")
    return parts


def _img(figure: Figure) -> str:
    encoded = base64.b64encode(figure.png or b"").decode()
    return f"<img alt='{_e(figure.heading)}' src='data:image/png;base64,{encoded}'>"


def render(content: ReportContent) -> str:
    """The page's HTML."""
    failed = len(content.failures)
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>kneebatch report: {_e(content.out.name)}</title><style>{STYLE}</style>",
             "</head><body>", f"<h1>kneebatch report: {_e(content.out.name)}</h1>"]
    if "random" in content.weights:
        parts.append("<p class='banner'>RANDOM WEIGHTS: these features come from seeded random "
                     "weights, for testing only. Build the model with ImageNet weights for real "
                     "features.</p>")
    parts.append(f"<p class='summary'>{content.subjects} subject(s) in the results, {failed} "
                 f"failed{'' if failed else ' (none)'}; weights <code>{_e(content.weights)}"
                 "</code>.</p>")
    for figure in content.figures:
        parts.append(f"<h2>{_e(figure.heading)}</h2>")
        if figure.text:
            parts.append(f"<p>{_e(figure.text)}</p>")
        if figure.png is not None:
            parts.append(_img(figure))
    if failed:
        columns = [c for c in ("subject_id", "stage", "error") if c in content.failures.columns]
        parts.append(content.failures.to_html(index=False, columns=columns, border=0,
                                              escape=True, classes="failures"))
    parts += _gallery(content)
    parts += _provenance(content)
    parts.append(f"<h2>How to cite</h2><p class='cite'>{_e(citation())}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
