"""The loaded network: a model file's 3D DenseNet made ready to extract features (conv0 collapsed
to one grey channel, the convolutions' padding set, memory-lean blocks, channels-last layout), with
no torchvision (compute nodes only load model files)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import torch
from torch import nn

from kneebatch.config import ConvPadding, InputNorm
from kneebatch.network.inflate import collapse_input_channels
from kneebatch.network.lean import make_lean
from kneebatch.network.modelfile import architecture
from kneebatch.network.provenance import ModelInfo, model_info, not_ours


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """The 3D network (``densenet121().features``, inflated, eval mode) and its provenance."""

    network: nn.Sequential
    info: ModelInfo
    # One forward pass at a time in a process: a worker reads and preprocesses its next subject
    # while the current one runs through the network, but never holds two forwards' activations.
    forward_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock,
                                                     compare=False, repr=False)


def _conv0(features: nn.Sequential) -> nn.Conv3d:
    conv0 = features.conv0
    assert isinstance(conv0, nn.Conv3d)  # inflate() made it so
    return conv0


# ImageNet's per-channel mean and std, as torchvision's DenseNet121 weights normalise (their
# ``transforms()``; a test holds these to torchvision's, so loading needs no torchvision).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def grey_input(features: nn.Sequential, input_norm: InputNorm) -> nn.Sequential:
    """Collapse conv0 of an inflated network to one grey channel (in place; see
    ``collapse_input_channels``): ``imagenet`` folds ImageNet's per-channel normalisation in
    exactly (input in [0, 1]), ``grey`` sums the kernels (input normalised with one grey mean/std).
    """
    if input_norm == "imagenet":
        collapse_input_channels(_conv0(features), IMAGENET_MEAN, IMAGENET_STD)
    else:
        collapse_input_channels(_conv0(features))
    return features


def set_conv_padding(features: nn.Sequential, mode: ConvPadding) -> nn.Sequential:
    """Pad every convolution after conv0 with ``mode`` (``replicate`` or ``zeros``; in place).
    conv0 keeps its zeros: with the ImageNet fold, that is air."""
    for name, module in features.named_modules():
        if isinstance(module, nn.Conv3d) and name != "conv0" and any(module.padding):
            module.padding_mode = mode
    return features


def load_model(path: Path, input_norm: InputNorm = "imagenet",
               conv_padding: ConvPadding = "replicate") -> LoadedModel:
    """Load a model file written by ``save_model`` (``weights_only=True``, sha256 checked), conv0
    collapsed to one grey channel as ``input_norm`` says (see ``grey_input``), the convolutions
    after it padding with ``conv_padding``."""
    info = model_info(path)
    network = architecture()  # on the meta device: the file's tensors are assigned, not copied
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state, assign=True)
    except Exception as exc:  # torch raises many types for a bad checkpoint
        raise not_ours(path, str(exc)[:300]) from exc
    grey_input(network, input_norm)
    set_conv_padding(network, conv_padding)
    for param in network.parameters():
        param.requires_grad_(False)
    make_lean(network)  # same weights and numbers, a fraction of the peak memory
    network = network.eval().to(memory_format=torch.channels_last_3d)  # the fast path's layout
    return LoadedModel(network=network, info=info)

