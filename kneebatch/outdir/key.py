"""Resume stage: the key of a subject's result, a hash of everything that made it.

A finished subject is reused only when its ``done.json`` holds the key the current run computes:
the settings hash, the model's sha256, and the subject's inputs (resolved CT and mask paths with
their size and modification time, every file of a DICOM folder included; the side; the label map;
the manifest's extra values). Editing any of these makes the next run redo that subject.
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
    blob = json.dumps({
        "config_hash": config_hash,
        "model_sha256": model_sha256,
        "subject_id": spec.subject_id,
        "ct": _fingerprint(spec.ct),
        "mask": _fingerprint(spec.mask),
        "side": spec.side,
        "labels": str(spec.labels),
        "bilateral": spec.bilateral,
        "extra": sorted(spec.extra.items()),
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
