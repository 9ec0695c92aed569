"""Process-wide compute settings, applied once per process by whoever starts the work."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# OpenMP threads that wait sleep instead of spinning (set before torch is imported; a user's own
# value wins, an empty one is OpenMP's default): spinning threads took the core the worker reads
# its next knee on (measurements: benchmarks/README.md, ninth session).
OMP_WAIT_POLICY = "PASSIVE"
# Every thread allocates from glibc's main heap (set before the process starts, or by
# ``one_malloc_arena`` before its second thread allocates; a user's own value wins). Otherwise a
# thread that reads a knee gets an arena of its own, which cannot hold a CT of over 64 MB: each
# read mapped and faulted in 200 MB anew (50k page faults, 0.05-0.25 s of kernel time per CT).
MALLOC_ARENA_MAX = "1"


def usable_cpus() -> int:
    """CPUs this process may use: ``SLURM_CPUS_PER_TASK`` if set, else what dask finds (the
    smallest of the machine's CPUs, this process's affinity and its cgroup's CPU quota)."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    from dask.system import cpu_count

    return cpu_count()


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


def _libc() -> Any:
    """glibc, for ``mallopt`` and ``malloc_trim`` (raises ``OSError`` where there is no C
    library to load; callers also catch the ``AttributeError`` of a libc without them)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
MALLOC_MODES = ("heap", "pad", "off")


def tune_malloc(mode: str | None = None) -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel after every layer.

    A 3D forward pass allocates and frees activations of hundreds of MB per layer; by default glibc
    maps and unmaps each of them, and every page faults in anew (the seed spent nearly half its
    time in the kernel). Modes (``KNEEBATCH_MALLOC`` or ``mode``):
    ``heap`` (default): every block from the heap (no mmap), freed pages kept: kernel time under
    6% of user time on a native-resolution knee (``release_memory`` trims before a large
    region);
    ``pad``: a 512 MB top pad and glibc's largest mmap threshold (32 MB): about 5% less peak RSS,
    20% more wall time;
    ``off``: glibc's defaults.

    Returns:
        True if the settings were applied (glibc's ``mallopt`` found and the mode not ``off``).
    """
    mode = mode or os.environ.get("KNEEBATCH_MALLOC", "heap")
    if mode not in MALLOC_MODES or mode == "off":
        return False
    settings = {"pad": [(_M_TOP_PAD, 512 * 1024**2), (_M_MMAP_THRESHOLD, 32 * 1024**2)],
                "heap": [(_M_MMAP_MAX, 0), (_M_TOP_PAD, 512 * 1024**2),
                         (_M_TRIM_THRESHOLD, 2 * 1024**3)]}[mode]
    try:
        libc = _libc()
        return all(libc.mallopt(option, value) for option, value in settings)
    except (OSError, AttributeError):
        return False


_M_ARENA_MAX = -8


def one_malloc_arena() -> bool:
    """Make every thread this process starts from now on allocate from glibc's main heap
    (``MALLOC_ARENA_MAX``), unless ``MALLOC_ARENA_MAX`` is set in the environment (glibc applied
    it at start) or ``KNEEBATCH_MALLOC=off``. Only threads without an arena yet are affected.

    Returns:
        True if the setting was applied.
    """
    if "MALLOC_ARENA_MAX" in os.environ or os.environ.get("KNEEBATCH_MALLOC") == "off":
        return False
    try:
        return bool(_libc().mallopt(_M_ARENA_MAX, int(MALLOC_ARENA_MAX)))
    except (OSError, AttributeError):
        return False


_RELEASES = 0  # release_memory calls in this process (tests: when the trim runs)


def release_memory() -> None:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim``): called before a
    large region's forward pass, so the pages the previous region's forward kept do not stack up
    on the next one's peak."""
    global _RELEASES
    _RELEASES += 1
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


def memory_releases() -> int:
    """How many times this process has called ``release_memory``."""
    return _RELEASES


_frozen = False


def freeze_imports() -> None:
    """Move every object alive now (the modules of torch, torchvision, SimpleITK, dask: millions
    of objects) out of the garbage collector's reach, once per process. Python's final collection
    at exit walks them all otherwise: 2-4 s per worker at the end of every run (the nanny gave up
    after 4 s and killed it), and every full collection during the run pays the same walk."""
    global _frozen
    if not _frozen:
        import gc

        gc.freeze()
        _frozen = True


def configure_compute(threads: int, *, malloc: bool = True) -> None:
    """Set torch's and SimpleITK's thread counts, flush denormals, tune malloc, keep the imports
    out of the garbage collector's walks (idempotent).

    Args:
        threads: threads for this process's compute (intra-op).
        malloc: apply ``tune_malloc`` (switch off to measure or compare; ``KNEEBATCH_MALLOC``
            picks its mode).
    """
    import SimpleITK as sitk
    import torch

    if malloc:
        one_malloc_arena()
        tune_malloc()
    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    # Denormal floats in deep activations are slow on x86 and change nothing at float32 precision.
    torch.set_flush_denormal(True)
    freeze_imports()
    log.debug("compute threads set to %d", threads)


class Gauge:
    """How many of something are in progress in this process now, and the most there were."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Count one in progress for the duration of the block."""
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            yield
        finally:
            with self._lock:
                self.now -= 1


SUBJECTS_IN_PROGRESS = Gauge()  # a worker holds its next subject while the current one computes
