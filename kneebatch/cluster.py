"""Cluster stage: the dask client a cohort runs on.

A ``distributed.LocalCluster`` sized from the CPUs and memory this job may use (default), or an
existing scheduler (``--scheduler-file`` / ``--scheduler-address``). Only this module and ``run``
import dask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from kneebatch.errors import ConfigError
from kneebatch.runtime import usable_cpus

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where a cohort runs.

    Attributes:
        workers: worker processes of a LocalCluster (0: from the CPUs).
        threads_per_worker: compute threads per worker (0: CPUs / workers; on a joined scheduler
            1 per task slot).
        scheduler_file, scheduler_address: join this scheduler instead of starting one.
        memory_limit_bytes: per worker (0: the job's memory / workers).
    """

    workers: int = 0
    threads_per_worker: int = 0
    scheduler_file: str | None = None
    scheduler_address: str | None = None
    memory_limit_bytes: int = 0


def job_memory_bytes() -> int:
    """Memory this job may use: ``SLURM_MEM_PER_NODE`` (MB) if set, else the machine's."""
    slurm = os.environ.get("SLURM_MEM_PER_NODE", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm) * 1024**2
    import psutil

    return int(psutil.virtual_memory().total)


def layout(spec: ClusterSpec) -> tuple[int, int]:
    """(workers, threads per worker) such that workers x threads <= the usable CPUs.

    One worker per CPU pair by default: reading and preprocessing are mostly single-threaded, so
    two-thread workers keep both busy without tripling the memory of one-thread workers.
    """
    cpus = usable_cpus()
    if spec.workers < 0 or spec.threads_per_worker < 0:
        raise ConfigError("--workers and --threads-per-worker must be positive.")
    workers = spec.workers or max(1, cpus // (spec.threads_per_worker or 2))
    threads = spec.threads_per_worker or max(1, cpus // workers)
    if workers * threads > cpus:
        log.warning("%d workers x %d threads exceed the %d usable CPUs; expect slowdowns",
                    workers, threads, cpus)
    return workers, threads


@contextlib.contextmanager
def open_client(spec: ClusterSpec) -> Iterator[tuple[Client, int]]:
    """A connected client and the compute threads each task should use.

    Raises:
        ConfigError: the scheduler cannot be reached.
    """
    if spec.scheduler_file or spec.scheduler_address:
        target = spec.scheduler_file or spec.scheduler_address
        try:
            client = (Client(scheduler_file=spec.scheduler_file, timeout="60s")
                      if spec.scheduler_file else Client(spec.scheduler_address, timeout="60s"))
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(
                f"Cannot reach the dask scheduler at {target} ({exc}). Start one first, e.g. "
                "`dask scheduler --scheduler-file sched.json` and `dask worker --scheduler-file "
                "sched.json --nthreads 2`, or drop the option to run on this node."
            ) from exc
        with client:
            log.info("joined scheduler %s with %d workers", target,
                     len(client.scheduler_info().get("workers", {})))
            yield client, spec.threads_per_worker or 1
        return
    workers, threads = layout(spec)
    memory = spec.memory_limit_bytes or job_memory_bytes() // workers
    log.info("starting a LocalCluster: %d worker(s) x %d thread(s), %.1f GiB each (CPUs usable: "
             "%d)", workers, threads, memory / GIB, usable_cpus())
    env = {v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      memory_limit=memory, dashboard_address=None, env=env) as cluster, \
            Client(cluster) as client:
        yield client, threads
