"""The output folder OUT: which of its paths are kneebatch's, and the bookkeeping under
``OUT/.kneebatch/`` (the folder's settings, the last run's manifest, run records, the gather lock).

OUT is owned: the first ``run`` or ``extract`` marks it by creating ``.kneebatch/``; after that,
kneebatch refuses an OUT holding anything it did not make, and never deletes what it did not create.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from kneebatch.errors import ConfigError, OutputError
from kneebatch.outdir.atomic import temporary_of, write_text_atomic
from kneebatch.outdir.records import ManifestRecord, RunRecord, SettingsRecord
from kneebatch.schema import DATASETS

BOOKKEEPING = ".kneebatch"
SETTINGS = f"{BOOKKEEPING}/settings.json"
MANIFEST = f"{BOOKKEEPING}/manifest.json"
MERGED = f"{BOOKKEEPING}/merged.json"  # written by `kneebatch merge`
RUNS_DIR = f"{BOOKKEEPING}/runs"  # one JSON per run (or array shard); run.json is the latest
TABLES = f"{BOOKKEEPING}/tables"  # one folder of the three datasets per gather (see publish.py)
CURRENT = "current"  # the link under TABLES to the latest gather's folder
# Everything kneebatch may put at the top of OUT.
OURS = frozenset({BOOKKEEPING, "subjects", *DATASETS, "run.json", "failures.csv", "report"})
_DATASET_FILE = re.compile(r"^(part-\d+\.parquet|\.part-\d+\.parquet\.[0-9a-f.]+\.tmp)$")
# What a gather of kneebatch 0.1 left behind when it was killed; the next gather removes it.
OLD_DEBRIS = re.compile(r"^\.(similarities|features)\.(tmp|old)-[0-9a-f-]+$")


def record_name(subject_id: str) -> str:
    """A file name for a subject's bookkeeping: the id itself, or for a long id its start and a
    hash (never too long for a file system, never equal to another id: ids have no ``~``)."""
    if len(subject_id) <= 100:
        return subject_id
    return f"{subject_id[:60]}~{hashlib.sha256(subject_id.encode()).hexdigest()[:20]}"


def link_target(name: str) -> str:
    """Where the dataset link ``OUT/<name>`` points (relative: OUT moves or copies whole)."""
    return f"{TABLES}/{CURRENT}/{name}"


def is_dataset_link(out: Path, name: str) -> bool:
    """Whether ``OUT/<name>`` is the link kneebatch makes to the latest gather's dataset."""
    path = out / name
    return path.is_symlink() and os.readlink(path) == link_target(name)


def foreign_paths(out: Path) -> list[Path]:
    """Paths in OUT that kneebatch did not make (top level and inside the Parquet folders)."""
    found = [p for p in sorted(out.iterdir()) if p.name not in OURS
             and not OLD_DEBRIS.match(p.name) and not _our_temporary(p.name)]
    for name in DATASETS:
        folder = out / name
        if not is_dataset_link(out, name) and (
                folder.is_symlink() or (folder.exists() and not folder.is_dir())):
            found.append(folder)
        elif folder.is_dir():  # a user's file put into a dataset: gather would drop it
            found += [p for p in sorted(folder.iterdir()) if not _DATASET_FILE.match(p.name)]
    # Folders kneebatch writes into must be its own, never links out of OUT (or into .kneebatch).
    for folder in (out / "subjects", out / "report", out / "report" / "qc"):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            found.append(folder)
    return found


def _our_temporary(name: str) -> bool:
    """A temporary of one of kneebatch's files at the top of OUT (a killed writer leaves one)."""
    found = temporary_of(name)
    return found is not None and found[0] in OURS


def _refuse_foreign(out: Path, found: list[Path]) -> None:
    shown = ", ".join(str(p) for p in found[:5]) + (f" (+{len(found) - 5} more)" if len(found) > 5 else "")
    raise ConfigError(
        f"{out} holds paths kneebatch did not make: {shown}. kneebatch never writes over or "
        "deletes what is not its own: move them elsewhere, or choose a new or empty --out.")


def check_owned(out: Path) -> None:
    """Refuse an OUT that is not a kneebatch folder, or that holds paths kneebatch did not make.

    Raises:
        OutputError: OUT or its bookkeeping folder is missing.
        ConfigError: naming the paths that are not kneebatch's.
    """
    if not out.is_dir():
        raise OutputError(f"{out} does not exist (or is not a folder); give the folder a "
                          "`kneebatch run ... --out` wrote.")
    if not (out / BOOKKEEPING).is_dir():
        raise OutputError(f"{out} is not a kneebatch output folder (no {BOOKKEEPING}/ in it); "
                          f"run `kneebatch run MANIFEST --out {out}` first.")
    found = foreign_paths(out)
    if found:
        _refuse_foreign(out, found)


def claim_out(out: Path) -> None:
    """Create or reuse OUT for results: an empty or missing folder is marked as kneebatch's.

    Raises:
        ConfigError: OUT holds something kneebatch did not make.
        OutputError: OUT cannot be created.
    """
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder.")
        if not (out / BOOKKEEPING).is_dir():
            found = sorted(out.iterdir()) if out.is_dir() else []
            if found:
                _refuse_foreign(out, found)
        (out / BOOKKEEPING).mkdir(parents=True, exist_ok=True)
        check_owned(out)
    except OSError as exc:
        raise OutputError(f"Cannot create output folder {out}: {exc.strerror or exc}. Choose a "
                          "writable --out.") from exc


