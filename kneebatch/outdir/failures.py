"""Failure bookkeeping: one record per failed subject (or unusable manifest row) under
``OUT/.kneebatch/failures/``, and ``failures.csv`` made from them. Subject and manifest-row records
live in folders of their own, so no subject id can collide with a row; long ids are hashed so no
record name is too long to write.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
from collections.abc import Iterable
from pathlib import Path

from kneebatch.inputs.manifest import RowProblem
from kneebatch.outdir.atomic import write_text_atomic
from kneebatch.outdir.folder import BOOKKEEPING, record_name
from kneebatch.outdir.records import FAILURE_COLUMNS, FailureRecord

log = logging.getLogger(__name__)

SUBJECT_FAILURES = f"{BOOKKEEPING}/failures/subjects"
ROW_FAILURES = f"{BOOKKEEPING}/failures/rows"
FAILURES = "failures.csv"  # the table users read


def save_failure(out: Path, record: FailureRecord) -> None:
    """Remember a subject's failure; replaces its older record."""
    folder = out / SUBJECT_FAILURES
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"{record_name(record.subject_id)}.json", record.to_json())
    except OSError as exc:  # e.g. the disk is full: the run goes on, the log keeps the reason
        log.error("Subject %s: cannot record its failure in %s: %s", record.subject_id, folder,
                  exc)


def clear_failure(out: Path, subject_id: str) -> bool:
    """Forget a subject's failure once it has finished; True if there was one."""
    try:
        (out / SUBJECT_FAILURES / f"{record_name(subject_id)}.json").unlink()
    except FileNotFoundError:
        return False
    return True


def save_row_problems(out: Path, problems: list[RowProblem], run_id: str) -> None:
    """Replace the recorded manifest-row failures by ``problems`` (the manifest may be fixed)."""
    folder = out / ROW_FAILURES
    for stale in folder.glob("*.json") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            stale.unlink()
    if not problems:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for problem in problems:
        write_text_atomic(folder / f"{problem.line}.json", FailureRecord(
            problem.subject_id, problem.message, "manifest", run_id=run_id).to_json())


def subject_failures(out: Path) -> dict[str, FailureRecord]:
    """Subject id -> its recorded failure."""
    folder = out / SUBJECT_FAILURES
    records = (FailureRecord.read(p) for p in folder.glob("*.json")) if folder.is_dir() else ()
    return {r.subject_id: r for r in records if r is not None}


def row_failures(out: Path) -> list[FailureRecord]:
    """The recorded manifest-row failures, in file order."""
    folder = out / ROW_FAILURES
    paths = sorted(folder.glob("*.json"), key=lambda p: int(p.stem)) if folder.is_dir() else []
    return [r for r in (FailureRecord.read(p) for p in paths) if r is not None]


def current_failures(out: Path, subjects: Iterable[str],
                     extra: Iterable[FailureRecord] = ()) -> list[FailureRecord]:
    """The rows of ``failures.csv``: unusable manifest rows, then ``extra`` (e.g. what gather
    found), then the recorded failures of ``subjects`` not already among ``extra``."""
    extra = list(extra)
    taken = {r.subject_id for r in extra}
    failed = subject_failures(out)
    return row_failures(out) + extra + [failed[s] for s in subjects
                                        if s in failed and s not in taken]


def write_failures_csv(out: Path, records: Iterable[FailureRecord]) -> int:
    """Write ``OUT/failures.csv`` (atomically) from ``records``.

    Returns:
        The number of rows written.
    """
    rows = [dataclasses.asdict(r) for r in records]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / FAILURES, buffer.getvalue())
    return len(rows)
