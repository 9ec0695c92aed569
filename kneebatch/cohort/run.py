"""Run stage: fan a manifest's subjects out over dask, resume what is finished, gather the results."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from distributed import Client, get_worker

from kneebatch import __version__
from kneebatch.cohort.cluster import ClusterSpec, Connection, open_client, subject_resources
from kneebatch.cohort.outcome import SubjectOutcome
from kneebatch.cohort.scheduling import consume
from kneebatch.config import READ_TIMEOUT_S, SUBJECT_TIMEOUT_S, ExtractionConfig
from kneebatch.errors import ConfigError
from kneebatch.inputs.extras import column_types
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import RowProblem, SubjectSpec, parse_manifest
from kneebatch.network.options import FAST, ForwardOptions, check_precision
from kneebatch.network.provenance import file_sha256, our_model_info
from kneebatch.outdir.failures import (
    current_failures,
    save_row_problems,
    write_failures_csv,
)
from kneebatch.outdir.folder import (
    open_out,
    read_manifest_record,
    refuse_other_settings,
    save_manifest,
    save_run_record,
    unwritable,
)
from kneebatch.outdir.key import legacy_key, subject_key
from kneebatch.outdir.records import Counts, ManifestRecord, RunRecord, SettingsRecord
from kneebatch.results.gather import gather_run
from kneebatch.results.subject_files import State, read_done, result_state, subject_dir
from kneebatch.runtime import configure_compute

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What a cohort run computes and how; recorded in run.json (``options``).

    Attributes:
        config: the extraction settings.
        labels: the mask values of tibia and femur (``--labels``); a manifest row's
            ``tibia_label`` / ``femur_label`` columns override it.
        overwrite: recompute finished subjects too, and replace results of other settings.
        part: only the subjects of shard ``I/N``; the whole manifest is still recorded, so a
            gather after all shards takes every subject.
        qc: write each subject's ``qc.png`` as it finishes.
        gather_results: build the Parquet datasets and run.json at the end (array shards leave
            it to one ``kneebatch gather`` after all of them).
        read_timeout_s: a file that gives no answer for this long fails its subject.
        subject_timeout_s: a subject still computing after this long fails (stage ``timeout``).
        forward: the forward pass's fast-path switches (``ForwardOptions.plain()`` to debug).
        column_types: declared types of the manifest's extra columns (``--column-types``); the
            others are inferred.
    """

    config: ExtractionConfig = dataclasses.field(default_factory=ExtractionConfig)
    labels: LabelMap | None = None
    overwrite: bool = False
    part: str | None = None
    qc: bool = False
    gather_results: bool = True
    read_timeout_s: float = READ_TIMEOUT_S
    subject_timeout_s: float = SUBJECT_TIMEOUT_S
    forward: ForwardOptions = FAST
    column_types: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for run.json (the extraction settings are recorded beside it, in full)."""
        return {"labels": str(self.labels or LabelMap()), "overwrite": self.overwrite,
                "part": self.part, "qc": self.qc, "gather_results": self.gather_results,
                "read_timeout_s": self.read_timeout_s,
                "subject_timeout_s": self.subject_timeout_s, "forward": self.forward.to_dict(),
                "column_types": dict(self.column_types)}


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a cohort run did.

    Attributes:
        total: subjects of this run (its shard) plus unusable manifest rows.
        ok, failed: subjects computed now, and failed ones (rows included).
        skipped: subjects already finished (by an earlier or a concurrent run).
        changed: subjects redone because their inputs, settings or files changed.
        covariates_updated: finished subjects whose covariates (the manifest's extra columns)
            changed since the last run: joined anew at gather, not recomputed.
        pending: manifest subjects left without a result or a failure after the gather.
        left_out: folders under ``subjects/`` not in the manifest, left out of the Parquet.
        internal: subjects that failed with an unexpected error (a kneebatch bug).
    """

    run_id: str
    total: int
    ok: int
    failed: int
    skipped: int
    wall_s: float
    out: Path
    stopped: bool = False
    changed: int = 0
    pending: int = 0
    left_out: int = 0
    covariates_updated: int = 0
    internal: int = 0

    @property
    def knees_per_hour(self) -> float:
        """Subjects computed (not skipped) per hour of wall time."""
        return 3600.0 * (self.ok + self.failed) / self.wall_s if self.wall_s > 0 else 0.0


