"""Store stage: write one subject's outputs atomically; tell finished subjects from the rest.

Layout (a contract, see DESIGN.md): ``OUT/subjects/<id>/features.npz``, ``similarities.csv`` and
``done.json``, written last. Each file goes to a temporary name in the same folder and is renamed into
place, so a reader never sees half a file, and a subject without a matching ``done.json`` is not
finished.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from kneebatch.errors import OutputError
from kneebatch.similarity import SimilarityRow

FEATURES = "features.npz"
SIMILARITIES = "similarities.csv"
DONE = "done.json"
SIM_COLUMNS = ("subject_id", "layer", "region_a", "region_b", "cosine")


def subject_dir(out: Path, subject_id: str) -> Path:
    """``OUT/subjects/<id>``; the id was checked safe by the manifest, the path is checked again."""
    base = out / "subjects"
    path = base / subject_id
    if path.parent != base or subject_id in (".", "..") or "/" in subject_id:
        raise OutputError(f"Subject id {subject_id!r} would write outside {base}.")
    return path


@contextlib.contextmanager
def _atomic(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_temporaries(out: Path, subject_ids: list[str]) -> None:
    """Delete temporary files a killed run left in these subjects' folders (never a result)."""
    for subject_id in subject_ids:
        for tmp in subject_dir(out, subject_id).glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder."""
    with _atomic(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder."""
    with _atomic(path) as fh:
        fh.write(data)


def _similarities_csv(rows: list[SimilarityRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SIM_COLUMNS)
    for row in rows:
        writer.writerow([row.subject_id, row.layer, row.region_a, row.region_b,
                         repr(float(row.cosine))])
    return buffer.getvalue()


def write_subject(out: Path, subject_id: str, vectors: dict[str, dict[str, np.ndarray]],
                  rows: list[SimilarityRow], done: dict[str, Any],
                  started: float, extra: dict[str, bytes] | None = None) -> dict[str, float]:
    """Write a subject's three files; ``done.json`` last, with the write and total times added.

    Args:
        out: the run's output folder.
        subject_id: the subject.
        vectors: region -> layer -> float32 vector; stored as ``"<region>.<layer>"``.
        rows: the similarity rows.
        done: the provenance and ``timings_s`` for ``done.json``.
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
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (folder / DONE).unlink()  # a stale done.json must not vouch for new files
        arrays = {f"{region}.{layer}": vec.astype(np.float32)
                  for region, by_layer in vectors.items() for layer, vec in by_layer.items()}
        with _atomic(folder / FEATURES) as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        write_text_atomic(folder / SIMILARITIES, _similarities_csv(rows))
        for name, data in (extra or {}).items():
            write_bytes_atomic(folder / name, data)
        now = time.perf_counter()
        timings = {**done["timings_s"], "write": now - write_start, "total": now - started}
        done = {**done, "timings_s": {k: round(v, 4) for k, v in timings.items()}}
        write_text_atomic(folder / DONE, json.dumps(done, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        for name in (FEATURES, SIMILARITIES, *(extra or {})):  # no half set without done.json
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        raise OutputError(
            f"Subject {subject_id}: cannot write {folder} ({exc.strerror or exc}). Check that "
            "the output folder is writable and has free space; finished subjects are kept."
        ) from exc
    return timings


def read_done(folder: Path) -> dict[str, Any] | None:
    """The subject's ``done.json``, or None when missing or unreadable."""
    try:
        data = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_finished(out: Path, subject_id: str, config_hash: str, model_sha256: str) -> bool:
    """True when the subject's ``done.json`` matches this config and model and its files exist."""
    folder = subject_dir(out, subject_id)
    done = read_done(folder)
    return (
        done is not None
        and done.get("config_hash") == config_hash
        and done.get("model_sha256") == model_sha256
        and (folder / FEATURES).is_file()
        and (folder / SIMILARITIES).is_file()
    )


def read_similarities(folder: Path) -> list[SimilarityRow]:
    """The rows of a subject's ``similarities.csv``."""
    with (folder / SIMILARITIES).open(newline="") as fh:
        return [SimilarityRow(r["subject_id"], r["layer"], r["region_a"], r["region_b"],
                              float(r["cosine"])) for r in csv.DictReader(fh)]


def read_features(folder: Path) -> dict[str, np.ndarray]:
    """``"<region>.<layer>"`` -> vector from a subject's ``features.npz`` (no pickle)."""
    with np.load(folder / FEATURES, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
