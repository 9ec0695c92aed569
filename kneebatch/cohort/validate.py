"""Validate a cohort before any compute (``kneebatch validate``): every manifest row, then each
subject's headers (files, 3D, one grid), then each mask's label values; no model, no cluster.

Checks come back in the order they are made, so a caller can print them as they come: unusable
rows first, then header failures (a fast pass over every subject), then one result per subject
whose headers passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from kneebatch.config import READ_TIMEOUT_S, ExtractionConfig
from kneebatch.errors import KneebatchError
from kneebatch.extract.memory import estimate_bytes
from kneebatch.inputs.labels import LabelMap
from kneebatch.inputs.manifest import parse_manifest
from kneebatch.scan.geometry import Header
from kneebatch.scan.headers import check_headers
from kneebatch.scan.preflight import MaskCheck, check_mask


@dataclasses.dataclass(frozen=True)
class RowCheck:
    """One row's verdict.

    Attributes:
        subject_id: the row's subject (empty when the row has none).
        problem: what is wrong (None: the row looks fine).
        header: the CT's header, when it could be read.
        need_bytes: the predicted peak memory of a worker computing it.
        notes: what is worth knowing about a fine row (e.g. mask values that are no bone).
    """

    subject_id: str
    problem: str | None = None
    header: Header | None = None
    need_bytes: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is wrong with the row."""
        return self.problem is None


def validate_manifest(manifest: Path, config: ExtractionConfig, labels: LabelMap | None = None,
                      *, read_timeout_s: float = READ_TIMEOUT_S,
                      headers_only: bool = False) -> Iterator[RowCheck]:
    """Check every row of a manifest.

    Args:
        manifest: the cohort CSV.
        config: the extraction settings the run will use (mask resampling, memory estimate).
        labels: the label map (``--labels``); rows may override it.
        read_timeout_s: a file that gives no answer for this long fails its row.
        headers_only: skip reading each mask's label values.

    Yields:
        One ``RowCheck`` per manifest row, unusable rows first.

    Raises:
        ManifestError: the manifest itself cannot be used (missing, no header, reserved columns).
    """
    specs, row_problems = parse_manifest(manifest, labels)
    for row in row_problems:
        yield RowCheck(row.subject_id or "", f"manifest {row.message}")
    headers = {}
    for spec in specs:  # first pass: headers only, fast
        try:
            headers[spec.subject_id] = check_headers(spec, config, read_timeout_s)
        except KneebatchError as exc:
            yield RowCheck(spec.subject_id, exc.message)
    for spec in specs:  # second pass: the masks' label values
        if spec.subject_id not in headers:
            continue
        header, mask = headers[spec.subject_id]
        notes: tuple[str, ...] = ()
        if not headers_only:
            try:
                check = check_mask(spec, read_timeout_s)
            except KneebatchError as exc:
                check = MaskCheck((exc.message,), ())
            if check.problems:
                yield RowCheck(spec.subject_id, "; ".join(check.problems), header)
                continue
            notes = check.notes
        yield RowCheck(spec.subject_id, None, header,
                       estimate_bytes(header.size, header.spacing, config, mask.size), notes)
