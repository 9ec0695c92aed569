"""Report stage, per subject: a QC picture of what the network was fed.

Axial, coronal and sagittal slices through the knee on the resampled grid, after reorientation and
mirroring, CT in a bone window, the three regions as the network is fed them filled in translucent
colours (tibia, femur, and the background: label 0 inside the body, so a couch left in it shows),
the three crop boxes drawn. A left knee therefore looks like a right knee, and a wrong side or
swapped labels show at a glance.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kneebatch.config import REGIONS
from kneebatch.inputs.labels import FEMUR, TIBIA
from kneebatch.outdir.atomic import write_bytes_atomic
from kneebatch.scan.regions import Regions

BONE_WINDOW_HU = (-400.0, 1400.0)
TINT = {"tibia": 0.45, "femur": 0.45, "background": 0.3}  # colour weight of each region's fill
COLOURS = {"tibia": (0.12, 0.47, 0.96), "femur": (1.0, 0.55, 0.0), "background": (0.2, 0.8, 0.3)}
VIEWS = ("axial", "coronal", "sagittal")
JOINT_SLICES = 15  # the axial view is at most this many slices from the joint line


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Where the three views cut (z, y, x), so that each passes through bone (not through the
    volume's centre): the coronal and sagittal views through the middle of the two bones' centres
    of mass, the axial view through the slice with the most bone within ``JOINT_SLICES`` of the
    joint line (the tibial plateau or the condyles, not the joint space)."""
    centres, ends = [], []
    for label in (TIBIA, FEMUR):
        points = np.argwhere(mask == label)
        if len(points):
            centres.append(points.mean(axis=0))
            ends.append(points[:, 0].max() if label == TIBIA else points[:, 0].min())
    if not centres:
        return (mask.shape[0] // 2, mask.shape[1] // 2, mask.shape[2] // 2)
    middle = np.mean(centres, axis=0)
    joint = round(float((ends[0] + ends[1]) / 2 if len(ends) == 2 else middle[0]))
    low, high = max(0, joint - JOINT_SLICES), min(mask.shape[0], joint + JOINT_SLICES + 1)
    bone = np.count_nonzero((mask[low:high] == TIBIA) | (mask[low:high] == FEMUR), axis=(1, 2))
    return (low + int(np.argmax(bone)), round(float(middle[1])), round(float(middle[2])))


def _slices(volume: np.ndarray, centre: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Display orientation: axial (y down, x right), coronal and sagittal with superior up."""
    z, y, x = centre
    return {"axial": volume[z], "coronal": volume[::-1, y, :], "sagittal": volume[::-1, :, x]}


def qc_panels(regions: Regions) -> dict[str, np.ndarray]:
    """RGB images (float, 0-1) of the three views, each region's voxels filled in its colour
    (no boxes, no text)."""
    low, high = BONE_WINDOW_HU
    gray = np.clip((regions.grid_hu - low) / (high - low), 0, 1)
    centre = _centre(regions.grid_mask)
    fills = {name: _slices(regions.members(name), centre) for name in REGIONS}
    panels = {}
    for view, image in _slices(gray, centre).items():
        rgb = np.repeat(image[..., None], 3, axis=2)
        for name in REGIONS:
            hit = fills[name][view]
            rgb[hit] = (1 - TINT[name]) * rgb[hit] + TINT[name] * np.array(COLOURS[name])
        panels[view] = rgb
    return panels


def _box_rectangles(regions: Regions, view: str) -> dict[str, tuple[float, float, float, float]]:
    """Crop boxes in a view's pixel coordinates: (left, top, width, height)."""
    depth = regions.grid_shape[0]
    rects: dict[str, tuple[float, float, float, float]] = {}
    for name, ((z0, z1), (y0, y1), (x0, x1)) in regions.boxes.items():
        if view == "axial":
            rects[name] = (x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0)
        elif view == "coronal":
            rects[name] = (x0 - 0.5, depth - z1 - 0.5, x1 - x0, z1 - z0)
        else:
            rects[name] = (y0 - 0.5, depth - z1 - 0.5, y1 - y0, z1 - z0)
    return rects


def render_qc(regions: Regions, title: str) -> bytes:
    """The QC picture as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    panels = qc_panels(regions)
    dz, dy, dx = regions.spacing_mm
    aspects = {"axial": dy / dx, "coronal": dz / dx, "sagittal": dz / dy}
    figure = Figure(figsize=(13, 5), dpi=90)
    axes = figure.subplots(1, 3)
    for ax, view in zip(axes, VIEWS, strict=True):
        ax.imshow(panels[view], aspect=aspects[view], interpolation="nearest")
        for name, (left, top, width, height) in _box_rectangles(regions, view).items():
            ax.add_patch(Rectangle((left, top), width, height, fill=False, lw=1.2,
                                   ls="--" if name == "background" else "-",
                                   edgecolor=COLOURS[name]))
        side_note = {"axial": "patient's right on the left", "coronal": "superior up, right on "
                     "the left", "sagittal": "superior up, anterior on the left"}[view]
        ax.set_title(f"{view} ({side_note})", fontsize=9)
        ax.set_axis_off()
    figure.legend(handles=[Patch(color=c, label=n) for n, c in COLOURS.items()],
                  loc="lower center", ncol=3, fontsize=9, frameon=False)
    figure.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def qc_title(subject_id: str, side: str | None, spacing_mm: tuple[float, ...], weights: str) -> str:
    """``knee001 - side L (mirrored) - 1.00 x 1.00 x 1.00 mm (z, y, x) - weights ...``."""
    side_text = {"L": "L (mirrored to look right)", "R": "R"}.get(side or "", "unknown")
    spacing = " x ".join(f"{s:.2f}" for s in spacing_mm)
    return f"{subject_id} - side {side_text} - {spacing} mm (z, y, x) - weights {weights}"


def write_qc(folder: Path, regions: Regions, title: str) -> Path:
    """Write ``folder/qc.png`` atomically."""
    path = folder / "qc.png"
    write_bytes_atomic(path, render_qc(regions, title))
    return path
