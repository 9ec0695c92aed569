"""Scheduling a cohort's subjects on a dask cluster: no more in flight than the cluster has slots,
each settled as it finishes (``distributed.wait(..., return_when="FIRST_COMPLETED")``, no polling),
subjects another process holds fed again once it lets go."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distributed import Client, wait

from kneebatch.cohort.cluster import Connection
from kneebatch.cohort.outcome import SubjectOutcome
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.outdir.claims import holder
from kneebatch.outdir.failures import clear_failure, current_failures, save_failure, write_failures_csv
from kneebatch.outdir.folder import HEARTBEAT_S, heartbeat
from kneebatch.outdir.records import FailureRecord

log = logging.getLogger(__name__)

FAILURES_EVERY_S = 10.0  # failures.csv is rewritten as failures come in, at most this often
WAKE_S = 0.5  # the loop wakes this often without a finished subject: a stop, a released claim
SLOTS_EVERY_S = 2.0  # an adaptive cluster's size is asked for at most this often
CLAIMS_EVERY_S = 1.0  # subjects another process holds are looked at again this often


def _slots(client: Client) -> int:
    """Subjects the cluster can run at once: one per worker that offers the ``subject``
    resource, else one per thread (at least 1, so an adaptive cluster gets its first job)."""
    workers = client.scheduler_info().get("workers", {}).values()
    return max(1, sum(int(w.get("resources", {}).get("subject", 0) or w.get("nthreads", 1))
                      for w in workers))


def _died(spec: SubjectSpec, exc: BaseException) -> SubjectOutcome:
    return SubjectOutcome(spec.subject_id, "failed", (
        f"Subject {spec.subject_id}: its worker died while running it, twice "
        f"({type(exc).__name__}). Often out of memory: give workers more memory "
        "(--memory-per-worker, sbatch --mem) or fewer threads, then rerun (finished "
        "subjects are kept)."), "worker")


def settle(out: Path, spec: SubjectSpec, outcome: SubjectOutcome, run_id: str) -> bool:
    """Record a subject's outcome in OUT's failure records; True when ``failures.csv`` changed."""
    if outcome.status in ("finished", "skipped"):
        return clear_failure(out, spec.subject_id)
    save_failure(out, FailureRecord(
        spec.subject_id, outcome.error or "", outcome.stage or "", str(spec.ct), str(spec.mask),
        datetime.now(timezone.utc).isoformat(timespec="seconds"), run_id))
    return True


def consume(connection: Connection, todo: list[SubjectSpec],
            task: Callable[[SubjectSpec], SubjectOutcome], *, out: Path, run_id: str,
            subjects: list[str], outcomes: list[SubjectOutcome],
            on_progress: Callable[[SubjectOutcome], None] | None = None,
            stop: threading.Event | None = None) -> bool:
    """Feed the subjects to the cluster and settle each as it finishes.

    No more subjects are in flight than the cluster has slots, so none waits in a busy worker's
    queue: when a worker dies, only the subject it was running is blamed (and retried once). A
    subject another process holds comes back ``claimed``; it is fed again once that claim is
    released, and then either found finished (skipped) or computed here. ``failures.csv`` is
    rewritten as failures come in (at most every ``FAILURES_EVERY_S``).

    Args:
        task: computes one subject on a worker (a picklable callable).
        subjects: every subject of the manifest (for ``failures.csv``).
        outcomes: each settled subject's outcome is appended here.

    Returns:
        True if ``stop`` cut the run short (running subjects cancelled).
    """
    client = connection.client
    by_key: dict[str, SubjectSpec] = {}
    queue = list(todo)
    waiting: list[SubjectSpec] = []
    in_flight: list[Any] = []
    rounds = 0
    slots, slots_at = 0, -SLOTS_EVERY_S

    def feed() -> None:
        nonlocal rounds, slots, slots_at
        if not queue:
            return
        now = time.monotonic()
        if len(in_flight) >= slots and now - slots_at >= SLOTS_EVERY_S:
            slots, slots_at = _slots(client), now
        free = slots - len(in_flight)
        if free <= 0:
            return
        batch, queue[:free] = queue[:free], []
        rounds += 1
        futures = client.map(
            task, batch, threads=connection.threads,
            key=[f"kneebatch-{run_id}-{rounds}-{s.subject_id}" for s in batch],
            pure=False, resources=connection.resources)
        by_key.update({str(f.key): s for f, s in zip(futures, batch, strict=True)})
        in_flight.extend(futures)

    feed()
    last_claims = last_csv = last_beat = 0.0
    stale_csv = False
    while in_flight or queue or waiting:
        if time.monotonic() - last_beat > HEARTBEAT_S:
            last_beat = time.monotonic()
            heartbeat(out, run_id)
        if stop is not None and stop.is_set():
            log.warning("stop requested: cancelling %d running subject(s), %d not started; "
                        "rerun the same command to finish them", len(in_flight),
                        len(queue) + len(waiting))
            client.cancel(in_flight)
            return True
        done: set[Any] = set()
        if in_flight:
            with contextlib.suppress(TimeoutError):  # nothing finished within WAKE_S
                done = set(wait(in_flight, timeout=WAKE_S, return_when="FIRST_COMPLETED").done)
        else:
            time.sleep(WAKE_S)  # only subjects another process holds: look again soon
        for future in [f for f in in_flight if f in done]:
            in_flight.remove(future)
            spec = by_key[str(future.key)]
            try:
                outcome = future.result()
            except Exception as exc:  # the worker died twice while running this subject
                outcome = _died(spec, exc)
            if outcome.status == "claimed":
                waiting.append(spec)
                continue
            stale_csv |= settle(out, spec, outcome, run_id)
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
        if waiting and now - last_claims > CLAIMS_EVERY_S:
            last_claims = now
            free = [s for s in waiting if holder(out, s.subject_id) is None]
            waiting = [s for s in waiting if s not in free]
            queue.extend(free)
            if not free and not in_flight and not queue:
                log.info("waiting for %d subject(s) another run is computing", len(waiting))
        if done or queue:
            feed()
    return False
