"""The 3D network that model files hold, built without torchvision.

torchvision's ``densenet121().features`` inflated to 3D (``inflate.py``, used by ``build-model``)
has exactly these modules, names, settings and forward: a test builds both and compares their state
dicts and outputs. Compute nodes that only load a model file build this one and never import
torchvision (1.3 s per process here: it imports ``torch._dynamo``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

GROWTH, BOTTLENECK, STEM_CHANNELS = 32, 4 * 32, 64  # torchvision's densenet121
BLOCKS = (6, 12, 24, 16)


class DenseLayer(nn.Module):
    """torchvision's ``_DenseLayer`` in 3D: norm1, relu1, 1x1x1 conv1, norm2, relu2, 3x3x3 conv2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm3d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv3d(channels, BOTTLENECK, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm3d(BOTTLENECK)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(BOTTLENECK, GROWTH, kernel_size=3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """torchvision's ``_DenseBlock`` in 3D: every layer sees all earlier feature maps."""

    def __init__(self, layers: int, channels: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(channels + i * GROWTH))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """torchvision's ``_Transition`` in 3D: norm, relu, 1x1x1 conv, 2x2x2 average pool."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv3d(channels, out_channels, kernel_size=1, bias=False)
        self.pool = nn.AvgPool3d(kernel_size=2, stride=2)


def densenet121_3d() -> nn.Sequential:
    """The inflated ``densenet121().features``: three input channels (each load collapses conv0
    to one, ``model.grey_input``), random initial weights (draw them on the ``meta`` device)."""
    modules: OrderedDict[str, nn.Module] = OrderedDict([
        ("conv0", nn.Conv3d(3, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm3d(STEM_CHANNELS)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool3d(kernel_size=3, stride=2, padding=1)),
    ])
    channels = STEM_CHANNELS
    for i, layers in enumerate(BLOCKS):
        modules[f"denseblock{i + 1}"] = DenseBlock(layers, channels)
        channels += layers * GROWTH
        if i < len(BLOCKS) - 1:
            modules[f"transition{i + 1}"] = Transition(channels, channels // 2)
            channels //= 2
    modules["norm5"] = nn.BatchNorm3d(channels)
    return nn.Sequential(modules)