def refuse_other_settings(out: Path, settings: SettingsRecord, *, overwrite: bool) -> bool:
    """Whether OUT's results are made with ``settings`` (reads only).

    Raises:
        ConfigError: OUT holds results of other settings or another model, and not ``overwrite``.
    """
    current = SettingsRecord.read(out / SETTINGS)
    if current is not None and current.config_hash == settings.config_hash \
            and current.model_sha256 == settings.model_sha256:
        return True
    if current is not None and not overwrite:
        raise ConfigError(
            f"{out} holds results made with other settings or another model "
            f"({'; '.join(current.differs_from(settings))}). Choose a new --out for these "
            "settings, or add --overwrite to replace the results in this folder.")
    return False


def check_settings(out: Path, settings: SettingsRecord, *, overwrite: bool) -> None:
    """Make ``settings`` the folder's, refusing to mix them with results of other settings.

    Raises:
        ConfigError: see ``refuse_other_settings``.
    """
    if refuse_other_settings(out, settings, overwrite=overwrite):
        return
    try:
        write_text_atomic(out / SETTINGS, settings.to_json())
    except OSError as exc:
        raise unwritable(out, exc) from exc


def folder_settings(out: Path) -> SettingsRecord | None:
    """The settings the results in OUT are made with (None for a folder of an older version)."""
    return SettingsRecord.read(out / SETTINGS)


def save_manifest(out: Path, record: ManifestRecord) -> None:
    """Remember the subjects (and their keys) of this run for gather and status.

    Raises:
        OutputError: it cannot be written.
    """
    try:
        write_text_atomic(out / MANIFEST, record.to_json())
    except OSError as exc:
        raise unwritable(out, exc) from exc


def read_manifest_record(out: Path) -> ManifestRecord | None:
    """The last run's subjects and keys, or None when OUT was only written by ``extract``."""
    return ManifestRecord.read(out / MANIFEST)


def unwritable(out: Path, exc: OSError) -> OutputError:
    """The error for an output folder that cannot be written."""
    return OutputError(f"Cannot write to {out} ({exc.strerror or exc}). Free some space or make "
                       "it writable, then rerun the same command: finished subjects are kept.")


def save_run_record(out: Path, record: RunRecord) -> None:
    """Keep one run's (or shard's) record; ``run.json`` is rebuilt from the latest.

    Raises:
        OutputError: it cannot be written.
    """
    folder = out / RUNS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"{record.run_id}.json", record.to_json())
    except OSError as exc:
        raise unwritable(out, exc) from exc


HEARTBEAT_S = 60.0  # a running run touches its record this often
_GONE_AFTER_S = 15 * 60  # no heartbeat for this long: the run (on another host) is gone


def heartbeat(out: Path, run_id: str) -> None:
    """Show that the run is alive (its record's mtime), for ``status`` on other hosts."""
    with contextlib.suppress(OSError):
        os.utime(out / RUNS_DIR / f"{run_id}.json")


def run_state(out: Path, record: RunRecord) -> str:
    """``ended``, ``stopped`` (asked to stop, or its process is gone: killed, out of walltime) or
    ``running``. A run on this host is gone when its pid is not alive; one on another host when
    it has given no heartbeat for 15 minutes."""
    if record.ended:
        return "stopped" if record.stopped else "ended"
    if record.host == socket.gethostname() and record.pid:
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return "stopped"
        except PermissionError:  # alive, another user's
            pass
        return "running"
    try:
        age = time.time() - (out / RUNS_DIR / f"{record.run_id}.json").stat().st_mtime
    except OSError:
        return "running"
    return "stopped" if age > _GONE_AFTER_S else "running"


def run_records(out: Path) -> list[RunRecord]:
    """Every run record in OUT, oldest first."""
    folder = out / RUNS_DIR
    records = [RunRecord.read(p) for p in folder.glob("*.json")] if folder.is_dir() else []
    return sorted((r for r in records if r is not None), key=lambda r: (r.ended, r.run_id))


@contextlib.contextmanager
def gather_lock(out: Path) -> Iterator[None]:
    """Hold OUT's gather lock: one gather at a time writes the datasets and may clear debris."""
    path = out / BOOKKEEPING / "gather.lock"
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)



def is_merged(out: Path) -> bool:
    """Whether OUT was written by ``kneebatch merge``."""
    return (out / MERGED).is_file()


def check_not_merged(out: Path, command: str) -> None:
    """Refuse ``run``/``gather`` into a merge folder (it has no per-subject files to build from).

    Raises:
        ConfigError: naming the merge command to repeat instead.
    """
    if is_merged(out):
        raise ConfigError(f"{out} was made by `kneebatch merge`; `kneebatch {command}` cannot "
                          "write into it. Run into one of its source folders (see its run.json "
                          "'sources'), then repeat the merge.")


def _new_run_id(kind: str = "") -> str:
    """A run id: UTC time and a random suffix, prefixed by ``kind`` (``extract``, ``merge``)."""
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    return f"{kind}-{stamp}" if kind else stamp


def open_out(out: Path, settings: SettingsRecord, *,
             command: Literal["run", "extract", "merge"], overwrite: bool = False) -> str:
    """Open OUT for a command that writes results made with ``settings``: claim the folder,
    refuse a merge folder (but to ``merge`` itself, which replaces an earlier merge) and results
    of other settings (unless ``overwrite``).

    Returns:
        A new run id for the command.

    Raises:
        ConfigError, OutputError: see ``claim_out``, ``check_not_merged``, ``check_settings``.
    """
    claim_out(out)
    if command == "merge":
        overwrite = is_merged(out)
    else:
        check_not_merged(out, command)
    check_settings(out, settings, overwrite=overwrite)
    if command != "merge":  # a merge folder has no per-subject files
        try:
            (out / "subjects").mkdir(exist_ok=True)
        except OSError as exc:
            raise unwritable(out, exc) from exc
    return _new_run_id("" if command == "run" else command)
