"""Model files: the inflated network's state dict and its sidecar JSON (sha256, weights source,
versions). ``save_model`` writes them; ``read_model_info`` and ``check_model_file`` check a file
before any compute (the sha256, the tensors' names and shapes) without loading its weights."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import densenet121

from kneebatch import __version__
from kneebatch.errors import WeightsError
from kneebatch.network.checkpoints import checkpoint_kind
from kneebatch.network.inflate import inflate
from kneebatch.network.source import WeightsSource
from kneebatch.network.weights import file_sha256

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


def architecture() -> nn.Sequential:
    """The 3D network's modules on the ``meta`` device (no memory, no random weights drawn): the
    layout that model files hold; ``load_state_dict(..., assign=True)`` gives it real tensors."""
    with torch.device("meta"):
        features = densenet121(weights=None).features
        inflate(features)
    return features.eval()


def sidecar_path(path: Path) -> Path:
    """The JSON beside a model file."""
    return path.with_suffix(".json")


def save_model(network: nn.Module, weights_source: str, path: Path) -> ModelInfo:
    """Write the state dict and its sidecar JSON (each to a temporary name, then renamed).

    Returns:
        The provenance written to the sidecar.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(network.state_dict(), tmp)
    info = ModelInfo(
        sha256=file_sha256(tmp),
        weights=weights_source,
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        kneebatch=__version__,
    )
    side = sidecar_path(path)
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    side_tmp.write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    os.replace(tmp, path)
    os.replace(side_tmp, side)
    return info


def read_model_info(path: Path) -> ModelInfo:
    """The sidecar of a model file, checked against the file's sha256.

    Raises:
        WeightsError: the file or sidecar is missing, or the sha256 does not match.
    """
    side = sidecar_path(path)
    if path.is_file() and not side.is_file() and checkpoint_kind(path) == "2d":
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
    return WeightsError(
        f"Model file {path} is not a kneebatch {ARCHITECTURE} state dict ({why}). A torchvision "
        "2D checkpoint must be inflated first: `kneebatch build-model --weights FILE --out "
        "model3d_state_dict.pth`.")


def our_model_info(path: Path) -> ModelInfo:
    info = read_model_info(path)
    if info.architecture != ARCHITECTURE:
        raise WeightsError(
            f"Model file {path} was built by an older kneebatch (layout {info.architecture!r}, "
            f"this one needs {ARCHITECTURE!r}: conv0 keeps its three colour channels so ImageNet's "
            f"normalisation can be folded in exactly). Rebuild it once: `kneebatch build-model "
            f"--weights {info.source.option} --out {path}`.")
    return info


def check_model_file(path: Path) -> ModelInfo:
    """Check a model file before any compute: sidecar, sha256, and the tensors it holds (names
    and shapes of the 3D network's state dict; memory-mapped, nothing is loaded).

    Raises:
        WeightsError: the file is missing, changed, or not a kneebatch model.
    """
    info = our_model_info(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise not_ours(path, str(exc)[:300]) from exc
    expected = {k: tuple(v.shape) for k, v in architecture().state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        odd = sorted(k for k in found if expected.get(k) != found[k])[:3]
        raise not_ours(path, f"missing {missing or 'nothing'}, unexpected or reshaped "
                              f"{odd or 'nothing'}")
    return info
