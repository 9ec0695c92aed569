"""Records on disk: one writer and one tolerant reader each, nested records typed all the way down."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kneebatch.outdir.records import (
    Counts,
    DoneRecord,
    FileEntry,
    MergedRecord,
    ParquetSummary,
    RegionRecord,
    RunRecord,
)
from kneebatch.schema import SCHEMA_VERSION, STAT_COLUMNS, read_metadata, write_metadata

STATS = {"voxels": 8, "volume_ml": 0.5, "hu_mean": 300.0, "hu_std": 20.0, "hu_p5": 1.0,
         "hu_p25": 2.0, "hu_p50": 3.0, "hu_p75": 4.0, "hu_p95": 5.0}
DONE = {"subject_id": "k1", "key": "abc", "config_hash": "c", "model_sha256": "m",
        "weights": "random:seed=0", "files": {"features.npz": {"size": 10, "sha256": "ff"}},
        "regions": {"tibia": STATS}}


def test_done_record_nests_typed_records_and_round_trips() -> None:
    done = DoneRecord.from_dict({**DONE, "a_key_from_a_newer_version": 1})
    assert done is not None
    assert done.files["features.npz"] == FileEntry(10, "ff")
    assert done.regions["tibia"] == RegionRecord(**STATS)  # type: ignore[arg-type]
    assert DoneRecord.from_dict(json.loads(done.to_json())) == done


@pytest.mark.parametrize("damage", [{"regions": []}, {"regions": {"tibia": [1, 2]}},
                                    {"files": {"features.npz": "ff"}}, {"key": None} | {"x": 1}],
                         ids=["regions-a-list", "region-not-a-record", "file-not-a-record",
                              "unknown-only"])
def test_a_done_record_of_the_wrong_shape_reads_as_none_not_a_crash(damage: dict) -> None:  # type: ignore[type-arg]
    data = {**DONE, **damage}
    if "x" in damage:
        del data["key"]
    assert DoneRecord.from_dict(data) is None


def test_region_record_fields_are_the_regions_dataset_statistics() -> None:
    assert tuple(f.name for f in dataclasses.fields(RegionRecord)) == STAT_COLUMNS


def test_run_record_counts_and_parquet_are_records_and_add_up() -> None:
    record = RunRecord.from_dict({"run_id": "r", "started": "t", "counts": {"ok": 2, "total": 3},
                                  "parquet": {"subjects": 2, "failures": 1}})
    assert record is not None and record.counts == Counts(total=3, ok=2)
    assert record.parquet == ParquetSummary(subjects=2, failures=1)
    assert Counts(1, 1) + Counts(2, 1, 1) == Counts(3, 2, 1)
    assert RunRecord.from_dict({"run_id": "r", "started": "t"}).counts is None  # type: ignore[union-attr]
    assert MergedRecord.from_dict(json.loads(MergedRecord(["/a", "/b"]).to_json())) == MergedRecord(
        ["/a", "/b"])


def test_parquet_metadata_reader_is_tolerant() -> None:
    assert read_metadata(None).schema_version == 1
    assert read_metadata({b"kneebatch": b"not json"}).schema_version == 1
    meta = read_metadata({b"kneebatch": json.dumps({"schema_version": SCHEMA_VERSION,
                                                    "weights": "w", "new": 1}).encode()})
    assert (meta.schema_version, meta.weights) == (SCHEMA_VERSION, "w")
    assert read_metadata(write_metadata(meta)) == meta
