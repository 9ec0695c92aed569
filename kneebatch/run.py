"""Run stage: fan a manifest's subjects out over dask, resume what is finished, gather the results."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision

from kneebatch import __version__
from kneebatch.claims import holder
from kneebatch.cluster import Connection
from kneebatch.config import ExtractionConfig
from kneebatch.errors import ConfigError
from kneebatch.failures import clear_failure, save_failure, save_row_problems
from kneebatch.gather import gather_run
from kneebatch.key import subject_key
from kneebatch.manifest import RowProblem, SubjectSpec, parse_manifest
from kneebatch.model import read_model_info
from kneebatch.outdir import check_settings, claim_out, save_manifest, save_run_record
from kneebatch.records import FailureRecord, ManifestRecord, RunRecord, SettingsRecord
from kneebatch.store import State, result_state
from kneebatch.subject import SubjectOutcome, process_subject

log = logging.getLogger(__name__)

RETRIES = 2  # a subject whose worker died is run again on another worker this many times


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
             threads: int, qc: bool, run_id: str, overwrite: bool) -> SubjectOutcome:
    """The task a worker runs: set this process's threads once, then process the subject."""
    from distributed import get_worker

    from kneebatch.runtime import configure_compute

    configure_compute(threads)
    limit = get_worker().memory_manager.memory_limit
    return process_subject(spec, config, model_path, out, run_id=run_id,
                           memory_limit_bytes=limit or None, qc=qc, overwrite=overwrite)


