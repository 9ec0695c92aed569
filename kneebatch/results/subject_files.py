"""Results, one subject: write its outputs atomically; tell finished subjects from the rest.

Layout (a contract, see DESIGN.md): ``OUT/subjects/<id>/features.npz``, ``similarities.csv`` and
``done.json``, written last. Each file goes to a temporary name in the same folder and is renamed into
place, so a reader never sees half a file, and a subject without a matching ``done.json`` is not
finished.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import enum
import hashlib
import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kneebatch.config import LAYER_WIDTH, PAIRS, REGIONS
from kneebatch.errors import OutputError
from kneebatch.outdir.atomic import write_bytes_atomic, write_text_atomic
from kneebatch.outdir.records import DoneRecord, FileEntry
from kneebatch.schema import SimilarityRow

FEATURES = "features.npz"
SIMILARITIES = "similarities.csv"
DONE = "done.json"
QC = "qc.png"
RESULT_FILES = (FEATURES, SIMILARITIES, QC)
SIM_COLUMNS = ("subject_id", "layer", "region_a", "region_b", "cosine")


def subject_dir(out: Path, subject_id: str) -> Path:
    """``OUT/subjects/<id>``; the id was checked safe by the manifest, the path is checked again.

    Raises:
        OutputError: the id is not a plain folder name, or ``OUT/subjects`` is not a real folder.
    """
    base = out / "subjects"
    path = base / subject_id
    if path.parent != base or subject_id in (".", "..") or "/" in subject_id:
        raise OutputError(f"Subject id {subject_id!r} would write outside {base}.")
    if base.is_symlink():
        raise OutputError(f"{base} is a symlink; kneebatch writes only inside OUT. Make it a real "
                          "folder or choose another --out.")
    return path


def _similarities_csv(rows: list[SimilarityRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SIM_COLUMNS)
    for row in rows:
        writer.writerow([row.subject_id, row.layer, row.region_a, row.region_b,
                         repr(float(row.cosine))])
    return buffer.getvalue()


def write_subject(out: Path, subject_id: str, vectors: dict[str, dict[str, np.ndarray]],
                  rows: list[SimilarityRow], done: DoneRecord,
                  started: float, extra: dict[str, bytes] | None = None) -> dict[str, float]:
    """Write a subject's files; ``done.json`` last, with their sizes and sha256 and the write and
    total times added. The caller holds the subject's claim.

    Args:
        out: the run's output folder.
        subject_id: the subject.
        vectors: region -> layer -> float32 vector; stored as ``"<region>.<layer>"``.
        rows: the similarity rows.
        done: the record to write (its ``files`` and times are filled in here).
        started: ``time.perf_counter()`` when the subject started (for the total time).
        extra: more files to write before ``done.json`` (e.g. ``qc.png``).

    Returns:
        The timings written (seconds per stage).

    Raises:
        OutputError: the folder cannot be written (permissions, full disk, a symlink).
    """
    folder = subject_dir(out, subject_id)
    write_start = time.perf_counter()
    try:
        if folder.is_symlink():
            raise OutputError(f"Subject {subject_id}: {folder} is a symlink; kneebatch does not "
                              "write through links. Remove it or choose another --out.")
        remove_result(out, subject_id)  # a stale done.json must not vouch for new files
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"{region}.{layer}": vec.astype(np.float32)
                  for region, by_layer in vectors.items() for layer, vec in by_layer.items()}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        payload = {FEATURES: buffer.getvalue(),
                   SIMILARITIES: _similarities_csv(rows).encode("utf-8"), **(extra or {})}
        for name, data in payload.items():
            write_bytes_atomic(folder / name, data)
        now = time.perf_counter()
        timings = {**done.timings_s, "write": now - write_start, "total": now - started}
        done = dataclasses.replace(
            done, timings_s={k: round(v, 4) for k, v in timings.items()},
            files={name: FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())
                   for name, data in payload.items()})
        write_text_atomic(folder / DONE, done.to_json())
    except OSError as exc:
        remove_result(out, subject_id)  # no half set without done.json
        raise OutputError(
            f"Subject {subject_id}: cannot write {folder} ({exc.strerror or exc}). Check that "
            "the output folder is writable and has free space; finished subjects are kept."
        ) from exc
    return timings


def remove_result(out: Path, subject_id: str) -> None:
    """Remove a subject's previous result (``done.json`` first) and temporaries a killed writer
    left; only kneebatch's own file names. The caller holds the subject's claim."""
    folder = subject_dir(out, subject_id)
    if folder.is_symlink() or not folder.is_dir():
        return
    for name in (DONE, *RESULT_FILES):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty


class State(enum.Enum):
    """Where a subject's result stands against the key the current run expects."""

    FINISHED = "finished"  # done.json with this key, files of the recorded sizes
    MISSING = "missing"  # no result (never run, failed, or removed)
    CHANGED = "changed"  # a result of other inputs or settings
    DAMAGED = "damaged"  # done.json unreadable, or a file missing or of another size
    LINKED = "linked"  # the folder is a symlink: never read, never written through


