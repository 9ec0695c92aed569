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


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
TOP_PAD_BYTES = 512 * 1024**2
TRIM_THRESHOLD_BYTES = 2 * 1024**3


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel after every layer.

    A 3D forward pass allocates and frees activations of hundreds of MB per layer; by default glibc
    maps and unmaps them each time and every page faults in anew (the seed spent nearly half its
    time in the kernel). Serving every block from the heap (no mmap), with a generous top pad and
    trim threshold, keeps the pages for the next layer. Returns False where glibc's ``mallopt`` is
    not available.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TOP_PAD, TOP_PAD_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def configure_compute(threads: int, *, malloc: bool = True) -> None:
    """Set torch's and SimpleITK's thread counts, flush denormals, tune malloc (idempotent).

    Args:
        threads: threads for this process's compute (intra-op).
        malloc: apply ``tune_malloc`` (switch off to measure or compare).
    """
    import SimpleITK as sitk
    import torch

    if malloc:
        tune_malloc()
    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    # Denormal floats in deep activations are slow on x86 and change nothing at float32 precision.
    torch.set_flush_denormal(True)
    log.debug("compute threads set to %d", threads)
