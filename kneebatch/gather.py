"""Gather stage: per-subject files -> the Parquet datasets ``OUT/similarities/`` and ``OUT/features/``,
plus ``failures.csv`` and ``run.json`` from the records in ``records.py``.

Each dataset is written into a temporary folder next to its final place and swapped in, so a reader
(or a second gather running at the same time) never sees a half-written dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kneebatch.errors import OutputError
from kneebatch.records import RUNS_DIR, latest_run_record, unwritable, write_failures_csv
from kneebatch.store import (
    read_done,
    read_features,
    read_similarities,
    subject_dir,
    write_text_atomic,
)

log = logging.getLogger(__name__)

PROVENANCE = ("run_id", "weights", "model_sha256", "config_hash")


@dataclasses.dataclass(frozen=True)
class GatherResult:
    """What a gather found."""

    subjects: int
    similarity_rows: int
    feature_rows: int
    failures: int
    stale: tuple[str, ...]


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the folder ``tmp``; safe against a concurrent gather doing the same."""
    for _ in range(100):
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:  # another gather put its folder there first; move it aside and retry
            time.sleep(0.05)
            continue
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(f"could not put {final} in place")


def _table_writer(tmp: Path, schema: pa.Schema) -> pq.ParquetWriter:
    tmp.mkdir(parents=True)
    return pq.ParquetWriter(tmp / "part-0.parquet", schema)


def gather(out: Path, run_id: str, *, config_hash: str | None = None,
           model_sha256: str | None = None, provenance: dict[str, Any] | None = None,
           batch: int = 256) -> GatherResult:
    """Build ``OUT/similarities/``, ``OUT/features/`` and ``OUT/failures.csv`` from ``OUT/subjects``.

    Args:
        out: the run's output folder.
        run_id: stored as a column.
        config_hash, model_sha256: when given, subjects finished with other settings are left out
            (and listed as ``stale``).
        provenance: stored as JSON in both datasets' schema metadata.
        batch: subjects per Parquet row group.

    Returns:
        Counts of what was written.
    """
    finished: list[tuple[Path, dict[str, Any]]] = []
    stale = []
    base = out / "subjects"
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        done = read_done(folder)
        if done is None or subject_dir(out, folder.name) != folder:
            continue
        if (config_hash and done.get("config_hash") != config_hash) or (
                model_sha256 and done.get("model_sha256") != model_sha256):
            stale.append(folder.name)
            continue
        finished.append((folder, done))
    if stale:
        log.warning("%d subject(s) in %s were made with other settings and are left out of the "
                    "Parquet: %s", len(stale), base, ", ".join(stale[:10]))
    extra_columns = sorted({k for _, d in finished for k in d.get("extra", {})})
    meta = {b"kneebatch": json.dumps(provenance or {}, sort_keys=True).encode()}
    sim_schema = pa.schema(
        [("subject_id", pa.string()), ("layer", pa.string()), ("region_a", pa.string()),
         ("region_b", pa.string()), ("cosine", pa.float64())]
        + [(c, pa.string()) for c in extra_columns] + [(c, pa.string()) for c in PROVENANCE],
        metadata=meta)
    feat_schema = pa.schema(
        [("subject_id", pa.string()), ("region", pa.string()), ("layer", pa.string()),
         ("dim", pa.int32()), ("vector", pa.list_(pa.float32()))]
        + [(c, pa.string()) for c in PROVENANCE], metadata=meta)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sim_tmp, feat_tmp = out / f".similarities.tmp-{token}", out / f".features.tmp-{token}"
    sim_rows = feat_rows = 0
    try:
        with _table_writer(sim_tmp, sim_schema) as sims, _table_writer(feat_tmp, feat_schema) as feats:
            for start in range(0, len(finished), batch):
                s_cols: dict[str, list[Any]] = {f.name: [] for f in sim_schema}
                f_cols: dict[str, list[Any]] = {f.name: [] for f in feat_schema}
                for folder, done in finished[start:start + batch]:
                    prov = {"run_id": run_id, "weights": done.get("weights"),
                            "model_sha256": done.get("model_sha256"),
                            "config_hash": done.get("config_hash")}
                    for row in read_similarities(folder):
                        for key, value in {**dataclasses.asdict(row), **prov}.items():
                            s_cols[key].append(value)
                        for column in extra_columns:
                            s_cols[column].append(done.get("extra", {}).get(column))
                    for key, vector in read_features(folder).items():
                        region, layer = key.split(".", 1)
                        values = {"subject_id": folder.name, "region": region, "layer": layer,
                                  "dim": int(vector.shape[0]),
                                  "vector": np.asarray(vector, np.float32), **prov}
                        for column, value in values.items():
                            f_cols[column].append(value)
                sims.write_table(pa.table(s_cols, schema=sim_schema))
                feats.write_table(pa.table(f_cols, schema=feat_schema))
                sim_rows += len(s_cols["subject_id"])
                feat_rows += len(f_cols["subject_id"])
        _swap_in(sim_tmp, out / "similarities")
        _swap_in(feat_tmp, out / "features")
    finally:
        shutil.rmtree(sim_tmp, ignore_errors=True)
        shutil.rmtree(feat_tmp, ignore_errors=True)
    failures = write_failures_csv(out, {f.name for f, _ in finished})
    return GatherResult(len(finished), sim_rows, feat_rows, failures, tuple(stale))


def gather_run(out: Path, record: dict[str, Any] | None = None) -> GatherResult:
    """Gather the subjects finished with ``record``'s settings (default: the latest run's) and
    write ``run.json``: the record plus what the Parquet now holds.

    Raises:
        OutputError: no run has written to ``out`` yet.
    """
    record = record or latest_run_record(out)
    if record is None:
        raise OutputError(f"{out} holds no kneebatch run (no {RUNS_DIR}/); run `kneebatch run "
                          f"MANIFEST --out {out}` first.")
    provenance = {k: record.get(k) for k in ("run_id", "model_sha256", "weights", "config_hash",
                                             "config", "versions")}
    try:
        result = gather(out, record["run_id"], config_hash=record.get("config_hash"),
                        model_sha256=record.get("model_sha256"), provenance=provenance)
        summary = {**record, "parquet": {"subjects": result.subjects, "failures": result.failures,
                                         "stale_subjects": len(result.stale)}}
        write_text_atomic(out / "run.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise unwritable(out, exc) from exc
    return result