def read_done(folder: Path) -> DoneRecord | None:
    """The subject's ``done.json``, or None when missing or unreadable."""
    return DoneRecord.read(folder / DONE)


class DamagedResult(Exception):
    """A finished subject's file that is missing, truncated or malformed."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _checked_bytes(folder: Path, name: str, done: DoneRecord) -> bytes:
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DamagedResult(path, f"cannot be read ({exc.strerror or exc})") from exc
    entry = done.files.get(name)
    if entry is None or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise DamagedResult(path, "differs from what done.json recorded (truncated or edited)")
    return data


def result_problem(out: Path, subject_id: str) -> str:
    """Why a subject's result is damaged, in words ('' when it is whole)."""
    folder = subject_dir(out, subject_id)
    done = read_done(folder)
    if done is None:
        return f"{folder / DONE} is not a kneebatch result record (damaged or edited)"
    try:
        read_result(folder, done)
    except DamagedResult as exc:
        return str(exc)
    return ""


def result_state(out: Path, subject_id: str, key: str,
                 legacy: Callable[[dict[str, str]], str] | None = None) -> State:
    """Whether the subject is finished with ``key``: its ``done.json`` holds the key and its files
    the recorded checksums and the shapes the schema asks.

    Args:
        legacy: the key an earlier kneebatch version gave this result, from the extra values its
            ``done.json`` records; a result holding it is rekeyed to ``key`` (once) and finished.
    """
    folder = subject_dir(out, subject_id)
    if folder.is_symlink():
        return State.LINKED
    if not (folder / DONE).exists():
        return State.MISSING
    done = read_done(folder)
    if done is None:
        return State.DAMAGED
    if done.key != key and (legacy is None or done.key != legacy(done.extra)):
        return State.CHANGED
    try:
        read_result(folder, done)  # small files: reading and checking them is cheap
    except DamagedResult:
        return State.DAMAGED
    if done.key != key:
        write_text_atomic(folder / DONE, dataclasses.replace(done, key=key).to_json())
    return State.FINISHED


def read_result(folder: Path, done: DoneRecord) -> tuple[list[SimilarityRow], dict[str, np.ndarray]]:
    """A finished subject's similarity rows and vectors, each file read once and checked
    against ``done.json`` and the schema (keys, shapes, types, finiteness).

    Raises:
        DamagedResult: naming the file and what is wrong with it.
    """
    problem = _done_problem(done)
    if problem:
        raise DamagedResult(folder / DONE, problem)
    sims = _checked_bytes(folder, SIMILARITIES, done)
    feats = _checked_bytes(folder, FEATURES, done)
    try:
        reader = csv.DictReader(io.StringIO(sims.decode("utf-8")))
        rows = [SimilarityRow(r["subject_id"], r["layer"], r["region_a"], r["region_b"],
                              float(r["cosine"])) for r in reader]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise DamagedResult(folder / SIMILARITIES, f"malformed ({exc})") from exc
    try:
        with np.load(io.BytesIO(feats), allow_pickle=False) as data:
            vectors = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DamagedResult(folder / FEATURES, f"malformed ({exc})") from exc
    layers = _layers(done, vectors)
    problem = _vectors_problem(vectors, layers)
    if problem:
        raise DamagedResult(folder / FEATURES, problem)
    problem = _rows_problem(rows, done.subject_id, layers)
    if problem:
        raise DamagedResult(folder / SIMILARITIES, problem)
    return rows, vectors


