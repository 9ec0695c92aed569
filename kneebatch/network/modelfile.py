"""Model files: the inflated network's state dict and its sidecar JSON (sha256, weights source,
versions; ``provenance.py``). ``save_model`` writes them; ``check_model_file`` checks a file before
any compute (the sidecar, the tensors' names and shapes) without loading its weights."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from kneebatch import __version__
from kneebatch.network.densenet3d import densenet121_3d
from kneebatch.network.provenance import ModelInfo, file_sha256, model_info, not_ours, sidecar_path


def architecture() -> nn.Sequential:
    """The 3D network's modules on the ``meta`` device (no memory, no random weights drawn): the
    layout that model files hold; ``load_state_dict(..., assign=True)`` gives it real tensors."""
    with torch.device("meta"):
        return densenet121_3d().eval()


def save_model(network: nn.Module, weights_source: str, path: Path) -> ModelInfo:
    """Write the state dict and its sidecar JSON (each to a temporary name, then renamed).

    Returns:
        The provenance written to the sidecar.
    """
    import torchvision  # built from torchvision's network: imported there already

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


def check_model_file(path: Path) -> ModelInfo:
    """Check a model file before any compute: sidecar, sha256, and the tensors it holds (names
    and shapes of the 3D network's state dict; memory-mapped, nothing is loaded).

    Raises:
        WeightsError: the file is missing, changed, or not a kneebatch model.
    """
    info = model_info(path)
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