def _stage_totals(outcomes: list[SubjectOutcome]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for outcome in outcomes:
        for stage, seconds in outcome.timings_s.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return {k: round(v, 3) for k, v in sorted(totals.items())}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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

    Returns:
        Counts and timing.

    Raises:
        WeightsError, ConfigError, OutputError: nothing could run (bad model, options, output,
            results of other settings in ``out``).
    """
    from kneebatch.cluster import ClusterSpec, open_client

    config = config or ExtractionConfig()
    out, model_path = Path(out), Path(model_path)
    problems = list(manifest_problems or [])
    if isinstance(manifest, list):
        manifest_path, specs = None, manifest
    else:
        manifest_path = Path(manifest)
        specs, found = parse_manifest(manifest_path)
        problems += found
    mine = shard(specs, part)
    info = read_model_info(model_path)
    if info.weights.startswith("random"):
        log.warning("MODEL WEIGHTS ARE RANDOM (%s): these features are for testing only",
                    info.weights)
    config_hash = config.hash()
    claim_out(out)
    check_settings(out, SettingsRecord(config_hash, info.sha256, info.weights, config.to_dict()),
                   overwrite=overwrite)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    keys = {s.subject_id: subject_key(s, config_hash, info.sha256) for s in specs}
    save_manifest(out, ManifestRecord(keys, str(manifest_path.resolve()) if manifest_path else None,
                                      _sha256(manifest_path) if manifest_path else None))
    states = {s.subject_id: result_state(out, s.subject_id, keys[s.subject_id]) for s in mine}
    todo = [s for s in mine if overwrite or states[s.subject_id] is not State.FINISHED]
    changed = sum(states[s.subject_id] in (State.CHANGED, State.DAMAGED) for s in todo)
    if len(mine) > len(todo):
        log.info("skipping %d subject(s) already finished with these inputs and settings "
                 "(--overwrite recomputes them)", len(mine) - len(todo))
    if changed:
        log.info("redoing %d subject(s) whose inputs, settings or result files changed", changed)
    save_row_problems(out, problems, run_id)
    outcomes: list[SubjectOutcome] = []
    stopped = False
    if todo:
        def consume(connection: Connection) -> bool:
            return _consume(connection, todo, config, model_path, out, run_id, qc, overwrite,
                            outcomes, on_progress, stop)

        if client is not None:
            # A cluster we did not start: each of its task slots is one CPU unless told otherwise.
            stopped = consume(Connection(client, getattr(cluster, "threads_per_worker", 0) or 1))
        else:
            with open_client(cluster or ClusterSpec()) as connection:
                stopped = consume(connection)
    ok = sum(o.ok for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    skipped = len(mine) - len(todo) + sum(o.status == "skipped" for o in outcomes)
    wall_s = time.perf_counter() - t0
    record = RunRecord(
        run_id=run_id, started=started.isoformat(timespec="seconds"),
        ended=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config_hash=config_hash, config=config.to_dict(), model_sha256=info.sha256,
        weights=info.weights,
        versions={"kneebatch": __version__, "torch": torch.__version__,
                  "torchvision": torchvision.__version__},
        model_built_with={"torch": info.torch, "torchvision": info.torchvision,
                          "kneebatch": info.kneebatch},
        manifest=str(manifest_path) if manifest_path else None, shard=part,
        counts={"total": len(mine) + len(problems), "ok": ok, "failed": failed + len(problems),
                "skipped": skipped, "changed": changed},
        stage_seconds=_stage_totals(outcomes), wall_s=round(wall_s, 2), stopped=stopped)
    save_run_record(out, record)
    pending = left_out = 0
    if gather_results:
        result = gather_run(out, record, keep_larger=stopped)
        pending, left_out = len(result.pending), result.left_out
    return RunSummary(run_id, len(mine) + len(problems), ok, failed + len(problems), skipped,
                      wall_s, out, stopped, changed, pending, left_out)


def _consume(connection: Connection, todo: list[SubjectSpec], config: ExtractionConfig,
             model_path: Path, out: Path, run_id: str, qc: bool, overwrite: bool,
             outcomes: list[SubjectOutcome], on_progress: Callable[[SubjectOutcome], None] | None,
             stop: threading.Event | None) -> bool:
    """Submit the subjects, settle each as it finishes; True if ``stop`` cut the run short.

    A subject another process holds comes back ``claimed``; it is submitted again once that
    claim is released, and then either found finished (skipped) or computed here.
    """
    from distributed import as_completed

    client = connection.client
    by_key: dict[str, SubjectSpec] = {}
    round_ = 0

    def submit(specs: list[SubjectSpec]) -> list[Any]:
        nonlocal round_
        round_ += 1
        futures = client.map(
            _run_one, specs, config=config, model_path=model_path.resolve(), out=out.resolve(),
            threads=connection.threads, qc=qc, run_id=run_id, overwrite=overwrite,
            key=[f"kneebatch-{run_id}-{round_}-{s.subject_id}" for s in specs],
            retries=RETRIES, pure=False, resources=connection.resources)
        by_key.update({str(f.key): s for f, s in zip(futures, specs, strict=True)})
        return futures

    futures = submit(todo)
    pending = as_completed(futures)
    waiting: list[SubjectSpec] = []
    last_check = 0.0
    while not pending.is_empty() or waiting:
        if stop is not None and stop.is_set():
            unfinished = [f for f in futures if not f.done()]
            log.warning("stop requested: cancelling %d unfinished subject(s); rerun the same "
                        "command to finish them", len(unfinished))
            client.cancel(unfinished)
            return True
        batch = pending.next_batch(block=False)
        for future in batch:
            spec = by_key[str(future.key)]
            try:
                outcome = future.result()
            except Exception as exc:  # the worker died RETRIES + 1 times, or dask failed
                outcome = SubjectOutcome(spec.subject_id, "failed", (
                    f"Subject {spec.subject_id}: its worker failed ({type(exc).__name__}: "
                    f"{exc}). Often out of memory: give workers more memory or fewer "
                    "threads, then rerun (finished subjects are kept)."), "worker")
            if outcome.status == "claimed":
                waiting.append(spec)
                continue
            _settle(out, spec, outcome, run_id)
            outcomes.append(outcome)
            if on_progress:
                on_progress(outcome)
        if waiting and time.monotonic() - last_check > 1.0:
            last_check = time.monotonic()
            free = [s for s in waiting if holder(out, s.subject_id) is None]
            if free:
                waiting = [s for s in waiting if s not in free]
                again = submit(free)
                futures += again
                pending.update(again)
            elif pending.is_empty():
                log.info("waiting for %d subject(s) another run is computing", len(waiting))
        if not batch:
            time.sleep(0.2)
    return False


def _settle(out: Path, spec: SubjectSpec, outcome: SubjectOutcome, run_id: str) -> None:
    if outcome.status in ("finished", "skipped"):
        clear_failure(out, spec.subject_id)
        return
    save_failure(out, FailureRecord(
        spec.subject_id, outcome.error or "", outcome.stage or "", str(spec.ct), str(spec.mask),
        datetime.now(timezone.utc).isoformat(timespec="seconds"), run_id))
