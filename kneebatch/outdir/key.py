"""Resume stage: the key of a subject's result, a hash of everything that made it.

A finished subject is reused only when its ``done.json`` holds the key the current run computes:
the settings hash, the model's sha256, and the subject's inputs (resolved CT and mask paths with
their size and modification time, every file of a DICOM folder included; the side; the label map).
Editing any of these makes the next run redo that subject. The manifest's extra columns
(covariates) are not in the key: gather joins them from the current manifest, so editing one
recomputes nothing.

Results of earlier kneebatch versions hold a key that also hashed the extra values they were computed
with (``legacy_key``); ``run`` accepts such a result once and rewrites its key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kneebatch.inputs.manifest import SubjectSpec


def _fingerprint(path: Path) -> list[object]:
    """Path, size and mtime of a file; of every file (sorted) for a DICOM folder."""
    try:
        if path.is_dir():
            entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in os.scandir(path) if e.is_file())
            return [str(path), "dir", entries]
        stat = path.stat()
    except OSError as exc:  # missing or unreadable: the subject fails at read, with the reason
        return [str(path), "unreadable", type(exc).__name__]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def subject_key(spec: SubjectSpec, config_hash: str, model_sha256: str) -> str:
    """The key a finished result of ``spec`` must carry under these settings and model."""
    return _hash(_inputs(spec, config_hash, model_sha256))


def legacy_key(spec: SubjectSpec, config_hash: str, model_sha256: str,
               extra: dict[str, str]) -> str:
    """The key earlier kneebatch versions gave the same result, computed with the manifest's extra
    values ``extra`` (those its ``done.json`` records)."""
    return _hash({**_inputs(spec, config_hash, model_sha256), "extra": sorted(extra.items())})


def _hash(fields: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _inputs(spec: SubjectSpec, config_hash: str, model_sha256: str) -> dict[str, object]:
    return {
        "config_hash": config_hash,
        "model_sha256": model_sha256,
        "subject_id": spec.subject_id,
        "ct": _fingerprint(spec.ct),
        "mask": _fingerprint(spec.mask),
        "side": spec.side,
        "labels": str(spec.labels),
        "bilateral": spec.bilateral,
    }
