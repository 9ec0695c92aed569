"""Synthetic knee phantoms: deterministic CT + label mask pairs for demos and tests.

Each phantom is a leg along z (superior up) with skin fat, muscle, a femur (shaft and two condyles)
and a tibia (plateau and shaft), both with a cortical shell and trabecular interior, a joint space,
a fibula and a patella (bone that is in no label), a couch under the leg, scanner padding of -3024 HU
outside a circular field of view, and noise. The anatomy is drawn in units of the field of view, so a
small grid gives a small knee. Right knees have the fibula at -x (LPS: the patient's right); left
knees are their mirror image.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

SIZES = {
    # name: ((z, y, x) shape, (z, y, x) spacing in mm, depth jitter in slices)
    "clinical": ((204, 512, 512), (0.8, 0.35, 0.35), 12),
    "small": ((48, 64, 64), (1.2, 1.0, 1.0), 4),
}
HU = {"air": -1000.0, "fat": -100.0, "muscle": 45.0, "joint": 10.0, "cortical": 1400.0,
      "trabecular": 300.0, "couch": 150.0, "padding": -3024.0}


@dataclasses.dataclass(frozen=True)
class PhantomParams:
    """What varies between phantoms (normalised units: 1.0 is half the in-plane field of view)."""

    side: str
    leg_radius: float
    centre_xy: tuple[float, float]
    joint_z: float  # joint height in units of half the z extent
    hu_offset: float
    bone_scale: float
    reoriented: bool  # stored in RAS order (x and y flipped) to exercise reorientation


def _params(rng: np.random.Generator, side: str) -> PhantomParams:
    return PhantomParams(
        side=side,
        leg_radius=float(rng.uniform(0.55, 0.68)),
        centre_xy=(float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.05))),
        joint_z=float(rng.uniform(-0.15, 0.15)),
        hu_offset=float(rng.uniform(-30, 30)),
        bone_scale=float(rng.uniform(0.9, 1.1)),
        reoriented=bool(rng.integers(0, 3) == 0),
    )


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    if ru <= 0 or rv <= 0:
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _bone_radii(w: float, joint: float, s: float) -> dict[str, tuple[float, float, float, float]]:
    """Per slice: bone part -> (cx, cy, rx, ry) in normalised units; empty if absent here."""
    parts: dict[str, tuple[float, float, float, float]] = {}
    d = w - joint
    if d > 0.03:  # femur
        if d > 0.35:
            parts["femur_shaft"] = (0.0, 0.02, 0.15 * s, 0.15 * s)
        for name, cx, r in (("femur_medial", 0.17, 0.20), ("femur_lateral", -0.17, 0.17)):
            dz = (d - 0.22) / 0.19
            if abs(dz) < 1:
                k = np.sqrt(1 - dz * dz)
                parts[name] = (cx * s, 0.04, r * s * k, 0.26 * s * k)
        if 0.2 < d <= 0.4:  # metaphysis joins condyles to the shaft
            parts["femur_neck"] = (0.0, 0.03, 0.22 * s, 0.2 * s)
    elif d < -0.03:  # tibia
        depth = -d
        r = 0.36 if depth < 0.2 else max(0.14, 0.36 - (depth - 0.2) * 0.9)
        parts["tibia"] = (0.02 * s, 0.02, r * s, 0.7 * r * s)
        if depth > 0.12:
            parts["fibula"] = (-0.33 * s, 0.12, 0.06 * s, 0.06 * s)
    if 0.1 < d < 0.4:
        parts["patella"] = (0.0, -0.5 * s, 0.13 * s, 0.06 * s)
    return parts


def make_phantom(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], seed: int,
                 side: str = "R") -> tuple[sitk.Image, sitk.Image, PhantomParams]:
    """One synthetic knee.

    Args:
        shape: (z, y, x) voxels.
        spacing_mm: (z, y, x) voxel size.
        seed: makes the phantom (anatomy jitter, noise) deterministic.
        side: ``R`` or ``L`` (a mirror image).

    Returns:
        CT (int16, HU), mask (uint8: 1 tibia, 2 femur) and the parameters used.
    """
    rng = np.random.default_rng(seed)
    p = _params(rng, side)
    nz, ny, nx = shape
    mirror = -1.0 if side == "L" else 1.0
    v = ((np.arange(ny) + 0.5) / ny * 2 - 1)[:, None]  # posterior is +y
    u = ((np.arange(nx) + 0.5) / nx * 2 - 1)[None, :] * mirror  # right knee's lateral side is -x
    ws = (np.arange(nz) + 0.5) / nz * 2 - 1  # superior is +z
    cu, cv = p.centre_xy
    fov = _ellipse(u, v, 0.0, 0.0, 0.99, 0.99)
    ct = np.empty(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    cortex = 0.035 * p.bone_scale
    for k, w in enumerate(ws):
        leg_r = p.leg_radius * (1 + 0.08 * w)
        sl = np.full((ny, nx), HU["air"], dtype=np.float32)
        sl[(v > p.leg_radius + 0.1) & (v < p.leg_radius + 0.13) & (np.abs(u) < 0.9)] = HU["couch"]
        sl[_ellipse(u, v, cu, cv, leg_r, leg_r * 0.9)] = HU["fat"]
        sl[_ellipse(u, v, cu, cv, leg_r - 0.07, leg_r * 0.9 - 0.07)] = HU["muscle"]
        for name, (bx, by, rx, ry) in _bone_radii(float(w), p.joint_z, p.bone_scale).items():
            outer = _ellipse(u, v, cu + bx, cv + by, rx, ry)
            inner = _ellipse(u, v, cu + bx, cv + by, rx - cortex, ry - cortex)
            sl[outer] = HU["cortical"]
            sl[inner] = HU["trabecular"]
            if name.startswith(("femur", "tibia")):
                mask[k][outer] = 2 if name.startswith("femur") else 1
        sl[(sl > HU["air"]) & (sl < HU["cortical"])] += p.hu_offset
        sl[~fov] = HU["padding"]
        ct[k] = sl
    noise = rng.standard_normal(shape, dtype=np.float32) * 12.0
    ct += np.where(ct > HU["padding"], noise, np.float32(0))
    ct_img = sitk.GetImageFromArray(np.round(ct).astype(np.int16))
    mask_img = sitk.GetImageFromArray(mask)
    for img in (ct_img, mask_img):
        img.SetSpacing(tuple(float(s) for s in reversed(spacing_mm)))
        extent = [n * s for n, s in zip(reversed(shape), reversed(spacing_mm), strict=True)]
        img.SetOrigin(tuple(-e / 2 for e in extent))
    if p.reoriented:  # same anatomy, stored right-to-left and anterior-to-posterior (RAS)
        ct_img = sitk.DICOMOrient(ct_img, "RAS")
        mask_img = sitk.DICOMOrient(mask_img, "RAS")
    return ct_img, mask_img, p


def write_sample(folder: Path, subjects: int, size: str = "clinical", seed: int = 0) -> Path:
    """Write ``subjects`` phantoms and a ``manifest.csv`` into ``folder``.

    Args:
        folder: created if missing.
        subjects: how many knees.
        size: ``clinical`` (512 x 512 x ~200 at 0.35 x 0.35 x 0.8 mm) or ``small`` (tests).
        seed: base seed; subject i uses ``seed + i``.

    Returns:
        The manifest path.
    """
    shape, spacing, jitter = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(subjects):
        rng = np.random.default_rng(seed + 10_000 + i)
        depth = shape[0] + int(rng.integers(-jitter, jitter + 1))
        side = "L" if i % 2 else "R"
        sid = f"knee{i + 1:03d}"
        ct, mask, _ = make_phantom((depth, *shape[1:]), spacing, seed + i, side)
        sitk.WriteImage(ct, str(folder / f"{sid}_ct.nii.gz"), useCompression=True)
        sitk.WriteImage(mask, str(folder / f"{sid}_mask.nii.gz"), useCompression=True)
        rows.append({"subject_id": sid, "ct": f"{sid}_ct.nii.gz", "mask": f"{sid}_mask.nii.gz",
                     "side": side, "site": "A" if i % 3 else "B", "age": str(40 + (i * 7) % 35)})
        log.info("wrote phantom %s (%s knee, %s voxels)", sid, side, ct.GetSize())
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def make_bilateral_phantom(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float],
                           seed: int, gap_voxels: int = 6) -> tuple[sitk.Image, sitk.Image]:
    """Both legs in one scan (LPS): the right knee of ``make_phantom(seed, "R")`` at -x (the
    patient's right) and the left knee of ``make_phantom(seed + 1, "L")`` at +x, each in its own
    field of view, ``gap_voxels`` of air between them.

    Returns:
        CT (int16, HU) and mask (uint8), (z, y, 2 x + gap) voxels.
    """
    arrays = []
    for offset, side in ((0, "R"), (1, "L")):
        ct, mask, _ = make_phantom(shape, spacing_mm, seed + offset, side)
        arrays.append([sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")) for img in (ct, mask)])
    gap = (shape[0], shape[1], gap_voxels)
    ct_hu = np.concatenate([arrays[0][0], np.full(gap, HU["air"], np.int16), arrays[1][0]], axis=2)
    labels = np.concatenate([arrays[0][1], np.zeros(gap, np.uint8), arrays[1][1]], axis=2)
    images = []
    for array in (ct_hu, labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in reversed(spacing_mm)))
        images.append(image)
    return images[0], images[1]
