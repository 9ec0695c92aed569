"""Records on disk: ``done.json`` (a finished subject), a run record and a failure record.

Each record is a frozen dataclass with one writer (``to_json``) and one reader (``from_json``) that
tolerates what another kneebatch version wrote: unknown keys are ignored, missing ones take their
defaults, and a file that is not a record at all reads as None. No other module reads these files
with string keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R", bound="_Record")


class _Record:
    """JSON (de)serialisation shared by the records below."""

    def to_json(self) -> str:
        """The record as pretty, sorted JSON (one writer for each record type)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: object) -> R | None:
        """The record from parsed JSON; unknown keys ignored, None if required ones are missing."""
        if not isinstance(data, dict):
            return None
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:  # a required field is missing: not a record of this type
            return None

    @classmethod
    def read(cls: type[R], path: Path) -> R | None:
        """The record stored at ``path``, or None when missing, unreadable or not such a record."""
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one result file, so a damaged file is told from a finished one."""

    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class DoneRecord(_Record):
    """``subjects/<id>/done.json``: a subject is finished with exactly these inputs and settings.

    Attributes:
        subject_id: the subject.
        key: hash of everything that made the result (settings, model, inputs); see ``key.py``.
        config_hash, config: the extraction settings.
        model_sha256, weights: the model file and the weights it holds.
        run_id: the run that computed the result (``extract`` makes its own).
        files: name -> size and sha256 of each result file written before this record.
        side, ct, mask, extra, labels: the subject's inputs as the manifest gave them
            (``labels`` as ``tibia=1,femur=2``).
        regions: region -> volume and HU statistics on the native grid (``region_stats``).
        warnings: per-subject warnings (e.g. unknown mask labels).
        forward: the ``ForwardOptions`` the forward pass ran with.
    """

    subject_id: str
    key: str
    config_hash: str
    model_sha256: str
    weights: str
    run_id: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    side: str | None = None
    ct: str = ""
    mask: str = ""
    extra: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: str = ""
    bilateral: bool = False
    regions: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    spacing_mm: list[float] = dataclasses.field(default_factory=list)
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    boxes: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    forward: dict[str, bool] = dataclasses.field(default_factory=dict)
    finished_at: str = ""

    def file_entry(self, name: str) -> FileEntry | None:
        """The recorded size and sha256 of result file ``name``."""
        entry = self.files.get(name)
        if not isinstance(entry, dict):
            return None
        try:
            return FileEntry(int(entry["size"]), str(entry["sha256"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclasses.dataclass(frozen=True)
class FailureRecord(_Record):
    """One failed subject (or unusable manifest row): a row of ``failures.csv``."""

    subject_id: str
    error: str
    stage: str
    ct: str = ""
    mask: str = ""
    time: str = ""
    run_id: str = ""


FAILURE_COLUMNS = tuple(f.name for f in dataclasses.fields(FailureRecord))


@dataclasses.dataclass(frozen=True)
class RunRecord(_Record):
    """One run (or array shard): what it was asked, what it did; ``run.json`` is the latest one
    plus what the Parquet holds (``parquet``). After the gather of a job array, ``counts`` add up
    every shard's latest record and ``shards`` lists their run ids."""

    run_id: str
    started: str
    ended: str = ""
    config_hash: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_sha256: str = ""
    weights: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    model_built_with: dict[str, str] = dataclasses.field(default_factory=dict)
    manifest: str | None = None
    manifest_sha256: str | None = None
    labels: str = ""
    command: list[str] = dataclasses.field(default_factory=list)
    host: str = ""
    slurm: dict[str, str] = dataclasses.field(default_factory=dict)
    shard: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    shards: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0
    stopped: bool = False
    parquet: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = 0
    sources: list[str] = dataclasses.field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        """What the Parquet schema metadata records of this run."""
        return {"run_id": self.run_id, "model_sha256": self.model_sha256, "weights": self.weights,
                "config_hash": self.config_hash, "config": self.config, "versions": self.versions,
                "labels": self.labels}


@dataclasses.dataclass(frozen=True)
class SettingsRecord(_Record):
    """``.kneebatch/settings.json``: the settings and model every result in OUT is made with."""

    config_hash: str
    model_sha256: str
    weights: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def differs_from(self, other: SettingsRecord) -> list[str]:
        """What differs from ``other``, in words (empty when the same)."""
        changes = []
        if self.model_sha256 != other.model_sha256:
            changes.append(f"model {self.weights} ({self.model_sha256[:12]}) -> {other.weights} "
                           f"({other.model_sha256[:12]})")
        if self.config_hash != other.config_hash:
            keys = sorted(set(self.config) | set(other.config))
            changes += [f"{k} {self.config.get(k)!r} -> {other.config.get(k)!r}" for k in keys
                        if self.config.get(k) != other.config.get(k)] or ["settings"]
        return changes


@dataclasses.dataclass(frozen=True)
class ManifestRecord(_Record):
    """``.kneebatch/manifest.json``: the subjects of the last run and the key each result must
    have; gather takes exactly these subjects."""

    subjects: dict[str, str]
    path: str | None = None
    sha256: str | None = None
    extra_types: dict[str, str] = dataclasses.field(default_factory=dict)
