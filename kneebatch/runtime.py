"""Process-wide compute settings, applied once per process by whoever starts the work."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may use: ``SLURM_CPUS_PER_TASK`` if set, else its affinity mask."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_compute(threads: int) -> None:
    """Set torch's and SimpleITK's thread counts and flush denormals (idempotent).

    Args:
        threads: threads for this process's compute (intra-op).
    """
    import SimpleITK as sitk
    import torch

    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    # Denormal floats in deep activations are slow on x86 and change nothing at float32 precision.
    torch.set_flush_denormal(True)
    log.debug("compute threads set to %d", threads)
