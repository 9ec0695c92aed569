"""Run stage: fan a manifest's subjects out over dask, resume what is finished, gather the results."""

from __future__ import annotations

import dataclasses
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
from kneebatch.cluster import Connection
from kneebatch.config import ExtractionConfig
from kneebatch.errors import ConfigError, OutputError
from kneebatch.gather import gather_run
from kneebatch.manifest import RowProblem, SubjectSpec, parse_manifest
from kneebatch.model import read_model_info
from kneebatch.records import (
    clear_failure,
    record_failure,
    record_manifest_problems,
    save_run_record,
)
from kneebatch.store import is_finished, remove_temporaries
from kneebatch.subject import SubjectOutcome, process_subject

log = logging.getLogger(__name__)

RETRIES = 2  # a subject whose worker died is run again on another worker this many times


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a cohort run did."""

    run_id: str
    total: int
    ok: int
    failed: int
    skipped: int
    wall_s: float
    out: Path
    stopped: bool = False

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
             threads: int, qc: bool) -> SubjectOutcome:
    """The task a worker runs: set this process's threads once, then process the subject."""
    from distributed import get_worker

    from kneebatch.runtime import configure_compute

    configure_compute(threads)
    limit = get_worker().memory_manager.memory_limit
    return process_subject(spec, config, model_path, out, memory_limit_bytes=limit or None, qc=qc)


def _stage_totals(outcomes: list[SubjectOutcome]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for outcome in outcomes:
        for stage, seconds in outcome.timings_s.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return {k: round(v, 3) for k, v in sorted(totals.items())}


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
) -> RunSummary:
    """Process a cohort on dask and gather it into Parquet.

    Args:
        manifest: a manifest CSV, or subjects from ``read_manifest`` (possibly sharded).
        out: output folder (created).
        model_path: model file from ``kneebatch build-model``.
        config: extraction settings (defaults from DESIGN.md).
        client: a connected ``distributed.Client`` to use (e.g. from dask-jobqueue); else one is
            opened from ``cluster``.
        cluster: a ``ClusterSpec`` (default: a LocalCluster sized from this machine).
        overwrite: recompute finished subjects too.
        on_progress: called with each subject's outcome as it finishes.
        stop: when set (e.g. by a SIGTERM handler), unfinished subjects are cancelled, what is
            finished is gathered, and the summary says ``stopped``.
        gather_results: build the Parquet datasets and run.json at the end (array shards leave
            it to one ``kneebatch gather`` after all of them).
        manifest_problems: unusable manifest rows (from ``parse_manifest``), listed in
            ``failures.csv`` and counted as failed.
        qc: write each subject's ``qc.png`` as it finishes.

    Returns:
        Counts and timing.

    Raises:
        WeightsError, ConfigError, OutputError: nothing could run (bad model, options, output).
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
    info = read_model_info(model_path)
    if info.weights.startswith("random"):
        log.warning("MODEL WEIGHTS ARE RANDOM (%s): these features are for testing only",
                    info.weights)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create output folder {out}: {exc.strerror}. Choose a "
                          "writable --out.") from exc
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    config_hash = config.hash()
    todo = [s for s in specs
            if overwrite or not is_finished(out, s.subject_id, config_hash, info.sha256)]
    skipped = len(specs) - len(todo)
    if skipped:
        log.info("skipping %d subject(s) already finished with these settings (--overwrite "
                 "recomputes them)", skipped)
    remove_temporaries(out, [s.subject_id for s in todo])  # left by a killed earlier run
    record_manifest_problems(out, problems)
    outcomes: list[SubjectOutcome] = []
    stopped = False
    if todo:
        def consume(connection: Connection) -> bool:
            return _consume(connection, todo, config, model_path, out, run_id, qc, outcomes,
                            on_progress, stop)

        if client is not None:
            # A cluster we did not start: each of its task slots is one CPU unless told otherwise.
            stopped = consume(Connection(client, getattr(cluster, "threads_per_worker", 0) or 1))
        else:
            with open_client(cluster or ClusterSpec()) as connection:
                stopped = consume(connection)
    ok = sum(o.ok for o in outcomes)
    summary = RunSummary(run_id, len(specs) + len(problems), ok,
                         len(outcomes) - ok + len(problems), skipped, time.perf_counter() - t0, out,
                         stopped)
    record = {"run_id": run_id, "model_sha256": info.sha256, "weights": info.weights,
              "config_hash": config_hash, "config": config.to_dict(),
              "versions": {"kneebatch": __version__, "torch": torch.__version__,
                           "torchvision": torchvision.__version__},
              "model_built_with": {"torch": info.torch, "torchvision": info.torchvision,
                                   "kneebatch": info.kneebatch},
              "started": started.isoformat(timespec="seconds"),
              "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "manifest": str(manifest_path) if manifest_path else None,
              "counts": {"total": summary.total, "ok": ok, "failed": summary.failed,
                         "skipped": skipped},
              "stage_seconds": _stage_totals(outcomes), "wall_s": round(summary.wall_s, 2),
              "stopped": stopped}
    save_run_record(out, record)
    if gather_results:
        gather_run(out, record)
    return summary


def _consume(connection: Connection, todo: list[SubjectSpec], config: ExtractionConfig,
             model_path: Path, out: Path, run_id: str, qc: bool, outcomes: list[SubjectOutcome],
             on_progress: Callable[[SubjectOutcome], None] | None,
             stop: threading.Event | None) -> bool:
    """Submit the subjects, settle each as it finishes; True if ``stop`` cut the run short."""
    from distributed import as_completed

    client = connection.client
    futures = client.map(
        _run_one, todo, config=config, model_path=model_path.resolve(), out=out.resolve(),
        threads=connection.threads, qc=qc, key=[f"kneebatch-{run_id}-{s.subject_id}" for s in todo],
        retries=RETRIES, pure=False, resources=connection.resources)
    by_key = {f.key: s for f, s in zip(futures, todo, strict=True)}
    pending = as_completed(futures)
    while not pending.is_empty():
        if stop is not None and stop.is_set():
            unfinished = [f for f in futures if not f.done()]
            log.warning("stop requested: cancelling %d unfinished subject(s); rerun the same "
                        "command to finish them", len(unfinished))
            client.cancel(unfinished)
            return True
        batch = pending.next_batch(block=False)
        if not batch:
            time.sleep(0.2)
        for future in batch:
            spec = by_key[future.key]
            try:
                outcome = future.result()
            except Exception as exc:  # the worker died RETRIES + 1 times, or dask failed
                outcome = SubjectOutcome(spec.subject_id, False, (
                    f"Subject {spec.subject_id}: its worker failed ({type(exc).__name__}: "
                    f"{exc}). Often out of memory: give workers more memory or fewer "
                    "threads, then rerun (finished subjects are kept)."), "worker")
            _settle(out, spec, outcome)
            outcomes.append(outcome)
            if on_progress:
                on_progress(outcome)
    return False


def _settle(out: Path, spec: SubjectSpec, outcome: SubjectOutcome) -> None:
    if outcome.ok:
        clear_failure(out, spec.subject_id)
        return
    record_failure(out, spec.subject_id, {
        "subject_id": spec.subject_id, "error": outcome.error, "stage": outcome.stage,
        "ct": str(spec.ct), "mask": str(spec.mask),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
