"""Shared fixtures: a seeded random-weights model file and tiny synthetic knees on disk."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kneebatch.inputs.phantom import write_sample
from kneebatch.network.modelfile import save_model
from kneebatch.network.weights import build_model

from .helpers import run_joined, write_knee


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model3d_state_dict.pth"
    network, source = build_model(weights="random", seed=0)
    save_model(network, source, path)
    return path


@pytest.fixture
def knee(tmp_path: Path) -> tuple[Path, Path]:
    return write_knee(tmp_path / "in")


@pytest.fixture(scope="session")
def shared_scheduler() -> Iterator[str]:
    """The address of one dask cluster for the whole session (one worker, two subject slots, as
    `kneebatch run`'s local cluster): tests of OUT's bookkeeping join it with
    ``--scheduler-address`` instead of starting a cluster, its workers and the model every run.
    Tests of the local cluster itself, of signals and of killed processes start their own."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      resources={"subject": 2}, worker_dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"dashboard": False,
                                        "dashboard_address": "127.0.0.1:0"}) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def shared_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small knees whose files no test changes (tests edit copies of the manifest)."""
    return write_sample(tmp_path_factory.mktemp("cohort"), 3, size="small")


@pytest.fixture(scope="session")
def shared_finished(shared_cohort: Path, model_path: Path, shared_scheduler: str,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished OUT of ``shared_cohort`` (copy it with the ``finished`` fixture to change it)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert run_joined(shared_scheduler, shared_cohort, out, model_path) == 0
    return out


@pytest.fixture
def cohort(shared_cohort: Path, tmp_path: Path) -> Path:
    """A copy of the manifest beside the shared knees: relative paths, same inputs, same keys."""
    manifest = shared_cohort.with_name(f"manifest-{tmp_path.name}.csv")
    shutil.copy(shared_cohort, manifest)
    return manifest


@pytest.fixture
def finished(shared_finished: Path, tmp_path: Path) -> Path:
    """A copy of a finished OUT of ``cohort``'s subjects (links copied as links, as ``cp -a``)."""
    out = tmp_path / "out"
    shutil.copytree(shared_finished, out, symlinks=True)
    return out