def _done_problem(done: DoneRecord) -> str:
    """What is wrong with a ``done.json``'s content ('' when nothing)."""
    if not isinstance(done.extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in done.extra.items()):
        return "its 'extra' is not a mapping of column names to text"
    if set(done.regions) != set(REGIONS):
        return f"its 'regions' holds {sorted(done.regions)}, not the three regions {list(REGIONS)}"
    if done.side not in (None, "L", "R"):
        return f"its 'side' is {done.side!r}, not L, R or empty"
    for region, stats in done.regions.items():
        values = dataclasses.astuple(stats)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return f"its statistics of {region} are not numbers"
    return ""


def _layers(done: DoneRecord, vectors: dict[str, np.ndarray]) -> list[str]:
    """The layers the subject's settings hooked (those of its vectors for an older record)."""
    layers = done.config.get("layers") if isinstance(done.config, dict) else None
    if isinstance(layers, list) and layers:
        return [str(layer) for layer in layers]
    return sorted({key.partition(".")[2] for key in vectors})


def _vectors_problem(vectors: dict[str, np.ndarray], layers: list[str]) -> str:
    """What is wrong with a subject's vectors against the schema ('' when nothing)."""
    expected = {f"{region}.{layer}" for region in REGIONS for layer in layers}
    if set(vectors) != expected:
        wrong = sorted(set(vectors) ^ expected)
        return f"holds arrays {sorted(vectors)}; expected <region>.<layer> for {layers} ({wrong[:3]} differ)"
    for key, vector in vectors.items():
        width = LAYER_WIDTH.get(key.partition(".")[2])
        if vector.ndim != 1 or vector.dtype.kind != "f" or vector.shape[0] != width:
            return (f"array {key} is {vector.dtype} of shape {vector.shape}, not a float vector "
                    f"of {width} values")
        if not np.isfinite(vector).all():
            return f"array {key} holds NaN or infinite values"
    return ""


def _rows_problem(rows: list[SimilarityRow], subject_id: str, layers: list[str]) -> str:
    """What is wrong with a subject's similarity rows ('' when nothing)."""
    expected = {(layer, a, b) for layer in layers for a, b in PAIRS}
    found = [(r.layer, r.region_a, r.region_b) for r in rows]
    if sorted(found) != sorted(expected):
        return f"holds {len(rows)} rows, not one per layer of {layers} and region pair"
    for row in rows:
        if row.subject_id != subject_id:
            return f"a row is of subject {row.subject_id!r}, not {subject_id!r}"
        if not -1.001 <= row.cosine <= 1.001:  # NaN fails too
            return f"cosine {row.cosine!r} ({row.layer}, {row.region_a}-{row.region_b}) is not in [-1, 1]"
    return ""


def read_similarities(folder: Path) -> list[SimilarityRow]:
    """The rows of a subject's ``similarities.csv``."""
    with (folder / SIMILARITIES).open(newline="", encoding="utf-8") as fh:
        return [SimilarityRow(r["subject_id"], r["layer"], r["region_a"], r["region_b"],
                              float(r["cosine"])) for r in csv.DictReader(fh)]


def read_features(folder: Path) -> dict[str, np.ndarray]:
    """``"<region>.<layer>"`` -> vector from a subject's ``features.npz`` (no pickle)."""
    with np.load(folder / FEATURES, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
