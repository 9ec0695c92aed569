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
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster

from kneebatch.cohort.credentials import TlsFiles, write_credentials
from kneebatch.errors import ConfigError
from kneebatch.extract.memory import BASE_BYTES, gib
from kneebatch.runtime import MALLOC_ARENA_MAX, OMP_WAIT_POLICY, usable_cpus

log = logging.getLogger(__name__)

GIB = 1024**3
ALLOWED_FAILURES = 1  # a subject whose worker dies is run once more, then fails at stage `worker`
CONNECT_TIMEOUT_S = 30
JOIN_WAIT_S = 120  # a joined scheduler's workers: as long as `dask worker --death-timeout`


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """Worker jobs that dask-jobqueue's ``SLURMCluster`` submits (``--cluster slurm``).

    Attributes:
        cores, memory, walltime: per worker job (``memory`` like ``32GB``); None: the site's
            dask-jobqueue configuration (``jobqueue.slurm.cores`` ...), else ``DEFAULTS``.
        partition, account: ``#SBATCH -p`` / ``-A`` (None: the site's configuration, else
            SLURM's default).
        directives: further ``#SBATCH`` lines, e.g. ``--qos=long``.
        max_jobs: at most this many worker jobs at once (adaptive between 1 and this).
        lifetime: a worker retires after this long (default: walltime minus 10 minutes) and a
            fresh job replaces it, so no subject is cut by the walltime.
        prologue: shell lines each job runs first (``module load ...``, activating an
            environment).
        log_dir: folder of the worker jobs' logs (default: the folder ``run`` starts in).
        interface: the network interface dask talks over (e.g. ``ib0``; default: dask's).
    """

    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    partition: str | None = None
    account: str | None = None
    directives: tuple[str, ...] = ()
    max_jobs: int = 4
    lifetime: str | None = None
    prologue: tuple[str, ...] = ()
    log_dir: str | None = None
    interface: str | None = None


DEFAULTS: dict[str, Any] = {"cores": 8, "memory": "32GB", "walltime": "04:00:00"}  # nobody said
_JOBQUEUE_WALLTIME = "00:30:00"  # dask-jobqueue's own default: not a site's choice


def _site(key: str) -> Any:
    """The site's ``jobqueue.slurm.<key>`` (None where the site set nothing)."""
    value = dask.config.get(f"jobqueue.slurm.{key}", None)
    if key == "walltime" and value == _JOBQUEUE_WALLTIME:
        return None
    return value


def _resolve(opts: SlurmOptions) -> SlurmOptions:
    """The options with every unset job size taken from the site's configuration, else ours: an
    option given on the command line wins, then ``jobqueue.slurm.*``, then ``DEFAULTS``."""
    sizes = {}
    for key, default in DEFAULTS.items():
        given = getattr(opts, key)
        site = _site(key) if given is None else None
        sizes[key] = given if given is not None else site if site is not None else default
    return dataclasses.replace(opts, **sizes)


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


