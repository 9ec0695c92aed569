"""Run stage: fan a manifest's subjects out over dask, resume what is finished, gather the results."""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import torch
import torchvision

from kneebatch import __version__
from kneebatch.cohort.cluster import Connection
from kneebatch.cohort.outcome import SubjectOutcome
from kneebatch.cohort.task import process_subject
from kneebatch.config import ExtractionConfig
from kneebatch.errors import ConfigError
from kneebatch.inputs.extras import infer_types
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import RowProblem, SubjectSpec, parse_manifest
from kneebatch.network.modelfile import check_model_file
from kneebatch.network.options import FAST, ForwardOptions, compute_dtype
from kneebatch.network.weights import file_sha256
from kneebatch.outdir.claims import holder
from kneebatch.outdir.failures import (
    clear_failure,
    current_failures,
    save_failure,
    save_row_problems,
    write_failures_csv,
)
from kneebatch.outdir.folder import open_out, save_manifest, save_run_record, unwritable
from kneebatch.outdir.key import subject_key
from kneebatch.outdir.records import FailureRecord, ManifestRecord, RunRecord, SettingsRecord
from kneebatch.results.gather import gather_run
from kneebatch.results.subject_files import State, result_state
from kneebatch.scan.files import READ_TIMEOUT_S

log = logging.getLogger(__name__)

FAILURES_EVERY_S = 10.0  # failures.csv is rewritten as failures come in, at most this often


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a cohort run did.

    Attributes:
        total: subjects of this run (its shard) plus unusable manifest rows.
        ok, failed: subjects computed now, and failed ones (rows included).
        skipped: subjects already finished (by an earlier or a concurrent run).
        changed: subjects redone because their inputs, settings or files changed.
        pending: manifest subjects left without a result or a failure after the gather.
        left_out: folders under ``subjects/`` not in the manifest, left out of the Parquet.
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


def _run_one(spec: SubjectSpec, config: ExtractionConfig, model_path: Path, out: Path,
             threads: int, qc: bool, run_id: str, overwrite: bool,
             read_timeout_s: float, forward: ForwardOptions) -> SubjectOutcome:
    """The task a worker runs: set this process's threads once, then process the subject."""
    from distributed import get_worker

    from kneebatch.runtime import configure_compute

    configure_compute(threads)
    limit = get_worker().memory_manager.memory_limit
    return process_subject(spec, config, model_path, out, run_id=run_id,
                           memory_limit_bytes=limit or None, qc=qc, overwrite=overwrite,
                           read_timeout_s=read_timeout_s, options=forward)


