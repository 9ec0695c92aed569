"""Tables ready for analysis: the features dataset as a wide subject x feature matrix
(``feature_matrix``, ``kneebatch export --wide``), so nobody has to pivot and ``np.stack``.

Each row says who it is (``scan_id``, ``side``; with ``with_extras`` the manifest's covariates
too) in its first columns; the features follow. ``export`` writes what its file's extension says
(``.parquet`` or ``.csv``), and never into a kneebatch output folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kneebatch.config import LAYERS, REGIONS, parse_choice
from kneebatch.errors import ConfigError, OutputError
from kneebatch.outdir.folder import BOOKKEEPING
from kneebatch.schema import IDENTITY, PART, result_columns

EXPORT_FORMATS = (".parquet", ".csv")


def feature_matrix(out: Path | str, layer: str | None = None, region: str | None = None, *,
                   with_extras: bool = False) -> pd.DataFrame:
    """One row per subject: who it is, then one float32 column per feature.

    Args:
        out: a run's output folder (or a ``kneebatch merge`` folder).
        layer: only this layer (e.g. ``denseblock4``); default every layer of the run.
        region: only this region (``tibia``, ``femur``, ``background``); default all three.
        with_extras: add the manifest's extra columns (covariates) after ``scan_id`` and ``side``.

    Returns:
        A DataFrame indexed by ``subject_id`` (sorted): columns ``scan_id``, ``side``, the
        covariates (with ``with_extras``), then ``<region>.<layer>.<i>``, regions and layers in
        network order. ``matrix.drop(columns=["scan_id", "side"])`` is the features alone.

    Raises:
        ConfigError: an unknown layer or region.
        OutputError: OUT has no features dataset, or none of the asked layer/region.
    """
    folder = Path(out) / "features"
    filters = []
    if layer is not None:
        filters.append(("layer", "==", parse_choice(layer, LAYERS, "layer")))
    if region is not None:
        filters.append(("region", "==", parse_choice(region, REGIONS, "region")))
    if not folder.is_dir():
        raise OutputError(f"{folder} does not exist: run `kneebatch run ... --out {out}` (or "
                          f"`kneebatch gather {out}`) first.")
    table = pq.read_table(folder, columns=["subject_id", "region", "layer", "vector"],
                          filters=filters or None)
    if table.num_rows == 0:
        raise OutputError(f"{folder} holds no features" + (
            f" of {' '.join(f'{c}={v}' for c, _, v in filters)}" if filters else "") +
            "; see `pd.read_parquet(OUT / 'features')[['region', 'layer']].drop_duplicates()`.")
    blocks = []
    found = table.select(["region", "layer"]).to_pandas().drop_duplicates()
    for r, lay in sorted(found.itertuples(index=False),
                         key=lambda p: (REGIONS.index(p[0]), LAYERS.index(p[1]))):
        part = table.filter(pc.and_(pc.equal(table["region"], r), pc.equal(table["layer"], lay)))
        vectors = part["vector"].combine_chunks()
        matrix = np.asarray(vectors.flatten().to_numpy(), np.float32).reshape(len(part), -1)
        columns = [f"{r}.{lay}.{i}" for i in range(matrix.shape[1])]
        index = pd.Index(part["subject_id"].to_pylist(), name="subject_id")
        blocks.append(pd.DataFrame(matrix, index=index, columns=columns))
    return pd.concat([_who(Path(out), with_extras), *blocks], axis=1, join="inner").sort_index()


def _who(out: Path, with_extras: bool) -> pd.DataFrame:
    """``scan_id``, ``side`` (and the covariates) of each subject, indexed by ``subject_id``."""
    sims = pq.read_schema(out / "similarities" / PART)
    extras = [c for c in sims.names if c not in result_columns("similarities")]
    columns = ["subject_id", *IDENTITY[1:], *(extras if with_extras else [])]
    who = pq.read_table(out / "similarities", columns=columns).to_pandas()
    return who.drop_duplicates("subject_id").set_index("subject_id")


def check_export_target(target: Path) -> None:
    """Refuse a target kneebatch cannot write as its extension says, or one inside an output
    folder (it would replace a dataset, or become a file kneebatch refuses as not its own).

    Raises:
        ConfigError: naming what to choose instead.
    """
    if target.suffix.lower() not in EXPORT_FORMATS:
        raise ConfigError(f"Cannot export to {target}: kneebatch writes {' or '.join(EXPORT_FORMATS)}"
                          f" files; give --wide a name ending in one of them (e.g. "
                          f"{target.with_suffix('.parquet').name}).")
    resolved = target.resolve()
    for folder in resolved.parents:
        if (folder / BOOKKEEPING).is_dir():
            raise ConfigError(f"Cannot export to {target}: it is inside the kneebatch output "
                              f"folder {folder}, whose files are kneebatch's own. Write it "
                              "outside, e.g. next to that folder.")


def export_wide(out: Path, target: Path, layer: str | None = None, region: str | None = None,
                *, with_extras: bool = False) -> pd.DataFrame:
    """Write ``feature_matrix`` to ``target`` (``.parquet`` or ``.csv``) via a temporary file.

    Returns:
        The matrix written.

    Raises:
        ConfigError: see ``check_export_target``.
    """
    check_export_target(target)
    matrix = feature_matrix(out, layer, region, with_extras=with_extras)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if target.suffix.lower() == ".csv":
            matrix.to_csv(tmp)
        else:
            matrix.to_parquet(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"Cannot write {target} ({exc.strerror or exc}); choose a writable "
                          "path.") from exc
    return matrix
