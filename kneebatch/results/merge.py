"""Merge stage: one dataset from several run folders (``kneebatch merge OUT1 OUT2 ... --out ALL``).

The folders must hold results of the same settings, model and Parquet schema version (every row's
``config_hash`` and ``model_sha256`` included), their covariate columns the same types, and no
subject may be in two of them (finished in one and failed in another counts); otherwise nothing is
written, not even a folder, and the difference is named. ALL gets
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
from kneebatch.outdir.atomic import write_text_atomic
from kneebatch.outdir.failures import FAILURES
from kneebatch.outdir.folder import (
    MERGED,
    check_owned,
    folder_settings,
    gather_lock,
    open_out,
    unwritable,
)
from kneebatch.outdir.publish import new_generation, publish
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
    _check_rows(sources, settings[0])
    return settings[0]


def _check_rows(sources: list[Path], settings: SettingsRecord) -> None:
    """Every row of every source made with ``settings`` and its model; no subject in two
    sources, nor finished in one and failed in another."""
    seen: dict[str, Path] = {}
    for out in sources:
        table = pq.read_table(out / "similarities",
                              columns=["subject_id", "config_hash", "model_sha256"])
        for column, want in (("config_hash", settings.config_hash),
                             ("model_sha256", settings.model_sha256)):
            found = set(table.column(column).unique().to_pylist()) - {want}
            if found:
                raise ConfigError(
                    f"Cannot merge {out}: its Parquet holds rows of {column} "
                    f"{', '.join(sorted(found))}, not {want} of its settings (a run stopped "
                    f"under other settings?). Run `kneebatch gather {out}` first, then merge.")
        ids = table.column("subject_id").unique().to_pylist()
        twice = [s for s in ids if s in seen]
        if twice:
            raise ConfigError(f"Cannot merge: subject(s) {', '.join(twice[:5])} are in both "
                              f"{seen[twice[0]]} and {out}. Give each subject one run folder.")
        seen.update(dict.fromkeys(ids, out))
    for out in sources:
        failed = [r["subject_id"] for r in _failure_rows(out)]
        both = [s for s in failed if s in seen and seen[s] != out]
        if both:
            raise ConfigError(
                f"Cannot merge: subject(s) {', '.join(both[:5])} finished in {seen[both[0]]} but "
                f"failed in {out}. Keep each subject in one run folder: remove it from the "
                f"manifest of {out} and rerun that folder, then merge.")


def _dataset(sources: list[Path], name: str) -> pa.Table:
    """The sources' tables of one dataset as one table.

    Raises:
        ConfigError: a column has different types in two sources.
    """
    tables = [pq.read_table(out / name) for out in sources if (out / name).is_dir()]
    types: dict[str, tuple[pa.DataType, Path]] = {}
    for out, table in zip(sources, tables, strict=True):
        for field in table.schema:
            first = types.setdefault(field.name, (field.type, out))
            if first[0] != field.type:
                raise ConfigError(
                    f"Cannot merge the {name} datasets: column {field.name!r} is {first[0]} in "
                    f"{first[1]} but {field.type} in {out}. Rerun one folder with --column-types "
                    f"{field.name}=<type> so both agree, then merge.")
    table = pa.concat_tables(tables, promote_options="permissive")  # columns one source lacks
    metas = [read_metadata(t.schema.metadata) for t in tables]
    extra_types = {c: k for meta in metas for c, k in meta.extra_types.items()}
    merged = dataclasses.replace(metas[0], extra_types=extra_types,
                                 merged_from=[str(out) for out in sources])
    return table.replace_schema_metadata(write_metadata(merged))


def _failure_rows(out: Path) -> list[dict[str, str]]:
    path = out / FAILURES
    if not path.is_file():
        return []
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def _failures(sources: list[Path]) -> tuple[str, int]:
    rows = 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS, lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for out in sources:
        found = _failure_rows(out)
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
    tables = {name: _dataset(sources, name) for name in DATASETS}  # refusals before any write
    count = len(tables["similarities"].column("subject_id").unique())
    failures, failed = _failures(sources)
    run_id = open_out(target, settings, command="merge")
    try:
        with gather_lock(target), new_generation(target) as folder:
            for name, table in tables.items():
                pq.write_table(table, folder / name / PART)
            publish(target, folder)
        write_text_atomic(target / FAILURES, failures)
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
