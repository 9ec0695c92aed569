"""Gather stage: per-subject files -> the Parquet datasets ``OUT/similarities/``, ``OUT/features/``
and ``OUT/regions/``, ``failures.csv`` and ``run.json``.

Gather takes exactly the subjects of the last run's manifest (every finished folder when OUT was
written by ``extract`` alone), each with the key that run expects, so every row was computed under
the settings and model run.json names. The covariates (the manifest's extra columns) are joined
from that manifest, not from the subject's files. It is total: a subject folder with a missing,
truncated or malformed file is listed in ``failures.csv`` (stage ``gather``) and the dataset is
built from the rest. Each file is read once. The three datasets are written into a new folder and
switched in together (``publish``), so a reader never sees half a dataset nor datasets of
different gathers, and a killed gather leaves the previous ones whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kneebatch.errors import ConfigError
from kneebatch.inputs.extras import column_types, convert
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import scan_id
from kneebatch.outdir.atomic import left_by_dead_writer, write_text_atomic
from kneebatch.outdir.failures import (
    ROW_FAILURES,
    SUBJECT_FAILURES,
    current_failures,
    write_failures_csv,
)
from kneebatch.outdir.folder import (
    OLD_DEBRIS,
    check_not_merged,
    check_owned,
    folder_settings,
    gather_lock,
    read_manifest_record,
    run_records,
    unwritable,
)
from kneebatch.outdir.publish import new_generation, publish
from kneebatch.outdir.records import (
    Counts,
    DoneRecord,
    FailureRecord,
    ManifestRecord,
    ParquetSummary,
    RunRecord,
)
from kneebatch.results.subject_files import (
    DONE,
    DamagedResult,
    read_done,
    read_result,
    subject_dir,
)
from kneebatch.schema import DATASETS, PART, SCHEMA_VERSION, SimilarityRow, schemas

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GatherResult:
    """What a gather found.

    Attributes:
        subjects: subjects in the Parquet.
        similarity_rows, feature_rows: rows written.
        failures: rows of ``failures.csv``.
        pending: subjects of the manifest with neither a current result nor a failure.
        left_out: folders under ``subjects/`` that are not in the manifest (not gathered).
        extra_types: the manifest's extra columns and the type each has in the Parquet.
    """

    subjects: int
    similarity_rows: int
    feature_rows: int
    failures: int
    pending: tuple[str, ...] = ()
    left_out: int = 0
    extra_types: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> ParquetSummary:
        """What ``run.json`` records of the Parquet."""
        return ParquetSummary(subjects=self.subjects, failures=self.failures,
                              pending=len(self.pending), left_out_folders=self.left_out,
                              extra_types=self.extra_types)


@dataclasses.dataclass
class _Survey:
    finished: list[tuple[Path, DoneRecord]]
    problems: list[FailureRecord]
    pending: list[str]
    expected: list[str]
    left_out: int


def _clear_debris(out: Path) -> None:
    """Remove what killed runs left: temporaries whose writer is gone, of run.json and
    failures.csv and of the failure records, and folders of kneebatch 0.1 (the caller holds the
    gather lock)."""
    for folder in (out, out / SUBJECT_FAILURES, out / ROW_FAILURES):
        for path in folder.iterdir() if folder.is_dir() else ():
            if left_by_dead_writer(path):
                path.unlink(missing_ok=True)
    for path in out.iterdir():
        if OLD_DEBRIS.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _survey(out: Path) -> _Survey:
    """Which subjects are finished with the expected key; reads only ``done.json`` files."""
    manifest = read_manifest_record(out)
    settings = folder_settings(out)
    base = out / "subjects"
    folders = {p.name for p in base.iterdir()} if base.is_dir() else set()
    expected: dict[str, str | None] = (dict(manifest.subjects) if manifest
                                       else dict.fromkeys(sorted(folders)))
    survey = _Survey([], [], [], list(expected), len(folders - set(expected)))
    for subject_id, key in expected.items():
        folder = subject_dir(out, subject_id)
        if folder.is_symlink():
            survey.problems.append(FailureRecord(
                subject_id, f"Subject {subject_id}: {folder} is a symlink; kneebatch neither reads "
                "nor writes through links. Remove the link and rerun to compute it here.", "gather"))
            continue
        done = read_done(folder)
        if done is None:
            if (folder / DONE).exists():
                survey.problems.append(FailureRecord(
                    subject_id, f"Subject {subject_id}: {folder / DONE} is not a kneebatch "
                    "result record (damaged or edited). Rerun `kneebatch run` to compute it "
                    "again.", "gather"))
            else:
                survey.pending.append(subject_id)
            continue
        if (key is not None and done.key != key) or (key is None and settings is not None and (
                done.config_hash != settings.config_hash
                or done.model_sha256 != settings.model_sha256)):
            survey.pending.append(subject_id)  # made from other inputs or settings
            continue
        survey.finished.append((folder, done))
    return survey


@contextlib.contextmanager
def _writers(folder: Path, arrow_schemas: dict[str, pa.Schema]) -> Iterator[
        dict[str, pq.ParquetWriter]]:
    """One writer per dataset, into a new generation's folder."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(pq.ParquetWriter(folder / name / PART,
                                                          arrow_schemas[name]))
               for name in DATASETS}