def shard(specs: list[SubjectSpec], part: str | None) -> list[SubjectSpec]:
    """Subjects of shard ``I/N`` (``specs[I::N]``, I from 0), or all of them.

    Raises:
        ConfigError: ``part`` is not ``I/N`` with 0 <= I < N.
    """
    if not part:
        return specs
    try:
        index, count = (int(x) for x in part.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ConfigError(f"--shard {part!r} must be I/N with 0 <= I < N, e.g. --shard 0/4 "
                          "(SLURM arrays: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).")
    return specs[index::count]


def _run_one(spec: SubjectSpec, options: RunOptions, model_path: Path, out: Path, run_id: str,
             threads: int) -> SubjectOutcome:
    """The task a worker runs: set this process's threads once, then process the subject."""
    from kneebatch.cohort.task import process_subject  # torch: imported on the workers only

    configure_compute(threads)
    limit = get_worker().memory_manager.memory_limit
    return process_subject(spec, options.config, model_path, out, run_id=run_id,
                           memory_limit_bytes=limit or None, qc=options.qc,
                           overwrite=options.overwrite, read_timeout_s=options.read_timeout_s,
                           subject_timeout_s=options.subject_timeout_s,
                           options=options.forward)


def _stage_totals(outcomes: list[SubjectOutcome]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for outcome in outcomes:
        for stage, seconds in outcome.timings_s.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return {k: round(v, 3) for k, v in sorted(totals.items())}


def _versions() -> dict[str, str]:
    """This environment's versions, read without importing torch (the driver never needs it)."""
    names = ("numpy", "SimpleITK", "torch", "torchvision", "distributed")
    return {"kneebatch": __version__, "python": platform.python_version(),
            **{name: metadata.version(name) for name in names}}


def _slurm_ids() -> dict[str, str]:
    names = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST")
    return {n.removeprefix("SLURM_").lower(): os.environ[n] for n in names if n in os.environ}


def run_cohort(
    manifest: Path | str | list[SubjectSpec],
    out: Path | str,
    model_path: Path | str,
    options: RunOptions | None = None,
    *,
    config: ExtractionConfig | None = None,
    client: Client | None = None,
    cluster: ClusterSpec | None = None,
    manifest_problems: list[RowProblem] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[SubjectOutcome], None] | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Process a cohort on dask and gather it into Parquet.

    Args:
        manifest: a manifest CSV, or the subjects of one (from ``read_manifest``).
        out: output folder (created and marked as kneebatch's).
        model_path: model file from ``kneebatch build-model``.
        options: what to compute and how (recorded in run.json); default ``RunOptions()``.
        config: the extraction settings: a shorthand for ``RunOptions(config=...)``.
        client: a connected ``distributed.Client`` to use (e.g. from dask-jobqueue); else one is
            opened from ``cluster``.
        cluster: a ``ClusterSpec`` (default: a LocalCluster sized from this machine).
        manifest_problems: unusable manifest rows (from ``parse_manifest``), listed in
            ``failures.csv`` and counted as failed.
        on_start: called with the number of subjects this run will compute (for progress).
        on_progress: called with each subject's outcome as it finishes.
        stop: when set (e.g. by a SIGTERM handler), unfinished subjects are cancelled, what is
            finished is gathered (never shrinking the Parquet), and the summary says ``stopped``.

    Returns:
        Counts and timing.

    Raises:
        WeightsError, ConfigError, OutputError: nothing could run (bad model, options, output,
            results of other settings in ``out``).
    """
    options = options or RunOptions()
    if config is not None:
        options = dataclasses.replace(options, config=config)
    config, labels, part, overwrite = options.config, options.labels, options.part, options.overwrite
    out, model_path = Path(out), Path(model_path)
    problems = list(manifest_problems or [])
    if isinstance(manifest, list):
        manifest_path, specs = None, manifest
    else:
        manifest_path = Path(manifest)
        specs, found = parse_manifest(manifest_path, labels)
        problems += found
    if not specs and not problems:
        raise ConfigError(f"Manifest {manifest_path} lists no subjects; add one row per knee.")
    mine = shard(specs, part)
    if part and not part.startswith("0/"):
        problems_here: list[RowProblem] = []  # unusable rows count in shard 0 only
    else:
        problems_here = problems
    check_precision(config.precision)  # a precision this CPU lacks: refused before anything runs
    info = our_model_info(model_path)  # sidecar and sha256; its tensors: ``_check_model``
    if info.source.is_random:
        log.warning("MODEL WEIGHTS ARE RANDOM (%s): these features are for testing only",
                    info.weights)
    config_hash = config.hash()
    settings = SettingsRecord(config_hash, info.sha256, info.weights, config.to_dict())
    refuse_other_settings(out, settings, overwrite=overwrite)  # before any cluster starts
    types = column_types(((s.subject_id, s.extra) for s in specs), options.column_types)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    keys = {s.subject_id: subject_key(s, config_hash, info.sha256) for s in specs}
    states = {s.subject_id: result_state(
        out, s.subject_id, keys[s.subject_id],
        functools.partial(legacy_key, s, config_hash, info.sha256)) for s in mine}
    todo = [s for s in mine if overwrite or states[s.subject_id] is not State.FINISHED]
    kept = [s for s in mine if not overwrite and states[s.subject_id] is State.FINISHED]
    outcomes: list[SubjectOutcome] = []
    slots: list[int] = []
    stopped = False
    # The model file's tensors are checked before OUT is touched: by the first task of the
    # workers this run starts here (they import torch for it, which they need anyway, and this
    # process never does), else here, before joining a cluster or submitting worker jobs.
    on_worker = client is None and (cluster or ClusterSpec()).local
    if todo and not on_worker:
        _check_model(model_path)
    with contextlib.ExitStack() as stack:
        connection = None
        if todo:
            connection = _connect(stack, client, cluster)
            if on_worker:
                connection.client.submit(_check_model, model_path.resolve(), pure=False,
                                         resources=connection.resources).result()
        run_id = open_out(out, settings, command="run", overwrite=overwrite)
        previous = read_manifest_record(out)
        manifest_record = ManifestRecord(
            keys, str(manifest_path.resolve()) if manifest_path else None,
            file_sha256(manifest_path) if manifest_path else None, types,
            {s.subject_id: s.extra for s in specs})
        save_manifest(out, manifest_record)
        updated = _covariates_updated(out, kept, previous)
        if updated:
            log.info("covariates updated for %d finished subject(s): joined at gather, no knee "
                     "recomputed", updated)
        changed = sum(states[s.subject_id] in (State.CHANGED, State.DAMAGED) for s in todo)
        if len(mine) > len(todo):
            log.info("skipping %d subject(s) already finished with these inputs and settings "
                     "(--overwrite recomputes them)", len(mine) - len(todo))
        if changed:
            log.info("redoing %d subject(s) whose inputs, settings or result files changed",
                     changed)
        save_row_problems(out, problems, run_id)
        try:
            write_failures_csv(out, current_failures(out, keys))
        except OSError as exc:
            raise unwritable(out, exc) from exc
        record = RunRecord(
            run_id=run_id, started=started.isoformat(timespec="seconds"),
            config_hash=config_hash, config=config.to_dict(), model_sha256=info.sha256,
            weights=info.weights, versions=_versions(),
            model_built_with={"torch": info.torch, "torchvision": info.torchvision,
                              "kneebatch": info.kneebatch},
            manifest=manifest_record.path, manifest_sha256=manifest_record.sha256,
            labels=str(labels or LabelMap()), command=list(sys.argv), host=socket.gethostname(),
            pid=os.getpid(),
            slurm=_slurm_ids(), shard=part, options=options.to_dict())
        save_run_record(out, record)  # a run in progress, for `kneebatch status`
        if on_start:
            on_start(len(todo))
        if connection is not None:
            task = functools.partial(_run_one, options=options, model_path=model_path.resolve(),
                                     out=out.resolve(), run_id=run_id)
            slots.append(len(connection.client.scheduler_info().get("workers", {})))
            stopped = consume(connection, todo, task, out=out, run_id=run_id,
                              subjects=list(keys), outcomes=outcomes, on_progress=on_progress,
                              stop=stop)
    ok = sum(o.ok for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    skipped = len(mine) - len(todo) + sum(o.status == "skipped" for o in outcomes)
    wall_s = time.perf_counter() - t0
    record = dataclasses.replace(
        record, ended=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        counts=Counts(total=len(mine) + len(problems_here), ok=ok,
                      failed=failed + len(problems_here), skipped=skipped, changed=changed),
        stage_seconds=_stage_totals(outcomes), wall_s=round(wall_s, 2), stopped=stopped,
        workers=slots[0] if slots else 0)
    save_run_record(out, record)
    pending = left_out = 0
    if options.gather_results:
        result = gather_run(out, record)
        pending, left_out = len(result.pending), result.left_out
    return RunSummary(run_id, len(mine) + len(problems_here), ok, failed + len(problems_here), skipped,
                      wall_s, out, stopped, changed, pending, left_out, updated,
                      sum(o.internal for o in outcomes))


def _connect(stack: contextlib.ExitStack, client: Client | None,
             cluster: ClusterSpec | None) -> Connection:
    """A connection to the given client (a cluster we did not start: each of its task slots is
    one CPU unless told otherwise), or to the cluster ``cluster`` describes, closed with
    ``stack``."""
    if client is not None:
        return Connection(client, getattr(cluster, "threads_per_worker", 0) or 1,
                          subject_resources(client))
    return stack.enter_context(open_client(cluster or ClusterSpec()))


def _check_model(model_path: Path) -> None:
    """``check_model_file``, importing torch where it runs (on a worker: with the modules its
    subjects need).

    Raises:
        WeightsError: the file is not a kneebatch model.
    """
    from kneebatch.cohort import task  # noqa: F401
    from kneebatch.network.modelfile import check_model_file

    check_model_file(model_path)


def _covariates_updated(out: Path, finished: list[SubjectSpec],
                        previous: ManifestRecord | None) -> int:
    """Finished subjects whose extra values differ from the last run's manifest (or, for a
    folder of an earlier version, from those the result was computed with)."""
    count = 0
    for spec in finished:
        if previous is not None and spec.subject_id in previous.extras:
            before = previous.extras[spec.subject_id]
        else:
            done = read_done(subject_dir(out, spec.subject_id))
            before = done.extra if done else spec.extra
        count += before != spec.extra
    return count
