"""Tables ready for analysis: the features dataset as a wide subject x feature matrix
(``feature_matrix``, ``kneebatch export --wide``), so nobody has to pivot and ``np.stack``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kneebatch.config import LAYERS, REGIONS, parse_choice
from kneebatch.errors import OutputError


def feature_matrix(out: Path | str, layer: str | None = None,
                   region: str | None = None) -> pd.DataFrame:
    """One row per subject, one float32 column per feature.

    Args:
        out: a run's output folder (or a ``kneebatch merge`` folder).
        layer: only this layer (e.g. ``denseblock4``); default every layer of the run.
        region: only this region (``tibia``, ``femur``, ``background``); default all three.

    Returns:
        A DataFrame indexed by ``subject_id`` (sorted) with columns ``<region>.<layer>.<i>``,
        regions and layers in network order.

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
    return pd.concat(blocks, axis=1).sort_index()


def export_wide(out: Path, target: Path, layer: str | None = None,
                region: str | None = None) -> pd.DataFrame:
    """Write ``feature_matrix`` to ``target`` (``.parquet``, or ``.csv``) via a temporary file.

    Returns:
        The matrix written.
    """
    matrix = feature_matrix(out, layer, region)
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