def _extras(manifest: ManifestRecord | None, finished: list[tuple[Path, DoneRecord]]
            ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Each finished subject's covariates and their columns' types: from the last run's manifest
    (the current values, whatever the subject was computed with), else from ``done.json``."""
    known = manifest.extras if manifest and manifest.extras else {}
    values = {d.subject_id: known.get(d.subject_id, d.extra) for _, d in finished}
    recorded = manifest.extra_types if manifest else {}
    try:
        return values, column_types(values.items(), recorded)
    except ConfigError:  # recorded types that no longer fit (a record of another version)
        return values, column_types(values.items())


def _rows(done: DoneRecord, rows: list[SimilarityRow], vectors: dict[str, np.ndarray],
          extra: dict[str, str], extra_types: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """One finished subject's rows of each dataset."""
    who = {"subject_id": done.subject_id, "scan_id": scan_id(done.subject_id, done.bilateral),
           "side": done.side}
    prov = {"run_id": done.run_id, "weights": done.weights, "model_sha256": done.model_sha256,
            "config_hash": done.config_hash, "labels": done.labels or str(LabelMap())}
    extras = {c: convert(extra.get(c), kind) for c, kind in extra_types.items()}
    warnings = "; ".join(done.warnings)
    sims = [{**who, **dataclasses.asdict(row), **extras, "warnings": warnings, **prov}
            for row in rows]
    feats = []
    for key, vector in vectors.items():
        region, layer = key.split(".", 1)
        feats.append({**who, "region": region, "layer": layer,
                      "dim": int(vector.shape[0]), "vector": np.asarray(vector, np.float32),
                      **prov})
    regions = [{**who, "region": region, **dataclasses.asdict(stats), **extras, **prov}
               for region, stats in done.regions.items()]
    return {"similarities": sims, "features": feats, "regions": regions}


def gather(out: Path, *, provenance: dict[str, Any] | None = None,
           batch: int = 256) -> GatherResult:
    """Build the Parquet datasets (``OUT/similarities/``, ``OUT/features/``, ``OUT/regions/``)
    and ``OUT/failures.csv`` from ``OUT/subjects``: exactly the subjects of the last manifest that
    are finished with the key it expects (a stopped run's Parquet may hold fewer subjects than
    the previous one, but never a row of other settings or of a subject left out).

    Args:
        out: the output folder.
        provenance: stored as JSON in every dataset's schema metadata, with the schema version
            and the extra columns' types.
        batch: subjects per Parquet row group.

    Returns:
        Counts of what was written.
    """
    with gather_lock(out):
        _clear_debris(out)
        survey = _survey(out)
        extras, extra_types = _extras(read_manifest_record(out), survey.finished)
        arrow_schemas = schemas(extra_types, provenance or {})
        gathered: list[str] = []
        counts = dict.fromkeys(DATASETS, 0)
        with new_generation(out) as folder:
            with _writers(folder, arrow_schemas) as writers:
                for start in range(0, len(survey.finished), batch):
                    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in DATASETS}
                    for subject_folder, done in survey.finished[start:start + batch]:
                        try:
                            rows, vectors = read_result(subject_folder, done)
                        except DamagedResult as exc:
                            survey.problems.append(FailureRecord(
                                done.subject_id, f"Subject {done.subject_id}: {exc.path} "
                                f"{exc.problem}. Rerun `kneebatch run` to compute it again.",
                                "gather", done.ct, done.mask))
                            continue
                        gathered.append(done.subject_id)
                        new = _rows(done, rows, vectors, extras[done.subject_id], extra_types)
                        for name, dataset_rows in new.items():
                            tables[name] += dataset_rows
                    for name, writer in writers.items():
                        writer.write_table(pa.Table.from_pylist(tables[name],
                                                                schema=arrow_schemas[name]))
                        counts[name] += len(tables[name])
            publish(out, folder)
        done_ids = set(gathered)
        records = current_failures(out, [s for s in survey.expected if s not in done_ids],
                                   survey.problems)
        failures = write_failures_csv(out, records)
    failed = {r.subject_id for r in records}
    pending = tuple(s for s in survey.pending if s not in failed)
    if survey.left_out:
        log.info("left %d folder(s) under %s out of the Parquet: not in the last run's manifest",
                 survey.left_out, out / "subjects")
    return GatherResult(len(gathered), counts["similarities"], counts["features"], failures,
                        pending, survey.left_out, extra_types)


