"""Helpers shared by the test modules: small phantoms on disk, a DICOM series writer, the CLI's
run, and readers of a run's results. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from kneebatch.cli import main
from kneebatch.inputs.phantom import make_phantom, write_sample

SMALL_SHAPE = (40, 64, 64)  # (z, y, x)
SMALL_SPACING = (1.2, 1.0, 1.0)
BOOKKEEPING_RUN = ("--workers", "1", "--spacing", "2")  # tiny volumes: for bookkeeping tests


def write_knee(folder: Path, name: str = "knee", seed: int = 1, side: str = "R",
               ext: str = ".nii.gz") -> tuple[Path, Path]:
    """Write a small phantom's CT and mask; return their paths."""
    ct, mask, _ = make_phantom(SMALL_SHAPE, SMALL_SPACING, seed, side)
    folder.mkdir(parents=True, exist_ok=True)
    ct_path, mask_path = folder / f"{name}_ct{ext}", folder / f"{name}_mask{ext}"
    sitk.WriteImage(ct, str(ct_path))
    sitk.WriteImage(mask, str(mask_path))
    return ct_path, mask_path


def make_cohort(folder: Path, bad: bool = True) -> Path:
    """Four small phantoms plus (optionally) one subject whose CT is missing."""
    manifest = write_sample(folder, 4, size="small")
    if bad:
        with manifest.open("a") as fh:
            fh.write("broken,missing_ct.nii.gz,knee001_mask.nii.gz,R,A,50\n")
    return manifest


def run(manifest: Path, out: Path, model: Path, *extra: str) -> int:
    """``kneebatch run MANIFEST --out OUT --model MODEL [extra]`` in this process."""
    return main(["run", str(manifest), "--out", str(out), "--model", str(model), *extra])


def run_joined(scheduler: str, manifest: Path, out: Path, model: Path, *extra: str) -> int:
    """``run`` on the session's dask cluster, with the bookkeeping tests' small settings."""
    return run(manifest, out, model, *BOOKKEEPING_RUN, "--scheduler-address", scheduler, *extra)


def edit_manifest(manifest: Path, subject: str, **changes: str) -> None:
    """Change one row's columns, as a user editing the CSV would."""
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for column, value in changes.items():
        df.loc[df["subject_id"] == subject, column] = value
    df.to_csv(manifest, index=False)


def done(out: Path, subject: str) -> dict[str, object]:
    """A finished subject's ``done.json``."""
    return dict(json.loads((out / "subjects" / subject / "done.json").read_text()))


def similarities(out: Path) -> pd.DataFrame:
    """The similarities dataset without run ids, in a fixed order."""
    df = pd.read_parquet(out / "similarities").drop(columns=["run_id"])
    return df.sort_values(["subject_id", "layer", "region_a", "region_b"]).reset_index(drop=True)


def features(out: Path) -> dict[tuple[str, str, str], np.ndarray]:
    """The features dataset as (subject, region, layer) -> vector."""
    df = pd.read_parquet(out / "features")
    return {(r.subject_id, r.region, r.layer): np.asarray(r.vector, np.float32)
            for r in df.itertuples()}


def assert_same_results(a: Path, b: Path, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Two OUT folders hold the same similarities and features (to a tolerance)."""
    sa, sb = similarities(a), similarities(b)
    pd.testing.assert_frame_equal(sa.drop(columns="cosine"), sb.drop(columns="cosine"))
    np.testing.assert_allclose(sa["cosine"], sb["cosine"], rtol=0, atol=atol)
    fa, fb = features(a), features(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_allclose(fa[key], fb[key], rtol=rtol, atol=atol, err_msg=str(key))


def write_dicom_series(image: sitk.Image, folder: Path, prefix: str = "slice ") -> None:
    """One file per slice, with the position and orientation tags a scanner writes."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (*direction[0:7:3], *direction[1:8:3]))
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(abs(hash(str(folder))) % 10**12)
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT", "0020|000d": series_uid + ".1", "0020|000e": series_uid,
            "0020|0037": orientation, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0008|0018": f"{series_uid}.{k + 10}",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:04d}.dcm"))
        writer.Execute(sl)
