"""The output schema, stated once: the Parquet datasets, their columns and types, the provenance
columns, the schema version, and the manifest column names that would clash with them.

Every reader and writer of the datasets (gather, merge, the report, the manifest's check of its
columns) takes names from here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa

from kneebatch.outdir.records import ParquetMetadata, parse_dataclass

SCHEMA_VERSION = 3  # the layout of the Parquet datasets; in their metadata and in run.json
DATASETS = ("similarities", "features", "regions")
PART = "part-0.parquet"  # each dataset's one file
METADATA_KEY = b"kneebatch"  # the Parquet schema metadata entry holding the provenance JSON

PERCENTILES = (5, 25, 50, 75, 95)  # the HU percentiles of each region's statistics
STAT_COLUMNS = ("voxels", "volume_ml", "hu_mean", "hu_std", *(f"hu_p{p}" for p in PERCENTILES))
PROVENANCE = ("run_id", "weights", "model_sha256", "config_hash", "labels")
EXTRA_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
               "string": pa.string()}  # the types a manifest's extra column can take

# Who a row is: the knee, the scan it came from (a bilateral scan's id for <id>_L and <id>_R)
# and its side (L, R, or empty when the manifest left it empty).
IDENTITY = ("subject_id", "scan_id", "side")

_PROV = [(c, pa.string()) for c in PROVENANCE]
_WHO = [(c, pa.string()) for c in IDENTITY]
_FIXED: dict[str, list[tuple[str, pa.DataType]]] = {
    "similarities": [*_WHO, ("layer", pa.string()), ("region_a", pa.string()),
                     ("region_b", pa.string()), ("cosine", pa.float64())],
    "features": [*_WHO, ("region", pa.string()), ("layer", pa.string()),
                 ("dim", pa.int32()), ("vector", pa.list_(pa.float32()))],
    "regions": [*_WHO, ("region", pa.string()), ("voxels", pa.int64()),
                *((c, pa.float64()) for c in STAT_COLUMNS if c != "voxels")],
}
_AFTER_EXTRAS: dict[str, list[tuple[str, pa.DataType]]] = {
    "similarities": [("warnings", pa.string())], "features": [], "regions": []}
_HAS_EXTRAS = ("similarities", "regions")

# Names the manifest may not use for an extra column: every output column (but the subject id and
# side, which the manifest owns), the result key, and the report's derived ``pair`` column.
RESERVED = tuple(sorted(
    ({name for dataset in DATASETS for name, _ in _FIXED[dataset] + _AFTER_EXTRAS[dataset]}
     | set(PROVENANCE) | {"key", "pair"}) - {"subject_id", "side"}))


@dataclasses.dataclass(frozen=True)
class SimilarityRow:
    """One row of a subject's ``similarities.csv`` (the similarities dataset's first columns)."""

    subject_id: str
    layer: str
    region_a: str
    region_b: str
    cosine: float


def schemas(extra_types: dict[str, str], provenance: dict[str, Any]) -> dict[str, pa.Schema]:
    """The Arrow schema of each dataset.

    Args:
        extra_types: the manifest's extra columns and their kinds (keys of ``EXTRA_TYPES``), in
            the manifest's order.
        provenance: written into each schema's metadata, with the schema version and the extras'
            types.
    """
    meta = write_metadata(parse_dataclass(ParquetMetadata, {
        **provenance, "schema_version": SCHEMA_VERSION, "extra_types": extra_types}))
    extras = [(c, EXTRA_TYPES[kind]) for c, kind in extra_types.items()]
    return {name: pa.schema([*_FIXED[name], *(extras if name in _HAS_EXTRAS else []),
                             *_AFTER_EXTRAS[name], *_PROV], metadata=meta)
            for name in DATASETS}


def result_columns(dataset: str) -> tuple[str, ...]:
    """The columns of ``dataset`` that kneebatch writes itself (not the manifest's extras)."""
    return tuple(name for name, _ in _FIXED[dataset] + _AFTER_EXTRAS[dataset]) + PROVENANCE


def read_metadata(metadata: dict[bytes, bytes] | None) -> ParquetMetadata:
    """The provenance of a Parquet file from its schema metadata; a file without it (or with
    unreadable metadata) reads as schema version 1 with nothing else known."""
    try:
        data = json.loads((metadata or {}).get(METADATA_KEY, b"{}"))
        return parse_dataclass(ParquetMetadata, data if isinstance(data, dict) else {})
    except (ValueError, TypeError):  # malformed metadata (not JSON, not a record)
        return ParquetMetadata()


def write_metadata(metadata: ParquetMetadata) -> dict[bytes, bytes]:
    """Schema metadata holding ``metadata`` (the one writer beside ``schemas``)."""
    return {METADATA_KEY: json.dumps(dataclasses.asdict(metadata), sort_keys=True).encode()}