def slurm_cluster(opts: SlurmOptions, threads: int, tls: TlsFiles | None = None) -> Any:
    """A dask-jobqueue ``SLURMCluster`` whose workers each run one subject with ``threads``;
    with ``tls``, scheduler, workers and client talk TLS with those credentials only.

    Raises:
        ConfigError: dask-jobqueue is missing or the options are wrong.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ConfigError("--cluster slurm needs dask-jobqueue: pip install dask-jobqueue") from exc
    opts = _resolve(opts)
    assert opts.cores is not None and opts.walltime is not None  # _resolve filled them
    if threads > opts.cores:
        raise ConfigError(f"--threads-per-worker {threads} exceeds --slurm-cores {opts.cores}; "
                          "e.g. --slurm-cores 8 --threads-per-worker 2.")
    try:
        walltime_lifetime = opts.lifetime or _lifetime(opts.walltime)
    except ValueError as exc:
        raise ConfigError(f"--slurm-walltime {opts.walltime!r} is not HH:MM:SS, e.g. "
                          "--slurm-walltime 04:00:00.") from exc
    cluster = SLURMCluster(
        cores=opts.cores,
        processes=max(1, opts.cores // threads),
        memory=opts.memory,
        walltime=opts.walltime,
        queue=opts.partition,
        account=opts.account,
        # the site's own lines first, then ours (None: the site's configuration as it is)
        job_extra_directives=[*(_site("job-extra-directives") or []), *opts.directives],
        # one subject at a time per worker; the worker retires before its job's walltime
        worker_extra_args=[*(_site("worker-extra-args") or []), "--resources", "subject=1",
                           "--lifetime", walltime_lifetime, "--lifetime-stagger", "2m"],
        job_script_prologue=[*(_site("job-script-prologue") or []), *opts.prologue,
                             f"export OMP_NUM_THREADS={threads}",
                             f"export OMP_WAIT_POLICY=${{OMP_WAIT_POLICY-{OMP_WAIT_POLICY}}}",
                             f"export MALLOC_ARENA_MAX=${{MALLOC_ARENA_MAX-{MALLOC_ARENA_MAX}}}",
                             "export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False",
                             f"{shlex.quote(sys.executable)} -m kneebatch info"],
        log_directory=opts.log_dir,
        interface=opts.interface,
        scheduler_options={"dashboard_address": None},
        **({"protocol": "tls://", "security": tls.security(every_role=True)} if tls else {}),
    )
    return cluster


def check_sbatch(job_script: str) -> None:
    """Ask SLURM whether it would take a worker job (``sbatch --test-only``: nothing is queued).

    Raises:
        ConfigError: ``sbatch`` is missing or refuses the job, with sbatch's own message.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("--cluster slurm needs SLURM's sbatch on PATH; run on a login node of "
                          "the cluster, or drop --cluster slurm to run on this machine.")
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as fh:
        fh.write(job_script)
        fh.flush()
        done = subprocess.run([sbatch, "--test-only", fh.name], capture_output=True, text=True,
                              timeout=60)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise ConfigError(f"sbatch refused the worker job: {message}. Fix the --slurm-* options "
                          "(partition, account, memory, walltime) and try again; "
                          "`kneebatch job-script` prints the job it submits.")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where a cohort runs.

    Attributes:
        workers: worker processes of a LocalCluster (0: from the CPUs).
        threads_per_worker: compute threads per worker (0: CPUs / workers; on a joined scheduler
            1 per task slot).
        scheduler_file, scheduler_address: join this scheduler instead of starting one.
        wait_workers: on a joined scheduler, wait up to ``JOIN_WAIT_S`` for this many workers
            (their memory is checked before the first subject; later ones join as they come).
        tls_dir: connect to it with the credentials of ``kneebatch tls-credentials`` (None: dask's
            own ``distributed.comm.tls.*`` configuration).
        memory_limit_bytes: per worker (0: the job's memory / workers).
        slurm: submit worker jobs with dask-jobqueue instead of starting local workers.
        dashboard: serve dask's dashboard (on localhost, a free port) for a local cluster.
        subjects_per_worker: subjects a local worker holds at once: 2 (the default) reads and
            preprocesses the next subject while the current one runs through the network (one
            forward pass at a time per worker); 1 does one subject after the other.
    """

    workers: int = 0
    threads_per_worker: int = 0
    scheduler_file: str | None = None
    scheduler_address: str | None = None
    tls_dir: Path | None = None
    memory_limit_bytes: int = 0
    slurm: SlurmOptions | None = None
    dashboard: bool = False
    subjects_per_worker: int = 2
    wait_workers: int = 1

    @property
    def local(self) -> bool:
        """Whether ``open_client`` starts the workers here (a LocalCluster)."""
        return not (self.scheduler_file or self.scheduler_address or self.slurm)


@dataclasses.dataclass(frozen=True)
class Connection:
    """A connected client, the compute threads per task, and the task resources to ask for."""

    client: Client
    threads: int
    resources: dict[str, float] | None = None


def job_memory_bytes() -> tuple[int, str]:
    """Memory this job may use, and where the number comes from: SLURM's ``SLURM_MEM_PER_NODE``,
    or ``SLURM_MEM_PER_CPU`` times the CPUs per task (MB), else what dask finds (the machine's
    memory, or its cgroup's limit when lower)."""
    per_node = os.environ.get("SLURM_MEM_PER_NODE", "")
    if per_node.isdigit() and int(per_node) > 0:
        return int(per_node) * 1024**2, f"SLURM_MEM_PER_NODE={per_node} MB"
    per_cpu = os.environ.get("SLURM_MEM_PER_CPU", "")
    if per_cpu.isdigit() and int(per_cpu) > 0:
        cpus = usable_cpus()
        return int(per_cpu) * cpus * 1024**2, f"SLURM_MEM_PER_CPU={per_cpu} MB x {cpus} CPUs"
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT), "this machine's memory"


def check_worker_memory(memory_bytes: int, source: str) -> None:
    """Refuse a worker memory limit below what torch and the model need by themselves.

    Raises:
        ConfigError: naming the limit, where it came from, and the options that raise it.
    """
    if memory_bytes < BASE_BYTES:
        raise ConfigError(
            f"A worker needs at least {gib(BASE_BYTES)} for torch and the model; you gave "
            f"{gib(memory_bytes)} ({source}). Raise --memory-per-worker, give the job more "
            "memory (sbatch --mem or --mem-per-cpu), or use fewer --workers.")


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


def subject_resources(client: Client) -> dict[str, float] | None:
    """``{"subject": 1}`` when the workers offer the ``subject`` resource (ours and
    ``--cluster slurm``'s do: one subject at a time each), else None (any free slot)."""
    workers = client.scheduler_info().get("workers", {}).values()
    offered = [w.get("resources", {}).get("subject") for w in workers]
    return {"subject": 1} if offered and all(offered) else None


@contextlib.contextmanager
def _job_credentials(opts: SlurmOptions) -> Iterator[TlsFiles]:
    """TLS credentials for this run's worker jobs, in the jobs' log folder (shared with the
    compute nodes: they write their logs there), removed when the run ends."""
    name = f".kneebatch-tls-{os.getpid()}-{os.urandom(4).hex()}"
    folder = Path(opts.log_dir or os.getcwd()) / name
    try:
        yield write_credentials(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def open_client(spec: ClusterSpec) -> Iterator[Connection]:
    """Connect to (or start) the cluster ``spec`` describes.

    Raises:
        ConfigError: the scheduler cannot be reached, or the options are wrong.
    """
    if spec.scheduler_file or spec.scheduler_address:
        target = spec.scheduler_file or spec.scheduler_address
        fix = ("Start one first, e.g. `dask scheduler --scheduler-file sched.json` and `dask worker "
               "--scheduler-file sched.json --nthreads 1`, or drop the option to run on this node.")
        if spec.scheduler_file and not Path(spec.scheduler_file).is_file():
            raise ConfigError(f"Scheduler file {spec.scheduler_file} does not exist. {fix}")
        security = TlsFiles.in_folder(spec.tls_dir).security() if spec.tls_dir else None
        try:
            client = (Client(scheduler_file=spec.scheduler_file, timeout=CONNECT_TIMEOUT_S,
                             security=security)
                      if spec.scheduler_file
                      else Client(spec.scheduler_address, timeout=CONNECT_TIMEOUT_S,
                                  security=security))
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"Cannot reach the dask scheduler at {target} ({exc}). {fix}") from exc
        with client:
            wait = max(1, spec.wait_workers)
            wait_s = CONNECT_TIMEOUT_S if wait == 1 else JOIN_WAIT_S
            with contextlib.suppress(TimeoutError, OSError):  # too few yet: the run goes on
                client.wait_for_workers(wait, timeout=wait_s)
            workers = client.scheduler_info().get("workers", {})
            log.info("joined scheduler %s with %d workers", target, len(workers))
            if len(workers) < wait:
                log.warning("%d of the %d workers asked for (--wait-workers) joined within "
                            "%d s; the others get subjects when they join", len(workers), wait,
                            wait_s)
            for worker in workers.values():  # a worker too small for the model fails the run now
                if worker.get("memory_limit"):
                    check_worker_memory(int(worker["memory_limit"]), f"the memory limit of "
                                        f"worker {worker.get('name', worker.get('id', '?'))}")
            yield Connection(client, spec.threads_per_worker or 1, subject_resources(client))
        return
    if spec.slurm is not None:
        threads = spec.threads_per_worker or 2
        with _job_credentials(spec.slurm) as tls, slurm_cluster(spec.slurm, threads, tls) as cluster:
            check_sbatch(cluster.job_script())  # refused before any job is submitted
            with Client(cluster) as client:
                cluster.adapt(minimum_jobs=1, maximum_jobs=spec.slurm.max_jobs)
                log.info("submitting up to %d SLURM worker job(s): %s", spec.slurm.max_jobs,
                         cluster.job_header.replace("\n", "; "))
                yield Connection(client, threads, {"subject": 1})
        return
    workers, threads = layout(spec)
    if spec.memory_limit_bytes:
        memory, source = spec.memory_limit_bytes, "--memory-per-worker"
    else:
        total, source = job_memory_bytes()
        memory, source = total // workers, f"{source} / {workers} worker(s)"
    check_worker_memory(memory, source)
    log.info("starting a LocalCluster: %d worker(s) x %d thread(s), %.1f GiB each (CPUs usable: "
             "%d)", workers, threads, memory / GIB, usable_cpus())
    if spec.subjects_per_worker < 1:
        raise ConfigError("--subjects-per-worker must be at least 1.")
    with local_cluster(workers, threads, memory, dashboard=spec.dashboard,
                       subjects=spec.subjects_per_worker) as cluster, Client(cluster) as client:
        yield Connection(client, threads, {"subject": 1})


@contextlib.contextmanager
def local_cluster(workers: int, threads: int, memory_bytes: int, *, dashboard: bool = False,
                  subjects: int = 2) -> Iterator[LocalCluster]:
    """A LocalCluster that only this user can use: TLS with temporary credentials on localhost,
    no HTTP endpoints unless ``dashboard`` (dask always opens an HTTP port on localhost; without
    routes it answers every request with 404, so it shows no task names, ids or addresses),
    ``subjects`` subjects at a time per worker (the ``subject`` resource; one task thread each:
    torch's ``threads`` are set inside the task),
    a subject given up after its worker died ``ALLOWED_FAILURES + 1`` times. Its worker processes
    ignore SIGINT, so a Ctrl-C reaches only the run, which stops them in order."""
    import signal

    from distributed.security import Security

    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", OMP_WAIT_POLICY),
           "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX),
           "DASK_LOGGING__DISTRIBUTED": os.environ.get("DASK_LOGGING__DISTRIBUTED", "error")}
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the worker processes
    try:
        # never pause a worker at 80% of its memory (the model alone is most of a small limit:
        # a paused worker waits forever); one over its limit is restarted, its subject retried
        settings: dict[str, Any] = {"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                                    "distributed.worker.memory.pause": False}
        if not dashboard:  # the nannies hand this configuration to their worker processes
            settings |= {"distributed.scheduler.http.routes": [],
                         "distributed.worker.http.routes": []}
        with dask.config.set(settings):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=subjects, processes=True, host="127.0.0.1",
                protocol="tls://", security=Security.temporary(), memory_limit=memory_bytes,
                # dask opens its HTTP port even without a dashboard: localhost, a free port
                scheduler_kwargs={"dashboard": dashboard, "dashboard_address": "127.0.0.1:0"},
                resources={"subject": subjects}, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    with cluster:
        if dashboard:
            log.warning("dask dashboard: %s", cluster.dashboard_link)
        yield cluster