def _stage_totals(outcomes: list[SubjectOutcome]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for outcome in outcomes:
        for stage, seconds in outcome.timings_s.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return {k: round(v, 3) for k, v in sorted(totals.items())}


def _versions() -> dict[str, str]:
    import distributed
    import numpy
    import SimpleITK

    return {"kneebatch": __version__, "python": platform.python_version(),
            "numpy": numpy.__version__, "SimpleITK": SimpleITK.Version.VersionString(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "distributed": distributed.__version__}


def _slurm_ids() -> dict[str, str]:
    names = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST")
    return {n.removeprefix("SLURM_").lower(): os.environ[n] for n in names if n in os.environ}


def run_cohort(
    manifest: Path | str | list[SubjectSpec],
    out: Path | str,
    model_path: Path | str,
    *,
    config: ExtractionConfig | None = None,
    client: Any = None,
    cluster: Any = None,
    overwrite: bool = False,
    on_progress: Callable[[SubjectOutcome], None] | None = None,
    stop: threading.Event | None = None,
    gather_results: bool = True,
    manifest_problems: list[RowProblem] | None = None,
    qc: bool = False,
    part: str | None = None,
    read_timeout_s: float = READ_TIMEOUT_S,
    on_start: Callable[[int], None] | None = None,
    forward: ForwardOptions = FAST,
    labels: LabelMap | None = None,
) -> RunSummary:
    """Process a cohort on dask and gather it into Parquet.

    Args:
        manifest: a manifest CSV, or the subjects of one (from ``read_manifest``).
        out: output folder (created and marked as kneebatch's).
        model_path: model file from ``kneebatch build-model``.
        config: extraction settings (defaults from DESIGN.md).
        client: a connected ``distributed.Client`` to use (e.g. from dask-jobqueue); else one is
            opened from ``cluster``.
        cluster: a ``ClusterSpec`` (default: a LocalCluster sized from this machine).
        overwrite: recompute finished subjects too, and replace results of other settings.
        on_progress: called with each subject's outcome as it finishes.
        stop: when set (e.g. by a SIGTERM handler), unfinished subjects are cancelled, what is
            finished is gathered (never shrinking the Parquet), and the summary says ``stopped``.
        gather_results: build the Parquet datasets and run.json at the end (array shards leave
            it to one ``kneebatch gather`` after all of them).
        manifest_problems: unusable manifest rows (from ``parse_manifest``), listed in
            ``failures.csv`` and counted as failed.
        qc: write each subject's ``qc.png`` as it finishes.
        part: only the subjects of shard ``I/N``; the whole manifest is still recorded, so a
            gather after all shards takes every subject.
        read_timeout_s: a file that gives no answer for this long fails its subject.
        on_start: called with the number of subjects this run will compute (for progress).
        forward: the forward pass's fast-path switches (``ForwardOptions.plain()`` to debug).
        labels: the mask values of tibia and femur (``--labels``); a manifest row's
            ``tibia_label`` / ``femur_label`` columns override it.

    Returns:
        Counts and timing.

    Raises:
        WeightsError, ConfigError, OutputError: nothing could run (bad model, options, output,
            results of other settings in ``out``).
    """
    from kneebatch.cohort.cluster import ClusterSpec, open_client, subject_resources

    config = config or ExtractionConfig()
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
    compute_dtype(config.precision)  # a precision this CPU lacks: refused before anything runs
    info = check_model_file(model_path)
    if info.source.is_random:
        log.warning("MODEL WEIGHTS ARE RANDOM (%s): these features are for testing only",
                    info.weights)
    config_hash = config.hash()
    run_id = open_out(out, SettingsRecord(config_hash, info.sha256, info.weights, config.to_dict()),
                      command="run", overwrite=overwrite)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    keys = {s.subject_id: subject_key(s, config_hash, info.sha256) for s in specs}
    manifest_record = ManifestRecord(keys, str(manifest_path.resolve()) if manifest_path else None,
                                     file_sha256(manifest_path) if manifest_path else None,
                                     infer_types(s.extra for s in specs))
    save_manifest(out, manifest_record)
    states = {s.subject_id: result_state(out, s.subject_id, keys[s.subject_id]) for s in mine}
    todo = [s for s in mine if overwrite or states[s.subject_id] is not State.FINISHED]
    changed = sum(states[s.subject_id] in (State.CHANGED, State.DAMAGED) for s in todo)
    if len(mine) > len(todo):
        log.info("skipping %d subject(s) already finished with these inputs and settings "
                 "(--overwrite recomputes them)", len(mine) - len(todo))
    if changed:
        log.info("redoing %d subject(s) whose inputs, settings or result files changed", changed)
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
        slurm=_slurm_ids(), shard=part)
    save_run_record(out, record)  # a run in progress, for `kneebatch status`
    if on_start:
        on_start(len(todo))
    outcomes: list[SubjectOutcome] = []
    stopped = False
    if todo:
        task = functools.partial(_run_one, config=config, model_path=model_path.resolve(),
                                 out=out.resolve(), qc=qc, run_id=run_id, overwrite=overwrite,
                                 read_timeout_s=read_timeout_s, forward=forward)

        def consume(connection: Connection) -> bool:
            return _consume(connection, todo, task, out, list(keys), outcomes, on_progress, stop)

        if client is not None:
            # A cluster we did not start: each of its task slots is one CPU unless told otherwise.
            stopped = consume(Connection(client, getattr(cluster, "threads_per_worker", 0) or 1,
                                         subject_resources(client)))
        else:
            with open_client(cluster or ClusterSpec()) as connection:
                stopped = consume(connection)
    ok = sum(o.ok for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    skipped = len(mine) - len(todo) + sum(o.status == "skipped" for o in outcomes)
    wall_s = time.perf_counter() - t0
    record = dataclasses.replace(
        record, ended=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        counts={"total": len(mine) + len(problems_here), "ok": ok,
                "failed": failed + len(problems_here),
                "skipped": skipped, "changed": changed},
        stage_seconds=_stage_totals(outcomes), wall_s=round(wall_s, 2), stopped=stopped)
    save_run_record(out, record)
    pending = left_out = 0
    if gather_results:
        result = gather_run(out, record, keep_larger=stopped)
        pending, left_out = len(result.pending), result.left_out
    return RunSummary(run_id, len(mine) + len(problems_here), ok, failed + len(problems_here), skipped,
                      wall_s, out, stopped, changed, pending, left_out)


def _slots(client: Any) -> int:
    """Subjects the cluster can run at once: one per worker that offers the ``subject``
    resource, else one per thread (at least 1, so an adaptive cluster gets its first job)."""
    workers = client.scheduler_info().get("workers", {}).values()
    return max(1, sum(int(w.get("resources", {}).get("subject", 0) or w.get("nthreads", 1))
                      for w in workers))


def _consume(connection: Connection, todo: list[SubjectSpec],
             task: Callable[..., SubjectOutcome], out: Path, subjects: list[str],
             outcomes: list[SubjectOutcome], on_progress: Callable[[SubjectOutcome], None] | None,
             stop: threading.Event | None) -> bool:
    """Feed the subjects to the cluster, settle each as it finishes; True if ``stop`` cut the
    run short.

    No more subjects are in flight than the cluster has slots, so none waits in a busy worker's
    queue: when a worker dies, only the subject it was running is blamed (and retried once).
    A subject another process holds comes back ``claimed``; it is fed again once that claim is
    released, and then either found finished (skipped) or computed here. ``failures.csv`` is
    rewritten as failures come in (at most every ``FAILURES_EVERY_S``).
    """
    from distributed import as_completed

    client = connection.client
    by_key: dict[str, SubjectSpec] = {}
    queue = list(todo)
    waiting: list[SubjectSpec] = []
    in_flight: list[Any] = []
    pending = as_completed()
    rounds = 0
    run_id = task.keywords["run_id"]  # type: ignore[attr-defined]

    def feed() -> None:
        nonlocal rounds
        free = _slots(client) - len(in_flight)
        if free <= 0 or not queue:
            return
        batch, queue[:free] = queue[:free], []
        rounds += 1
        futures = client.map(
            task, batch, threads=connection.threads,
            key=[f"kneebatch-{run_id}-{rounds}-{s.subject_id}" for s in batch],
            pure=False, resources=connection.resources)
        by_key.update({str(f.key): s for f, s in zip(futures, batch, strict=True)})
        in_flight.extend(futures)
        pending.update(futures)

    feed()
    last_check = last_csv = 0.0
    stale_csv = False
    while in_flight or queue or waiting:
        if stop is not None and stop.is_set():
            log.warning("stop requested: cancelling %d running subject(s), %d not started; "
                        "rerun the same command to finish them", len(in_flight),
                        len(queue) + len(waiting))
            client.cancel(in_flight)
            return True
        batch = pending.next_batch(block=False)
        for future in batch:
            in_flight.remove(future)
            spec = by_key[str(future.key)]
            try:
                outcome = future.result()
            except Exception as exc:  # the worker died twice while running this subject
                outcome = SubjectOutcome(spec.subject_id, "failed", (
                    f"Subject {spec.subject_id}: its worker died while running it, twice "
                    f"({type(exc).__name__}). Often out of memory: give workers more memory "
                    "(--memory-per-worker, sbatch --mem) or fewer threads, then rerun (finished "
                    "subjects are kept)."), "worker")
            if outcome.status == "claimed":
                waiting.append(spec)
                continue
            stale_csv |= _settle(out, spec, outcome, run_id)
            outcomes.append(outcome)
            if on_progress:
                on_progress(outcome)
        now = time.monotonic()
        if stale_csv and now - last_csv > FAILURES_EVERY_S:
            last_csv = now
            try:
                write_failures_csv(out, current_failures(out, subjects))
                stale_csv = False
            except OSError as exc:  # e.g. the disk is full: kept stale, tried again later
                log.warning("cannot update %s: %s", out / "failures.csv", exc)
        if waiting and now - last_check > 1.0:
            last_check = now
            free = [s for s in waiting if holder(out, s.subject_id) is None]
            waiting = [s for s in waiting if s not in free]
            queue.extend(free)
            if not free and not in_flight and not queue:
                log.info("waiting for %d subject(s) another run is computing", len(waiting))
        feed()
        if not batch:
            time.sleep(0.1)
    return False


def _settle(out: Path, spec: SubjectSpec, outcome: SubjectOutcome, run_id: str) -> bool:
    """Record a subject's outcome; True when ``failures.csv`` changed."""
    if outcome.status in ("finished", "skipped"):
        return clear_failure(out, spec.subject_id)
    save_failure(out, FailureRecord(
        spec.subject_id, outcome.error or "", outcome.stage or "", str(spec.ct), str(spec.mask),
        datetime.now(timezone.utc).isoformat(timespec="seconds"), run_id))
    return True
