"""What a worker reports back for one subject: small, torch-free (the data is on disk), so progress
and status read it without importing the network."""

from __future__ import annotations

import dataclasses
from typing import Literal

Status = Literal["finished", "failed", "claimed", "skipped"]


@dataclasses.dataclass(frozen=True)
class SubjectOutcome:
    """What a worker reports back for one subject (small; the data is on disk).

    Attributes:
        status: ``finished`` (computed now), ``failed``, ``claimed`` (another process holds the
            subject: nothing done) or ``skipped`` (another process finished it meanwhile).
        internal: failed with an unexpected error (a kneebatch bug, not the subject's data).
    """

    subject_id: str
    status: Status
    error: str | None = None
    stage: str | None = None
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    internal: bool = False

    @property
    def ok(self) -> bool:
        """True when the subject was computed now."""
        return self.status == "finished"
