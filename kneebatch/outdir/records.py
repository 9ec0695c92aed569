"""Records on disk: ``done.json`` (a finished subject), run, failure, settings, manifest and merge
records, and the Parquet files' provenance metadata.

Each record is a frozen dataclass, nested ones too, with one writer (``to_json``) and one reader
(``from_dict``/``read``) that tolerates what another kneebatch version wrote: unknown keys are
ignored, missing ones take their defaults, nested records are parsed from the field's type hint,
and a file that is not a record at all reads as None. No other module reads these files with
string keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

log = logging.getLogger(__name__)

R = TypeVar("R", bound="Record")
D = TypeVar("D")


class _NotARecord(ValueError):
    """A value that does not fit its field's type."""


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(hint: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as the type ``hint`` says: nested dataclasses built from dicts,
    dicts and lists item by item; other values as they are."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise _NotARecord(f"{hint.__name__} expected, found {type(value).__name__}")
        return parse_dataclass(hint, value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(arg, value)
            except _NotARecord:
                continue
        raise _NotARecord(f"{value!r} fits none of {args}")
    if origin is dict and args and any(dataclasses.is_dataclass(a) for a in args):
        if not isinstance(value, dict):
            raise _NotARecord(f"a mapping expected, found {type(value).__name__}")
        return {k: _parse(args[1], v) for k, v in value.items()}
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise _NotARecord(f"a list expected, found {type(value).__name__}")
        return [_parse(args[0], v) for v in value]
    return value


def parse_dataclass(cls: type[D], data: dict[str, Any]) -> D:
    """A dataclass from a parsed-JSON dict: unknown keys ignored, missing ones defaulted, nested
    records parsed from the type hints.

    Raises:
        _NotARecord: a required field is missing or a nested value has the wrong shape.
    """
    hints = _hints(typing.cast(Any, cls))
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: _parse(hints[k], v) for k, v in data.items() if k in fields}
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise _NotARecord(str(exc)) from exc


class Record:
    """JSON (de)serialisation shared by the records below."""

    def to_json(self) -> str:
        """The record as pretty, sorted JSON (one writer for each record type)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: object) -> R | None:
        """The record from parsed JSON; unknown keys ignored, None if required ones are missing."""
        if not isinstance(data, dict):
            return None
        try:
            return parse_dataclass(cls, data)
        except _NotARecord:  # a required field is missing: not a record of this type
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
class RegionRecord:
    """One region's volume and HU statistics on the native grid (``done.json``'s ``regions``);
    its fields are the ``regions`` dataset's statistics columns (``schema.STAT_COLUMNS``)."""

    voxels: int
    volume_ml: float
    hu_mean: float
    hu_std: float
    hu_p5: float
    hu_p25: float
    hu_p50: float
    hu_p75: float
    hu_p95: float


@dataclasses.dataclass(frozen=True)
class DoneRecord(Record):
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
    files: dict[str, FileEntry] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    side: str | None = None
    ct: str = ""
    mask: str = ""
    extra: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: str = ""
    bilateral: bool = False
    regions: dict[str, RegionRecord] = dataclasses.field(default_factory=dict)
    spacing_mm: list[float] = dataclasses.field(default_factory=list)
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    boxes: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    forward: dict[str, bool] = dataclasses.field(default_factory=dict)
    finished_at: str = ""


@dataclasses.dataclass(frozen=True)
class FailureRecord(Record):
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
class Counts:
    """What a run did with its subjects (unusable manifest rows count as failed)."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    changed: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other),
                                              strict=True)))


@dataclasses.dataclass(frozen=True)
class ParquetSummary:
    """What the Parquet datasets hold after a gather or a merge (``run.json``'s ``parquet``)."""

    subjects: int = 0
    failures: int = 0
    pending: int = 0
    left_out_folders: int = 0
    extra_types: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ParquetMetadata:
    """The provenance in every Parquet file's schema metadata (``schema.METADATA_KEY``)."""

    schema_version: int = 1  # files of kneebatch before the version was recorded
    run_id: str = ""
    model_sha256: str = ""
    weights: str = ""
    config_hash: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: str = ""
    extra_types: dict[str, str] = dataclasses.field(default_factory=dict)
    merged_from: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class MergedRecord(Record):
    """``.kneebatch/merged.json``: OUT was written by ``kneebatch merge`` from these folders."""

    sources: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class RunRecord(Record):
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
    pid: int = 0
    slurm: dict[str, str] = dataclasses.field(default_factory=dict)
    shard: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    shards: list[str] = dataclasses.field(default_factory=list)
    counts: Counts | None = None
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0
    workers: int = 0  # subjects computed at once (task slots), for --dry-run's estimate
    stopped: bool = False
    parquet: ParquetSummary | None = None
    schema_version: int = 0
    sources: list[str] = dataclasses.field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        """What the Parquet schema metadata records of this run."""
        return {"run_id": self.run_id, "model_sha256": self.model_sha256, "weights": self.weights,
                "config_hash": self.config_hash, "config": self.config, "versions": self.versions,
                "labels": self.labels}


@dataclasses.dataclass(frozen=True)
class SettingsRecord(Record):
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
class ManifestRecord(Record):
    """``.kneebatch/manifest.json``: the subjects of the last run and the key each result must
    have; gather takes exactly these subjects, with their covariates (``extras``: subject ->
    the manifest's extra values) and the columns' types."""

    subjects: dict[str, str]
    path: str | None = None
    sha256: str | None = None
    extra_types: dict[str, str] = dataclasses.field(default_factory=dict)
    extras: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
