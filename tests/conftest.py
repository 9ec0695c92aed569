"""Shared fixtures: a seeded random-weights model file and tiny synthetic knees on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kneebatch.network.modelfile import save_model
from kneebatch.network.weights import build_model

from .helpers import write_knee


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
