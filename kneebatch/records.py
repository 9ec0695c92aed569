"""Run bookkeeping under ``OUT/.kneebatch/``: one JSON per failed subject (or unusable manifest row)
and one per run or array shard. ``failures.csv`` and ``run.json`` are rebuilt from them, so shards
of one cohort never overwrite each other's results.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from kneebatch.errors import OutputError
from kneebatch.manifest import RowProblem
from kneebatch.store import write_text_atomic

log = logging.getLogger(__name__)

FAILURES_DIR = ".kneebatch/failures"  # one JSON per failed subject; failures.csv is made from them
RUNS_DIR = ".kneebatch/runs"  # one JSON per run (or array shard); run.json is made from them
FAILURE_COLUMNS = ("subject_id", "error", "stage", "ct", "mask", "time")


def record_failure(out: Path, key: str, record: dict[str, Any]) -> None:
    """Remember a failure (for ``failures.csv``) under ``key`` (a checked subject id or
    ``manifest-row-N``); replaces an older record with the same key."""
    folder = out / FAILURES_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"{key}.json", json.dumps(record, sort_keys=True))
    except OSError as exc:  # e.g. the disk is full: the run goes on, the log keeps the reason
        log.error("cannot record the failure of %s in %s: %s", record.get("subject_id"), folder,
                  exc)


def record_manifest_problems(out: Path, problems: list[RowProblem]) -> None:
    """Replace the recorded manifest-row failures by ``problems`` (the manifest may be fixed)."""
    folder = out / FAILURES_DIR
    for stale in folder.glob("manifest-row-*.json") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            stale.unlink()
    for problem in problems:
        record_failure(out, f"manifest-row-{problem.line}", {
            "subject_id": problem.subject_id, "error": problem.message, "stage": "manifest",
            "ct": "", "mask": "", "time": ""})


def clear_failure(out: Path, subject_id: str) -> None:
    """Forget a subject's failure once it has finished."""
    with contextlib.suppress(FileNotFoundError):
        (out / FAILURES_DIR / f"{subject_id}.json").unlink()


def write_failures_csv(out: Path, finished: set[str]) -> int:
    """Write ``OUT/failures.csv`` from the failure records, leaving out subjects in ``finished``.

    Returns:
        The number of rows written.
    """
    rows = []
    folder = out / FAILURES_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.stem in finished:
            continue  # a later run finished it (manifest-row-* keys never match an id)
        with contextlib.suppress(OSError, ValueError):
            rows.append(json.loads(path.read_text()))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "failures.csv", buffer.getvalue())
    return len(rows)


def unwritable(out: Path, exc: OSError) -> OutputError:
    """The error for an output folder that cannot be written."""
    return OutputError(f"Cannot write to {out} ({exc.strerror or exc}). Free some space or make "
                       "it writable, then rerun the same command: finished subjects are kept.")


def save_run_record(out: Path, record: dict[str, Any]) -> None:
    """Keep one run's (or shard's) record for a later ``gather_run``.

    Raises:
        OutputError: it cannot be written.
    """
    folder = out / RUNS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"{record['run_id']}.json",
                          json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise unwritable(out, exc) from exc


def latest_run_record(out: Path) -> dict[str, Any] | None:
    """The record of the run that ended last, or None."""
    records = []
    folder = out / RUNS_DIR
    for path in folder.glob("*.json") if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return max(records, key=lambda r: str(r.get("ended", ""))) if records else None
