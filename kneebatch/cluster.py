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
from typing import Any

from distributed import Client, LocalCluster

from kneebatch.errors import ConfigError
from kneebatch.runtime import usable_cpus

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """Worker jobs that dask-jobqueue's ``SLURMCluster`` submits (``--cluster slurm``).

    Attributes:
        cores, memory, walltime: per worker job (``memory`` like ``32GB``).
        partition, account: ``#SBATCH -p`` / ``-A`` (None: the site's default).
        directives: further ``#SBATCH`` lines, e.g. ``--qos=long``.
        max_jobs: at most this many worker jobs at once (adaptive between 1 and this).
        lifetime: a worker retires after this long (default: walltime minus 10 minutes) and a
            fresh job replaces it, so no subject is cut by the walltime.
    """

    cores: int = 8
    memory: str = "32GB"
    walltime: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    directives: tuple[str, ...] = ()
    max_jobs: int = 4
    lifetime: str | None = None


def _lifetime(walltime: str) -> str:
    """Walltime (``[D-]HH:MM:SS`` or minutes) minus 10 minutes, as dask's ``--lifetime``."""
    days, _, clock = walltime.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:
        parts = [0, parts[0], 0]
    while len(parts) < 3:
        parts.insert(0, 0)
    minutes = int(days or 0) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60
    return f"{max(1, int(minutes - 10))}m"


def slurm_cluster(opts: SlurmOptions, threads: int) -> Any:
    """A dask-jobqueue ``SLURMCluster`` whose workers each run one subject with ``threads``.

    Raises:
        ConfigError: dask-jobqueue is missing or the options are wrong.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ConfigError("--cluster slurm needs dask-jobqueue: pip install dask-jobqueue") from exc
    if threads > opts.cores:
        raise ConfigError(f"--threads-per-worker {threads} exceeds --slurm-cores {opts.cores}; "
                          "e.g. --slurm-cores 8 --threads-per-worker 2.")
    try:
        walltime_lifetime = opts.lifetime or _lifetime(opts.walltime)
    except ValueError as exc:
        raise ConfigError(f"--slurm-walltime {opts.walltime!r} is not HH:MM:SS, e.g. "
                          "--slurm-walltime 04:00:00.") from exc
    return SLURMCluster(
        cores=opts.cores,
        processes=max(1, opts.cores // threads),
        memory=opts.memory,
        walltime=opts.walltime,
        queue=opts.partition,
        account=opts.account,
        job_extra_directives=list(opts.directives),
        # one subject at a time per worker; the worker retires before its job's walltime
        worker_extra_args=["--resources", "subject=1", "--lifetime", walltime_lifetime,
                           "--lifetime-stagger", "2m"],
        job_script_prologue=[f"export OMP_NUM_THREADS={threads}"],
        scheduler_options={"dashboard_address": None},
    )


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where a cohort runs.

    Attributes:
        workers: worker processes of a LocalCluster (0: from the CPUs).
        threads_per_worker: compute threads per worker (0: CPUs / workers; on a joined scheduler
            1 per task slot).
        scheduler_file, scheduler_address: join this scheduler instead of starting one.
        memory_limit_bytes: per worker (0: the job's memory / workers).
        slurm: submit worker jobs with dask-jobqueue instead of starting local workers.
    """

    workers: int = 0
    threads_per_worker: int = 0
    scheduler_file: str | None = None
    scheduler_address: str | None = None
    memory_limit_bytes: int = 0
    slurm: SlurmOptions | None = None


@dataclasses.dataclass(frozen=True)
class Connection:
    """A connected client, the compute threads per task, and the task resources to ask for."""

    client: Client
    threads: int
    resources: dict[str, float] | None = None


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
def open_client(spec: ClusterSpec) -> Iterator[Connection]:
    """Connect to (or start) the cluster ``spec`` describes.

    Raises:
        ConfigError: the scheduler cannot be reached, or the options are wrong.
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
            yield Connection(client, spec.threads_per_worker or 1)
        return
    if spec.slurm is not None:
        threads = spec.threads_per_worker or 2
        with slurm_cluster(spec.slurm, threads) as cluster, Client(cluster) as client:
            cluster.adapt(minimum_jobs=1, maximum_jobs=spec.slurm.max_jobs)
            log.info("submitting up to %d SLURM worker job(s) of %d cores, %s, walltime %s",
                     spec.slurm.max_jobs, spec.slurm.cores, spec.slurm.memory, spec.slurm.walltime)
            yield Connection(client, threads, {"subject": 1})
        return
    workers, threads = layout(spec)
    memory = spec.memory_limit_bytes or job_memory_bytes() // workers
    log.info("starting a LocalCluster: %d worker(s) x %d thread(s), %.1f GiB each (CPUs usable: "
             "%d)", workers, threads, memory / GIB, usable_cpus())
    env = {v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      memory_limit=memory, dashboard_address=None, env=env) as cluster, \
            Client(cluster) as client:
        yield Connection(client, threads)
