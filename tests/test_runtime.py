"""Process-wide settings: what a worker's threads cost the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# In a fresh process: the settings a kneebatch process applies first, then a large buffer (over
# glibc's 64 MB per-thread heap, as a clinical CT and its reading buffers are) made and freed in
# a new thread three times, as each read of a knee runs (``scan.timeout``); prints the page
# faults of the last two.
_READS = """
import resource, sys
from kneebatch.runtime import configure_compute
from kneebatch.scan.timeout import call_with_timeout
configure_compute(1)
def read():
    return len(b"x" * (96 << 20))  # touches every page
call_with_timeout(read, 60)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    call_with_timeout(read, 60)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_reads(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "KNEEBATCH_MALLOC")}
    done = subprocess.run([sys.executable, "-c", _READS], capture_output=True, text=True,
                          env={**clean, **env}, check=True, timeout=120)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reader_threads_reuse_the_heap_instead_of_faulting_every_read_in_anew() -> None:
    """Each knee is read in a thread of its own; with an arena per thread glibc mapped and
    faulted in a CT's 200 MB anew every time (50k page faults, up to 0.25 s of kernel time)."""
    shared = _faults_of_reads()
    assert shared < 2000, shared  # 2 x 96 MB would be 49k pages
    assert _faults_of_reads(KNEEBATCH_MALLOC="off") > 20000  # glibc's defaults: the fault storm
