"""The cluster a cohort runs on: the SLURM worker jobs' script, rendered without a cluster."""

from __future__ import annotations

import dask
import dask_jobqueue  # noqa: F401  (its defaults loaded before the tests set site values)
import pytest

from kneebatch.cli import main


def _script(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["job-script", *args]) == 0
    return capsys.readouterr().out


def test_the_sites_jobqueue_settings_apply_where_no_option_is_given(
        capsys: pytest.CaptureFixture[str]) -> None:
    site = {"jobqueue.slurm.cores": 4, "jobqueue.slurm.memory": "10GiB",
            "jobqueue.slurm.walltime": "12:00:00", "jobqueue.slurm.account": "site-acct",
            "jobqueue.slurm.job-extra-directives": ["--qos=site"]}
    with dask.config.set(site):
        script = _script(capsys, "--threads-per-worker", "2")
        given = _script(capsys, "--threads-per-worker", "2", "--slurm-cores", "6",
                        "--slurm-walltime", "01:00:00", "--slurm-directive=--qos=ours")
    assert "--cpus-per-task=4" in script and "--mem=10G" in script and "-t 12:00:00" in script
    assert "-A site-acct" in script and "--qos=site" in script
    assert "--lifetime 710m" in script  # 12 h minus 10 minutes
    assert "--cpus-per-task=6" in given and "-t 01:00:00" in given and "--mem=10G" in given
    assert "--qos=site" in given and "--qos=ours" in given


def test_without_site_settings_our_defaults_apply(capsys: pytest.CaptureFixture[str]) -> None:
    script = _script(capsys)
    assert "--cpus-per-task=8" in script and "--mem=30G" in script and "-t 04:00:00" in script
    assert "export OMP_WAIT_POLICY=${OMP_WAIT_POLICY-PASSIVE}" in script
    assert "export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX-1}" in script
