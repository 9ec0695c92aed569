"""Weights: torchvision's DenseNet121 with ImageNet weights (its standard download and cache), a
local torchvision ``.pth``, or seeded random weights, inflated to 3D (``build_model``); and the
typed name of where the weights came from, recorded in every output."""

from __future__ import annotations

import logging
import re
import urllib.error
from pathlib import Path

import torch
from torch import nn
from torchvision.models import DenseNet121_Weights, densenet121

from kneebatch.errors import WeightsError
from kneebatch.network.checkpoints import is_published_imagenet, published_imagenet_prefix, state_kind
from kneebatch.network.densenet3d import densenet121_3d
from kneebatch.network.inflate import inflate
from kneebatch.network.provenance import file_sha256
from kneebatch.network.source import IMAGENET, WeightsSource

log = logging.getLogger(__name__)

# Old torchvision checkpoints name DenseNet's layers "norm.1"; torchvision renames them on load, and
# so must we for a .pth given by path.
_OLD_KEYS = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _rename_old_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        match = _OLD_KEYS.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _load_2d(weights: str, seed: int) -> tuple[nn.Module, str]:
    if weights == "imagenet":
        try:
            return densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1), str(IMAGENET)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise WeightsError(
                "Could not download torchvision's ImageNet DenseNet121 weights "
                f"({type(exc).__name__}: {exc}). This machine seems to have no internet. Either "
                "build the model on a machine with internet (`kneebatch build-model --weights "
                "imagenet --out model3d_state_dict.pth`) and copy the .pth and its .json here, or "
                "pass a downloaded torchvision checkpoint: `--weights /path/densenet121-a639ec97.pth`"
                f" (torchvision's cache is {torch.hub.get_dir()}/checkpoints)."
            ) from exc
    if weights == "random":
        torch.manual_seed(seed)  # build_model runs this inside fork_rng
        return densenet121(weights=None), str(WeightsSource("random", seed=seed))
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"--weights {weights!r} is neither 'imagenet', 'random' nor an existing file. "
            "Give the path of a torchvision DenseNet121 checkpoint (.pth)."
        )
    net = densenet121(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state_kind(state) == "3d":
            raise WeightsError(
                f"{path} is already a kneebatch 3D model file, not a torchvision 2D checkpoint: "
                f"use it as it is, `--model {path}` (build-model --weights takes torchvision's "
                "densenet121-*.pth).")
        net.load_state_dict(_rename_old_keys(state))
    except WeightsError:
        raise
    except Exception as exc:  # torch raises many types for a bad checkpoint
        raise WeightsError(
            f"Could not load DenseNet121 weights from {path}: {str(exc)[:300]}. Expected a torchvision "
            "densenet121 state dict such as torchvision's densenet121-a639ec97.pth."
        ) from exc
    sha256 = file_sha256(path)
    if is_published_imagenet(sha256):
        return net, str(IMAGENET)  # the very file torchvision downloads
    log.warning("%s is not torchvision's published ImageNet DenseNet121 file (sha256 %s..., "
                "expected %s...): recorded as a file of its own, not as 'imagenet'", path,
                sha256[:8], published_imagenet_prefix())
    return net, str(WeightsSource("file", name=path.name, sha256=sha256[:16]))


def build_model(*, weights: str = "imagenet", seed: int = 0) -> tuple[nn.Sequential, str]:
    """Build the inflated 3D network.

    Args:
        weights: ``imagenet`` (torchvision's standard download/cache), ``random`` (seeded; for
            tests and offline demos only) or the path of a torchvision densenet121 ``.pth``.
        seed: seed of the random weights.

    Returns:
        The network (eval mode, conv0 still with three colour channels: ``grey_input`` makes it
        take CT) and a string naming the weights that produced it.

    Raises:
        WeightsError: the weights cannot be downloaded or loaded.
    """
    # Building layers draws random initial weights; keep the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        net2d, source = _load_2d(weights, seed)
        features = net2d.features
        assert isinstance(features, nn.Sequential)  # torchvision's DenseNet layout
        inflate(features)
        with torch.device("meta"):
            network = densenet121_3d()  # the same modules, without torchvision
    network.load_state_dict(features.state_dict(), assign=True)
    return network.eval(), source
