"""Manifest stage: parse a cohort CSV into checked ``SubjectSpec`` objects before any compute.

Required columns ``subject_id``, ``ct``, ``mask``; optional ``side`` (``L``/``R``/empty) and
``tibia_label``/``femur_label`` (this row's mask values, overriding ``--labels``); any other column
is kept and carried into the outputs. Paths are resolved against the manifest's folder.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

from kneebatch.errors import KneebatchError, ManifestError
from kneebatch.inputs.labels import LabelMap
from kneebatch.schema import RESERVED

REQUIRED = ("subject_id", "ct", "mask")
LABEL_COLUMNS = ("tibia_label", "femur_label")
OPTIONAL = ("side", *LABEL_COLUMNS)
SIDES = ("L", "R")
BOTH = "both"  # a bilateral scan: two knees, <id>_L and <id>_R
# Columns kneebatch writes into its outputs: an extra manifest column may not take these names.
MAX_ID_LENGTH = 200  # a folder name must fit in 255 bytes, with room for kneebatch's own suffixes
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclasses.dataclass(frozen=True)
class SubjectSpec:
    """One knee to process.

    Attributes:
        subject_id: unique, safe for a folder name.
        ct: CT file or DICOM series folder (absolute).
        mask: label mask file (absolute); tibia = 1, femur = 2, background = 0.
        side: ``L`` (mirrored to look like a right knee), ``R`` or None (unknown; not mirrored).
        extra: the manifest's other columns, carried into the outputs.
        labels: the mask values of tibia and femur.
        bilateral: the scan holds both legs; this knee is its ``side`` leg.
    """

    subject_id: str
    ct: Path
    mask: Path
    side: str | None = None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: LabelMap = dataclasses.field(default_factory=LabelMap)
    bilateral: bool = False


@dataclasses.dataclass(frozen=True)
class RowProblem:
    """A manifest row that cannot be used; a cohort run lists it in ``failures.csv``."""

    line: int
    subject_id: str
    message: str


def check_subject_id(subject_id: str, where: str = "") -> str:
    """Return ``subject_id`` if it is safe as a folder name, else raise ManifestError."""
    if not subject_id or subject_id in (".", "..") or not _SAFE_ID.match(subject_id):
        raise ManifestError(
            f"{where}subject id {subject_id!r} is not allowed: use letters, digits, '.', '_' and "
            "'-' only (no '/', spaces or '..'), e.g. 'knee_001'."
        )
    if len(subject_id) > MAX_ID_LENGTH:
        raise ManifestError(f"{where}subject id {subject_id[:40]!r}... is {len(subject_id)} "
                            f"characters long; use at most {MAX_ID_LENGTH}.")
    return subject_id


def check_side(side: str | None, where: str = "") -> str | None:
    """Normalise a side value (``L``, ``R``, ``both``, empty/None); raise ManifestError
    otherwise."""
    if side is None or side.strip() == "":
        return None
    if side.strip().lower() == BOTH:
        return BOTH
    value = side.strip().upper()
    if value not in SIDES:
        raise ManifestError(f"{where}side {side!r} is not allowed: use L, R, both (a bilateral "
                            "scan) or leave it empty.")
    return value


def scan_id(subject_id: str, bilateral: bool) -> str:
    """The manifest row a knee came from: its own id, or a bilateral scan's id for the knees
    ``<id>_L`` and ``<id>_R``."""
    return subject_id[:-2] if bilateral else subject_id


def knees(spec: SubjectSpec) -> list[SubjectSpec]:
    """The knees of a manifest row: itself, or for side ``both`` its two legs ``<id>_L``
    (mirrored) and ``<id>_R``."""
    if spec.side != BOTH:
        return [spec]
    return [dataclasses.replace(spec, subject_id=check_subject_id(f"{spec.subject_id}_{side}"),
                                side=side, bilateral=True) for side in SIDES]


def subject_spec(subject_id: str, ct: Path | str, mask: Path | str,
                 side: str | None = None, labels: LabelMap | None = None) -> SubjectSpec:
    """A checked spec for one knee given directly (``extract``, the Python API).

    Raises:
        ManifestError: an unsafe subject id or a bad side.
    """
    return SubjectSpec(check_subject_id(subject_id), Path(ct).resolve(), Path(mask).resolve(),
                       check_side(side), labels=labels or LabelMap())


def _row_problems(row: dict[str, str], line: int, folder: Path,
                  labels: LabelMap) -> tuple[SubjectSpec | None, list[str]]:
    where = f"row {line}: "
    problems = []
    values = {k: (v or "").strip() for k, v in row.items() if k is not None}
    if None in row:
        problems.append(f"{where}more fields than header columns; quote paths that hold commas.")
    sid = values.get("subject_id", "")
    try:
        check_subject_id(sid, where)
    except ManifestError as exc:
        problems.append(exc.message)
    try:
        side = check_side(values.get("side"), where)
    except ManifestError as exc:
        problems.append(exc.message)
        side = None
    try:
        labels = labels.override(values.get("tibia_label"), values.get("femur_label"), where)
    except KneebatchError as exc:
        problems.append(exc.message)
    for column in ("ct", "mask"):
        if not values.get(column):
            problems.append(f"{where}column {column!r} is empty; give the {column} file path.")
    if problems:
        return None, problems
    extra = {k: v for k, v in values.items() if k not in (*REQUIRED, *OPTIONAL)}
    spec = SubjectSpec(
        subject_id=sid,
        ct=(folder / values["ct"]).resolve(),
        mask=(folder / values["mask"]).resolve(),
        side=side,
        extra=extra,
        labels=labels,
    )
    return spec, []


def parse_manifest(path: Path, labels: LabelMap | None = None
                   ) -> tuple[list[SubjectSpec], list[RowProblem]]:
    """Parse a manifest, keeping the usable rows and listing the others.

    Args:
        path: the CSV (UTF-8, a BOM is accepted).
        labels: the cohort's label map (``--labels``); a row's ``tibia_label`` / ``femur_label``
            override it.

    Returns:
        The usable subjects in file order (fully empty rows skipped) and the rows with problems
        (bad, unsafe or repeated ids, bad sides, empty paths, stray fields).

    Raises:
        ManifestError: the file cannot be read or lacks a required column.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"Cannot read manifest {path}: {exc}. Give a UTF-8 CSV file.") from exc
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(
            f"Manifest {path} lacks column(s) {', '.join(missing)}; its header is {header}. "
            "The first line must name at least: subject_id,ct,mask (optional: side, tibia_label, "
            "femur_label, any others)."
        )
    clashes = [c for c in header if c in RESERVED]
    if clashes:
        raise ManifestError(
            f"Manifest {path}: column(s) {', '.join(clashes)} would clash with kneebatch's output "
            f"columns. Rename them (e.g. {clashes[0]} -> my_{clashes[0]}); reserved names: "
            f"{', '.join(RESERVED)}.")
    reader.fieldnames = header
    specs: list[SubjectSpec] = []
    problems: list[RowProblem] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num  # file line, blank lines counted
        if all(not (v or "").strip() for k, v in row.items() if k is not None) and None not in row:
            continue
        spec, row_problems = _row_problems(row, line, path.parent.resolve(), labels or LabelMap())
        raw_id = (row.get("subject_id") or "").strip()
        problems.extend(RowProblem(line, raw_id, p) for p in row_problems)
        if spec is None:
            continue
        try:
            found = knees(spec)
        except ManifestError as exc:
            problems.append(RowProblem(line, raw_id, f"row {line}: {exc.message}"))
            continue
        repeated = [k.subject_id for k in found if k.subject_id in seen]
        if repeated:
            problems.append(RowProblem(line, raw_id, (
                f"row {line}: subject id {repeated[0]!r} repeats row "
                f"{seen[repeated[0]]}; subject ids must be unique (side 'both' makes "
                "<id>_L and <id>_R).")))
            continue
        seen.update(dict.fromkeys((k.subject_id for k in found), line))
        specs.extend(found)
    return specs, problems


def read_manifest(path: Path, labels: LabelMap | None = None) -> list[SubjectSpec]:
    """Parse a manifest strictly: every problem of every row is reported at once.

    Raises:
        ManifestError: listing every problem found, or when no row is left.
    """
    specs, problems = parse_manifest(path, labels)
    if problems:
        raise ManifestError(f"Manifest {path} has {len(problems)} problem(s):\n  " +
                            "\n  ".join(p.message for p in problems))
    if not specs:
        raise ManifestError(f"Manifest {path} lists no subjects; add one row per knee.")
    return specs
