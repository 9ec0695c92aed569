"""Model stage, part 3: tell checkpoint files apart, so a file given to the wrong option gets the
command that fits it, and recognise torchvision's published ImageNet DenseNet121 file."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torchvision.models import DenseNet121_Weights

# torch.hub names its files "<name>-<first hex digits of the sha256>.<ext>".
_HUB_HASH = re.compile(r"-([a-f0-9]{6,})\.")


def published_imagenet_prefix() -> str:
    """The sha256 prefix in the name of torchvision's ImageNet DenseNet121 file (``a639ec97``)."""
    match = _HUB_HASH.search(DenseNet121_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    assert match is not None  # torchvision's URL always carries it
    return match.group(1)


def is_published_imagenet(sha256: str) -> bool:
    """Whether a file with this sha256 is torchvision's published ImageNet DenseNet121 file."""
    return sha256.startswith(published_imagenet_prefix())


def checkpoint_kind(path: Path) -> str:
    """``2d`` (a torchvision DenseNet checkpoint), ``3d`` (a kneebatch model file) or ``unknown``,
    from the rank of its first convolution's weight (memory-mapped, nothing is loaded)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a file that is not a checkpoint
        return "unknown"
    return state_kind(state)


def state_kind(state: object) -> str:
    """``checkpoint_kind`` of a loaded state dict."""
    if not isinstance(state, dict):
        return "unknown"
    for key, value in state.items():
        if str(key).endswith("conv0.weight") and isinstance(value, torch.Tensor):
            return {4: "2d", 5: "3d"}.get(value.dim(), "unknown")
    return "unknown"
