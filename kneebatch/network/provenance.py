"""Model files without torch: the sidecar JSON beside a model file (what produced it) checked
against the file's sha256. The driver of a run reads only this; the network is loaded by the
workers (``model.py``)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from kneebatch.errors import WeightsError
from kneebatch.network.source import WeightsSource

# The file holds the inflated network with conv0's three colour channels; each load collapses conv0
# to one grey channel the way the extraction settings ask (``input_norm``). Files of the older
# "densenet121-inflated-3d-1ch" (conv0 summed when built) cannot do the exact ImageNet fold.
ARCHITECTURE = "densenet121-inflated-3d"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What produced a model file: recorded in every output."""

    sha256: str
    weights: str
    torch: str
    torchvision: str
    kneebatch: str
    architecture: str = ARCHITECTURE

    @property
    def source(self) -> WeightsSource:
        """The weights source as a typed value."""
        return WeightsSource.parse(self.weights)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_2d_checkpoint(path: Path) -> bool:
    from kneebatch.network.checkpoints import checkpoint_kind  # torch: only for this message

    return checkpoint_kind(path) == "2d"


def sidecar_path(path: Path) -> Path:
    """The JSON beside a model file."""
    return path.with_suffix(".json")


def read_model_info(path: Path) -> ModelInfo:
    """The sidecar of a model file, checked against the file's sha256.

    Raises:
        WeightsError: the file or sidecar is missing, or the sha256 does not match.
    """
    side = sidecar_path(path)
    if path.is_file() and not side.is_file() and _is_2d_checkpoint(path):
        raise WeightsError(
            f"{path} is a torchvision 2D checkpoint, not a kneebatch model: build it first: "
            f"kneebatch build-model --weights {path} --out model3d_state_dict.pth (then pass "
            "--model model3d_state_dict.pth).")
    if not path.is_file():
        raise WeightsError(
            f"Model file {path} does not exist. Build it once with `kneebatch build-model --out "
            f"{path}` (or set $KNEEBATCH_MODEL / --model to where it is)."
        )
    try:
        info = ModelInfo(**json.loads(side.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsError(
            f"Model sidecar {side} is missing or unreadable ({exc}). Rebuild the model with "
            f"`kneebatch build-model --out {path}`; it writes both files."
        ) from exc
    actual = file_sha256(path)
    if actual != info.sha256:
        raise WeightsError(
            f"Model file {path} has sha256 {actual[:16]}..., but its sidecar {side.name} says "
            f"{info.sha256[:16]}...: the file was changed or partly copied. Copy it again or "
            "rebuild it with `kneebatch build-model`."
        )
    return info


def not_ours(path: Path, why: str) -> WeightsError:
    """The error for a file whose tensors are not the 3D network's."""
    return WeightsError(
        f"Model file {path} is not a kneebatch {ARCHITECTURE} state dict ({why}). A torchvision "
        "2D checkpoint must be inflated first: `kneebatch build-model --weights FILE --out "
        "model3d_state_dict.pth`.")


def our_model_info(path: Path) -> ModelInfo:
    """``read_model_info``, refusing files of an older layout."""
    info = read_model_info(path)
    if info.architecture != ARCHITECTURE:
        raise WeightsError(
            f"Model file {path} was built by an older kneebatch (layout {info.architecture!r}, "
            f"this one needs {ARCHITECTURE!r}: conv0 keeps its three colour channels so ImageNet's "
            f"normalisation can be folded in exactly). Rebuild it once: `kneebatch build-model "
            f"--weights {info.source.option} --out {path}`.")
    return info


@functools.lru_cache(maxsize=4)
def _cached_info(path: str, mtime_ns: int, sidecar_mtime_ns: int) -> ModelInfo:
    return our_model_info(Path(path))


def resolved(path: Path) -> tuple[str, int]:
    """A model file's resolved path and modification time: the key of a per-process cache."""
    real = path.resolve()
    try:
        mtime_ns = real.stat().st_mtime_ns
    except OSError:
        mtime_ns = -1  # the loaders raise the helpful error
    return str(real), mtime_ns


def model_info(path: Path) -> ModelInfo:
    """``our_model_info``, read (and the file hashed) once per process, again if the file or its
    sidecar changes.

    Raises:
        WeightsError: see ``read_model_info``; also a file of an older kneebatch layout.
    """
    real, mtime_ns = resolved(path)
    return _cached_info(real, mtime_ns, resolved(sidecar_path(Path(real)))[1])
