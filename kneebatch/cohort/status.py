"""Status of a cohort in OUT, read from the files alone (no scheduler, no torch, no dask): which
subjects are finished, failed (unusable manifest rows and damaged results included), running (and
where, from the claims) or pending, the latest run's state and rate, and an ETA. Safe while a run
is going, on any file system that holds OUT.
"""

from __future__ import annotations

import collections
import dataclasses
from datetime import datetime, timezone
from pathlib import Path

from kneebatch.errors import OutputError
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import parse_manifest
from kneebatch.outdir.claims import Holder, holder
from kneebatch.outdir.failures import row_failures, subject_failures
from kneebatch.outdir.folder import (
    check_owned,
    folder_settings,
    read_manifest_record,
    run_records,
    run_state,
)
from kneebatch.outdir.key import subject_key
from kneebatch.outdir.records import FailureRecord, RunRecord
from kneebatch.results.subject_files import (
    State,
    read_done,
    result_problem,
    result_state,
    subject_dir,
)


@dataclasses.dataclass(frozen=True)
class CohortStatus:
    """Where each subject of the manifest stands.

    Attributes:
        finished: subjects with a current result.
        failed: subject -> its recorded failure (a damaged result: stage ``result``).
        bad_rows: manifest rows that cannot be used (counted as failed, as ``run`` does).
        running: subject -> who computes it now.
        pending: the rest.
        run: the latest run's record (None before any run).
        run_state: ``running``, ``stopped`` (also: its process is gone) or ``ended``.
        rate_per_h: subjects the latest run finished per hour (None before its first one).
    """

    finished: list[str]
    failed: dict[str, FailureRecord]
    running: dict[str, Holder]
    pending: list[str]
    run: RunRecord | None
    rate_per_h: float | None
    bad_rows: list[FailureRecord] = dataclasses.field(default_factory=list)
    run_state: str = ""

    @property
    def total(self) -> int:
        """Subjects and unusable rows of the manifest."""
        return (len(self.finished) + len(self.failed) + len(self.bad_rows) + len(self.running)
                + len(self.pending))

    @property
    def failed_count(self) -> int:
        """Failed subjects and unusable manifest rows."""
        return len(self.failed) + len(self.bad_rows)

    @property
    def eta_s(self) -> float | None:
        """Seconds until the running and pending subjects are done at the latest run's rate."""
        left = len(self.running) + len(self.pending)
        return 3600.0 * left / self.rate_per_h if self.rate_per_h else None

    def failures_by_stage(self) -> dict[str, int]:
        """Stage -> how many subjects (or rows) failed there."""
        stages = [r.stage for r in self.failed.values()] + [r.stage for r in self.bad_rows]
        return dict(collections.Counter(stages).most_common())


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _expected(out: Path, manifest: Path | None) -> tuple[dict[str, str | None], list[FailureRecord]]:
    """Subject -> the key its result must hold (None: any, for a folder ``extract`` wrote), and
    the manifest's unusable rows."""
    settings = folder_settings(out)
    if manifest is not None:
        if settings is None:
            raise OutputError(f"{out} has no results yet; start with `kneebatch run`.")
        runs = run_records(out)
        labels = LabelMap.parse(runs[-1].labels) if runs and runs[-1].labels else None
        specs, problems = parse_manifest(manifest, labels)  # the label map the last run used
        rows = [FailureRecord(p.subject_id, p.message, "manifest") for p in problems]
        return {s.subject_id: subject_key(s, settings.config_hash, settings.model_sha256)
                for s in specs}, rows
    record = read_manifest_record(out)
    if record is not None:
        return dict(record.subjects), row_failures(out)
    base = out / "subjects"
    if settings is None or not base.is_dir():
        raise OutputError(f"{out} has no recorded manifest; give it: kneebatch status {out} "
                          "MANIFEST")
    return dict.fromkeys(sorted(p.name for p in base.iterdir())), []  # written by `extract`


def cohort_status(out: Path, manifest: Path | None = None) -> CohortStatus:
    """The status of every subject of ``manifest`` (default: the last run's; for a folder written
    by ``extract`` alone, its subject folders) in ``out``.

    Raises:
        OutputError: OUT is not a kneebatch folder, or no manifest is known.
        ManifestError: ``manifest`` cannot be read.
    """
    check_owned(out)
    keys, bad_rows = _expected(out, manifest)
    failures = subject_failures(out)
    finished: list[str] = []
    pending: list[str] = []
    running: dict[str, Holder] = {}
    failed: dict[str, FailureRecord] = {}
    for subject_id, key in keys.items():
        who = holder(out, subject_id)
        if who is not None:
            running[subject_id] = who
            continue
        if key is None:
            done = read_done(subject_dir(out, subject_id))
            key = done.key if done else ""
        state = result_state(out, subject_id, key)
        if state is State.FINISHED:
            finished.append(subject_id)
        elif state is State.DAMAGED:
            failed[subject_id] = FailureRecord(
                subject_id, f"Subject {subject_id}: {result_problem(out, subject_id)}. Rerun "
                "`kneebatch run` to compute it again.", "result")
        elif subject_id in failures:
            failed[subject_id] = failures[subject_id]
        else:
            pending.append(subject_id)
    runs = run_records(out)
    latest = max(runs, key=lambda r: r.started) if runs else None
    return CohortStatus(finished, failed, running, pending, latest,
                        _rate(out, latest, finished) if latest else None, bad_rows,
                        run_state(out, latest) if latest else "")


def _rate(out: Path, run: RunRecord, finished: list[str]) -> float | None:
    """Subjects per hour the run finished, from its start to its end (or now, if it is going)."""
    started = _parse_time(run.started)
    ended = _parse_time(run.ended) if run.ended else datetime.now(timezone.utc)
    done = 0
    for subject_id in finished:
        record = read_done(subject_dir(out, subject_id))
        done += record is not None and record.run_id == run.run_id
    if not done or started is None or ended is None or ended <= started:
        return None
    return 3600.0 * done / (ended - started).total_seconds()
