"""A real one-node SLURM (munge + slurmctld + slurmd on localhost) for the tests that need one.

Debian's ``slurm-wlm`` and ``munge`` must be installed (``.ci/run`` installs them). Without them the
tests are skipped with the reason, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MARK = "kneebatch-slurm-test"  # in the config path, so we only ever stop our own daemons
CONF = """\
ClusterName=kneebatch
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=10
NodeName=localhost CPUs={cpus} RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"SLURM is required under CI=true: {reason}")
    pytest.skip(f"no SLURM here: {reason} (apt-get install slurm-wlm munge)")


def _stop_ours() -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if MARK in cmdline and ("slurmctld" in cmdline or "slurmd" in cmdline):
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGTERM)
    time.sleep(1)


def _wait_idle(env: dict[str, str], deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                              text=True)
        if done.returncode == 0 and done.stdout.strip() in ("idle", "mixed", "allocated"):
            return
        time.sleep(0.5)
    raise RuntimeError("SLURM node did not become idle")


def start_slurm(root: Path) -> Iterator[dict[str, str]]:
    """Start the daemons; yield the environment that points SLURM commands at them."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} not found")
    if os.geteuid() != 0:
        _unavailable("the test SLURM runs its daemons as root")
    folder = root / MARK
    (folder / "state").mkdir(parents=True)
    (folder / "spool").mkdir()
    conf = folder / "slurm.conf"
    conf.write_text(CONF.format(d=folder, cpus=os.cpu_count() or 2))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _stop_ours()
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], env=env, check=True)
    try:
        _wait_idle(env)
        yield env
    finally:
        _stop_ours()
