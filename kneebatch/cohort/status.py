"""Status of a cohort in OUT, read from the files alone (no scheduler): which subjects are finished,
failed, running (and where, from the claims) or pending, the rate of the latest run and an ETA.
Safe while a run is going, on any file system that holds OUT.
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
from kneebatch.outdir.failures import subject_failures
from kneebatch.outdir.folder import check_owned, folder_settings, read_manifest_record, run_records
from kneebatch.outdir.key import subject_key
from kneebatch.outdir.records import FailureRecord, RunRecord
from kneebatch.results.subject_files import State, read_done, result_state, subject_dir


@dataclasses.dataclass(frozen=True)
class CohortStatus:
    """Where each subject of the manifest stands.

    Attributes:
        finished: subjects with a current result.
        failed: subject -> its recorded failure.
        running: subject -> who computes it now.
        pending: the rest.
        run: the latest run's record (None before any run).
        rate_per_h: subjects the latest run finished per hour (None before its first one).
    """

    finished: list[str]
    failed: dict[str, FailureRecord]
    running: dict[str, Holder]
    pending: list[str]
    run: RunRecord | None
    rate_per_h: float | None

    @property
    def eta_s(self) -> float | None:
        """Seconds until the running and pending subjects are done at the latest run's rate."""
        left = len(self.running) + len(self.pending)
        return 3600.0 * left / self.rate_per_h if self.rate_per_h else None

    def failures_by_stage(self) -> dict[str, int]:
        """Stage -> how many subjects failed there."""
        return dict(collections.Counter(r.stage for r in self.failed.values()).most_common())


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def cohort_status(out: Path, manifest: Path | None = None) -> CohortStatus:
    """The status of every subject of ``manifest`` (default: the last run's) in ``out``.

    Raises:
        OutputError: OUT is not a kneebatch folder, or no manifest is known.
        ManifestError: ``manifest`` cannot be read.
    """
    check_owned(out)
    settings = folder_settings(out)
    if manifest is not None:
        if settings is None:
            raise OutputError(f"{out} has no results yet; start with `kneebatch run`.")
        runs = run_records(out)
        labels = LabelMap.parse(runs[-1].labels) if runs and runs[-1].labels else None
        specs, _ = parse_manifest(manifest, labels)  # the label map the last run used
        keys = {s.subject_id: subject_key(s, settings.config_hash, settings.model_sha256)
                for s in specs}
    else:
        record = read_manifest_record(out)
        if record is None:
            raise OutputError(f"{out} has no recorded manifest; give it: kneebatch status {out} "
                              "MANIFEST")
        keys = record.subjects
    failures = subject_failures(out)
    finished, pending, running, failed = [], [], {}, {}
    for subject_id, key in keys.items():
        who = holder(out, subject_id)
        if who is not None:
            running[subject_id] = who
        elif result_state(out, subject_id, key) is State.FINISHED:
            finished.append(subject_id)
        elif subject_id in failures:
            failed[subject_id] = failures[subject_id]
        else:
            pending.append(subject_id)
    runs = run_records(out)
    latest = max(runs, key=lambda r: r.started) if runs else None
    return CohortStatus(finished, failed, running, pending, latest,
                        _rate(out, latest, finished) if latest else None)


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
