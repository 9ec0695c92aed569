"""The Python API for notebooks: a few typed functions; the CLI is a thin layer over the same code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from kneebatch.config import ExtractionConfig
from kneebatch.errors import ConfigError
from kneebatch.extract.pipeline import SubjectResult, compute_subject
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import subject_spec
from kneebatch.network.cache import get_model


@dataclasses.dataclass(frozen=True)
class Results:
    """A run's outputs as DataFrames."""

    similarities: pd.DataFrame
    features: pd.DataFrame
    regions: pd.DataFrame
    failures: pd.DataFrame


def extract_subject(ct: Path | str, mask: Path | str, model_path: Path | str, *,
                    subject_id: str = "subject", side: str | None = None,
                    config: ExtractionConfig | None = None,
                    labels: LabelMap | str | None = None) -> SubjectResult:
    """One knee's vectors and similarities, in memory (nothing is written).

    Args:
        ct: CT file or DICOM series folder.
        mask: label mask (1 tibia, 2 femur).
        model_path: model file from ``kneebatch build-model``.
        subject_id: used in messages and rows.
        side: ``L`` (mirrored), ``R`` or None.
        config: extraction settings (defaults from DESIGN.md).
        labels: the mask values of tibia and femur, e.g. ``"tibia=10,femur=20"`` (default 1, 2).

    Raises:
        KneebatchError: bad input or model.
    """
    if side is not None and side.strip().lower() == "both":
        raise ConfigError("extract_subject computes one knee; for a bilateral scan call it "
                          "through run_cohort (side 'both' in the manifest) or the command line "
                          "`kneebatch extract --side both`.")
    if isinstance(labels, str):
        labels = LabelMap.parse(labels)
    spec = subject_spec(subject_id, ct, mask, side, labels)
    config = config or ExtractionConfig()
    model = get_model(Path(model_path), config.input_norm, config.conv_padding)
    return compute_subject(spec, config, model)


def read_results(out: Path | str) -> Results:
    """The Parquet datasets and failure list of a run folder."""
    out = Path(out)
    failures = out / "failures.csv"
    return Results(
        similarities=pd.read_parquet(out / "similarities"),
        features=pd.read_parquet(out / "features"),
        regions=(pd.read_parquet(out / "regions") if (out / "regions").is_dir()
                 else pd.DataFrame()),
        failures=pd.read_csv(failures) if failures.is_file() else pd.DataFrame(),
    )
