"""Merge stage: one dataset from several run folders (``kneebatch merge OUT1 OUT2 ... --out ALL``).

The folders must hold results of the same settings, model and Parquet schema version, and no
subject may be in two of them; otherwise nothing is written and the difference is named. ALL gets
the three Parquet datasets, the failures of every folder and a ``run.json`` naming its sources; it
has no ``subjects/`` (the per-subject files stay where they were computed), so ``run`` and
``gather`` refuse it, and a later ``merge`` into it replaces it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kneebatch.errors import ConfigError, OutputError
from kneebatch.outdir.atomic import write_bytes_atomic, write_text_atomic
from kneebatch.outdir.folder import (
    MERGED,
    check_owned,
    folder_settings,
    open_out,
    unwritable,
)
from kneebatch.outdir.records import (
    FAILURE_COLUMNS,
    Counts,
    MergedRecord,
    ParquetSummary,
    RunRecord,
    SettingsRecord,
)
from kneebatch.schema import DATASETS, PART, SCHEMA_VERSION, read_metadata, write_metadata


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What a merge wrote."""

    subjects: int
    failures: int
    sources: tuple[str, ...]


def _schema_version(out: Path) -> int:
    try:
        meta = pq.read_schema(out / "similarities" / PART).metadata or {}
        return read_metadata(meta).schema_version
    except (OSError, ValueError, pa.ArrowException):
        return 0


def _check_sources(sources: list[Path]) -> SettingsRecord:
    settings: list[SettingsRecord] = []
    for out in sources:
        check_owned(out)
        record = folder_settings(out)
        if record is None or not (out / "similarities").is_dir():
            raise OutputError(f"{out} holds no gathered results; run `kneebatch gather {out}` "
                              "(or finish its run) before merging it.")
        settings.append(record)
    first = sources[0]
    for out, record in zip(sources[1:], settings[1:], strict=True):
        changes = settings[0].differs_from(record)
        if changes:
            raise ConfigError(f"Cannot merge {out} with {first}: they were made with other "
                              f"settings or another model ({'; '.join(changes)}). Merge only "
                              "runs of the same settings and model file.")
    versions = {out: _schema_version(out) for out in sources}
    if len(set(versions.values())) > 1 or SCHEMA_VERSION not in versions.values():
        listed = ", ".join(f"{out}: {v}" for out, v in versions.items())
        raise ConfigError(f"Cannot merge: the Parquet schema versions differ ({listed}; this "
                          f"kneebatch writes {SCHEMA_VERSION}). Run `kneebatch gather` on the "
                          "older folders first.")
    seen: dict[str, Path] = {}
    for out in sources:
        ids = pq.read_table(out / "similarities", columns=["subject_id"]).column(0).unique()
        twice = [s for s in ids.to_pylist() if s in seen]
        if twice:
            raise ConfigError(f"Cannot merge: subject(s) {', '.join(twice[:5])} are in both "
                              f"{seen[twice[0]]} and {out}. Give each subject one run folder.")
        seen.update(dict.fromkeys(ids.to_pylist(), out))
    return settings[0]


def _dataset(sources: list[Path], name: str) -> pa.Table:
    tables = [pq.read_table(out / name) for out in sources if (out / name).is_dir()]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"Cannot merge the {name} datasets: their columns do not fit together "
                          f"({exc}). Are the manifests' extra columns of different types?") from exc
    meta = read_metadata(tables[0].schema.metadata)
    merged = dataclasses.replace(meta, merged_from=[str(out) for out in sources])
    return table.replace_schema_metadata(write_metadata(merged))


def _failures(sources: list[Path]) -> tuple[str, int]:
    rows = 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS, lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for out in sources:
        path = out / "failures.csv"
        if path.is_file():
            found = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
            writer.writerows(found)
            rows += len(found)
    return buffer.getvalue(), rows


def merge_runs(sources: list[Path], target: Path) -> MergeResult:
    """Merge the gathered results of ``sources`` into ``target``.

    Raises:
        ConfigError: different settings, model or schema version, a subject in two folders, or
            ``target`` is a run folder (or one of the sources).
        OutputError: a source has no results, or ``target`` cannot be written.
    """
    sources = [Path(s).resolve() for s in sources]
    target = Path(target)
    if len(set(sources)) != len(sources) or target.resolve() in sources:
        raise ConfigError("Give each run folder once, and an --out that is none of them.")
    settings = _check_sources(sources)
    if (target / "subjects").exists():
        raise ConfigError(f"{target} is a run folder; merge into a new or empty --out.")
    run_id = open_out(target, settings, command="merge")
    try:
        count = 0
        for name in DATASETS:
            table = _dataset(sources, name)
            (target / name).mkdir(exist_ok=True)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            write_bytes_atomic(target / name / PART, sink.getvalue().to_pybytes())
            if name == "similarities":
                count = len(table.column("subject_id").unique())
        failures, failed = _failures(sources)
        write_text_atomic(target / "failures.csv", failures)
        records = [RunRecord.read(out / "run.json") for out in sources]
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        counts = sum((r.counts for r in records if r and r.counts), Counts())
        summary = RunRecord(
            run_id=run_id,
            started=now, ended=now, config_hash=settings.config_hash, config=settings.config,
            model_sha256=settings.model_sha256, weights=settings.weights,
            shards=[r.run_id for r in records if r], counts=counts,
            parquet=ParquetSummary(subjects=count, failures=failed),
            schema_version=SCHEMA_VERSION, sources=[str(out) for out in sources])
        write_text_atomic(target / "run.json", summary.to_json())
        write_text_atomic(target / MERGED, MergedRecord(summary.sources).to_json())
    except OSError as exc:
        raise unwritable(target, exc) from exc
    return MergeResult(count, failed, tuple(summary.sources))
