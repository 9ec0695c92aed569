"""The Parquet datasets of OUT replaced together: a reader never sees them from different gathers.

Each gather (or merge) writes its three datasets into a new folder
``OUT/.kneebatch/tables/<generation>/{similarities,features,regions}/part-0.parquet``. One rename
of the link ``OUT/.kneebatch/tables/current`` then switches all three at once; ``OUT/similarities``
etc. are fixed relative links into ``current``, so ``pd.read_parquet(OUT / "similarities")`` reads
the latest gather whole, whenever a gather is killed. The previous generation is kept until the
next gather (a reader that listed it may still be opening its files); older ones are removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from kneebatch.outdir.folder import CURRENT, TABLES, is_dataset_link, link_target
from kneebatch.schema import DATASETS

_PENDING = ".pending-"  # a generation being written (removed by the next gather if left)


@contextlib.contextmanager
def new_generation(out: Path) -> Iterator[Path]:
    """A fresh folder to write one gather's datasets into (``<folder>/<dataset>/``); removed
    when the block fails or the caller does not ``publish`` it. The caller holds the gather
    lock."""
    tables = out / TABLES
    tables.mkdir(parents=True, exist_ok=True)
    for path in tables.glob(f"{_PENDING}*"):  # what a killed gather left
        shutil.rmtree(path, ignore_errors=True)
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    folder = tables / f"{_PENDING}{stamp}"
    for name in DATASETS:
        (folder / name).mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already when published


def publish(out: Path, folder: Path) -> None:
    """Make ``folder`` (from ``new_generation``) OUT's datasets, all three in one rename."""
    tables = out / TABLES
    final = tables / folder.name.removeprefix(_PENDING)
    os.replace(folder, final)
    current = tables / CURRENT
    previous = os.readlink(current) if current.is_symlink() else None
    if current.is_dir() and not current.is_symlink():  # OUT copied with its links followed
        os.replace(current, tables / f"old-{CURRENT}-{uuid.uuid4().hex[:8]}")
    link = tables / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
    os.symlink(final.name, link)
    os.replace(link, current)  # the switch
    for name in DATASETS:
        _link_dataset(out, name)
    for path in tables.iterdir():
        if path.name not in (CURRENT, final.name, previous) and not path.name.startswith(_PENDING):
            _remove(path)


def _link_dataset(out: Path, name: str) -> None:
    """``OUT/<name>`` -> ``current/<name>``; a dataset folder of an earlier version (a real
    folder) is moved under the bookkeeping first, removed with the old generations."""
    path = out / name
    if is_dataset_link(out, name):
        return
    if path.is_dir() and not path.is_symlink():
        os.replace(path, out / TABLES / f"old-{name}-{uuid.uuid4().hex[:8]}")
    link = out / TABLES / f".link-{name}-{uuid.uuid4().hex[:8]}"
    os.symlink(link_target(name), link)
    os.replace(link, path)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
