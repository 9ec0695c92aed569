"""Errors that kneebatch raises for problems a user can fix.

Every message names the subject (when there is one), the file, what was found, what was expected and
what to do next. The CLI prints the message without a traceback (``--debug`` shows it).
"""

from __future__ import annotations


class KneebatchError(Exception):
    """Base of every expected kneebatch error.

    Attributes:
        stage: the pipeline stage that raised it (``read``, ``regions``, ``model``, ...), recorded
            in ``failures.csv``.
        subject_failure: True when the error is about one subject's data (exit code 1), False when
            it is about usage or configuration (exit code 2).
    """

    stage = "config"
    subject_failure = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(KneebatchError):
    """A bad option or setting, found before any subject was processed."""


class ManifestError(KneebatchError):
    """A manifest that cannot be used as it is."""

    stage = "manifest"


class InputImageError(KneebatchError):
    """A CT or mask file that cannot be read or is not a usable 3D image."""

    stage = "read"
    subject_failure = True


class GeometryError(InputImageError):
    """A CT and mask that do not share one voxel grid."""

    stage = "geometry"


class RegionError(KneebatchError):
    """A region (tibia, femur, background) that cannot be made from the mask."""

    stage = "regions"
    subject_failure = True


class WeightsError(KneebatchError):
    """Network weights that cannot be loaded, or a model file that fails its check."""

    stage = "model"


class OutputError(KneebatchError):
    """An output folder or file that cannot be written."""

    stage = "write"


class MemoryLimitError(KneebatchError):
    """A subject whose predicted memory exceeds what its worker may use."""

    stage = "memory"
    subject_failure = True


class SubjectTimeoutError(KneebatchError):
    """A subject still computing after ``--subject-timeout`` seconds."""

    stage = "timeout"
    subject_failure = True
