"""Per-subject claims: one process at a time computes, writes or clears a subject's folder.

A claim is ``OUT/.kneebatch/claims/<id>.lock`` held with an exclusive ``flock`` (NFS v4 and most
cluster file systems support it). The file records who holds it (host, pid, SLURM job id, run id) for
``kneebatch status``; the lock itself dies with the process, so a killed run leaves no stale claim.
Two runs on one OUT therefore never compute the same subject at once nor touch each other's
temporary files, and array shards still write side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from kneebatch.outdir.folder import BOOKKEEPING, record_name
from kneebatch.outdir.records import Record

log = logging.getLogger(__name__)

CLAIMS_DIR = f"{BOOKKEEPING}/claims"


@dataclasses.dataclass(frozen=True)
class Holder(Record):
    """Who holds a claim (the claim file's content)."""

    host: str
    pid: int
    job_id: str = ""
    run_id: str = ""
    since: str = ""


def claim_path(out: Path, subject_id: str) -> Path:
    """Where the claim of ``subject_id`` lives."""
    return out / CLAIMS_DIR / f"{record_name(subject_id)}.lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock of ``path`` (the same file still at that path), or None."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:  # a file system without locks: work unguarded rather than not at all
            log.warning("cannot lock %s (%s); concurrent runs on this OUT are not guarded", path,
                        exc)
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: try the new file


@contextlib.contextmanager
def claim(out: Path, subject_id: str, run_id: str) -> Iterator[bool]:
    """Hold the claim of ``subject_id`` for the duration of the block.

    Yields:
        True when this process holds it; False when another process does (do nothing then).
    """
    path = claim_path(out, subject_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(path)
    if fd is None:
        yield False
        return
    try:
        holder = Holder(host=socket.gethostname(), pid=os.getpid(),
                        job_id=os.environ.get("SLURM_JOB_ID", ""), run_id=run_id,
                        since=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.to_json().encode(), 0)
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still locked: a waiter re-checks the inode and retries
        os.close(fd)


def holder(out: Path, subject_id: str) -> Holder | None:
    """Who computes ``subject_id`` now, or None (a claim file whose process is gone is free)."""
    path = claim_path(out, subject_id)
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return Holder.read(path) or Holder("?", 0)
    except OSError:
        return Holder.read(path)
    else:
        return None
    finally:
        os.close(fd)