def _over_shards(out: Path, record: RunRecord) -> RunRecord:
    """``record`` with the counts of every shard's latest run of the same array (same shard
    count, settings and manifest) added up, and their run ids."""
    count = record.shard.split("/")[1] if record.shard else ""
    latest: dict[str, RunRecord] = {}
    for other in run_records(out):  # oldest first: the latest run of each shard wins
        if other.shard and other.shard.split("/")[1] == count and other.ended and (
                other.config_hash, other.model_sha256, other.manifest_sha256) == (
                record.config_hash, record.model_sha256, record.manifest_sha256):
            latest[other.shard] = other
    totals = sum((r.counts for r in latest.values() if r.counts), Counts())
    return dataclasses.replace(record, counts=totals,
                               shards=[r.run_id for _, r in sorted(latest.items())])


def gather_run(out: Path, record: RunRecord | None = None) -> GatherResult:
    """Gather OUT and write ``run.json``: ``record`` (default: the latest run's) plus what the
    Parquet now holds. Works on any kneebatch OUT, also one written only by ``extract``.

    Raises:
        OutputError: OUT is not a kneebatch folder, or cannot be written.
        ConfigError: OUT holds paths kneebatch did not make.
    """
    check_owned(out)
    check_not_merged(out, "gather")
    if record is None:
        records = run_records(out)
        settings = folder_settings(out)
        record = records[-1] if records else RunRecord(
            run_id="gather", started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            config_hash=settings.config_hash if settings else "",
            config=settings.config if settings else {},
            model_sha256=settings.model_sha256 if settings else "",
            weights=settings.weights if settings else "")
    if record.shard:
        record = _over_shards(out, record)
    try:
        result = gather(out, provenance=record.provenance())
        summary = dataclasses.replace(record, parquet=result.summary(),
                                      schema_version=SCHEMA_VERSION)
        write_text_atomic(out / "run.json", summary.to_json())
    except OSError as exc:
        raise unwritable(out, exc) from exc
    return result
