"""Model stage, part 1: inflate a 2D torchvision network to 3D with a generic module walker.

Conv2d -> Conv3d with kernel (k, kh, kw) where k = kh, the 2D kernel repeated k times along depth and
divided by k (I3D: a depth-constant input then gives the 2D response); stride, padding and dilation
taken per axis with the height value reused for depth. BatchNorm2d -> BatchNorm3d with weights and
running statistics copied. MaxPool2d/AvgPool2d -> 3D with the same kernel/stride/padding on every
axis. Everything else (ReLU, Sequential, DenseNet's blocks) is kept; their functional calls are
dimension-agnostic.
"""

from __future__ import annotations

import torch
from torch import nn


def _triple(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    """(depth, height, width) from a 2D layer's int-or-pair setting, depth taking the height."""
    h, w = (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))
    return (h, h, w)


def _conv3d(conv: nn.Conv2d) -> nn.Conv3d:
    if isinstance(conv.padding, str):
        raise TypeError(f"string padding {conv.padding!r} is not supported by the inflater")
    kernel = _triple(conv.kernel_size)
    out = nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=kernel,
        stride=_triple(conv.stride),
        padding=_triple(conv.padding),
        dilation=_triple(conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    depth = kernel[0]
    with torch.no_grad():
        out.weight.copy_(conv.weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth)
        if conv.bias is not None and out.bias is not None:
            out.bias.copy_(conv.bias)
    return out


def _batchnorm3d(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    out = nn.BatchNorm3d(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    out.load_state_dict(bn.state_dict())
    return out


def _pool3d(pool: nn.MaxPool2d | nn.AvgPool2d) -> nn.Module:
    kernel, stride = _triple(pool.kernel_size), _triple(pool.stride)
    padding = _triple(pool.padding)
    if isinstance(pool, nn.MaxPool2d):
        return nn.MaxPool3d(kernel, stride=stride, padding=padding,
                            dilation=_triple(pool.dilation), ceil_mode=pool.ceil_mode)
    return nn.AvgPool3d(kernel, stride=stride, padding=padding, ceil_mode=pool.ceil_mode,
                        count_include_pad=pool.count_include_pad)


def _inflate_one(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.Conv2d):
        return _conv3d(module)
    if isinstance(module, nn.BatchNorm2d):
        return _batchnorm3d(module)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool3d(module)
    return None


def inflate(module: nn.Module) -> nn.Module:
    """Replace every 2D layer of ``module`` (in place, recursively) by its 3D counterpart.

    Args:
        module: a 2D network, e.g. ``torchvision.models.densenet121()``.

    Returns:
        The same object, now taking (N, C, D, H, W) input.
    """
    for name, child in module.named_children():
        replacement = _inflate_one(child)
        if replacement is None:
            inflate(child)
        else:
            setattr(module, name, replacement)
    return module


def collapse_input_channels(conv: nn.Conv2d | nn.Conv3d,
                            mean: tuple[float, ...] | None = None,
                            std: tuple[float, ...] | None = None) -> None:
    """Make ``conv`` take one grey channel (in place).

    With ``mean`` and ``std`` (per input channel, e.g. ImageNet's), the normalisation
    ``(g - m_c) / s_c`` that the 2D network's input had is folded in exactly: a grey image ``g``
    fed to every channel gives ``sum_c w_c * (g - m_c) / s_c = (sum_c w_c / s_c) * g - sum_c
    w_c m_c / s_c``, so the weight becomes ``sum_c w_c / s_c`` and the bias ``-sum_{c,k} w_c[k]
    m_c / s_c`` (summed over the kernel too). Its input is then the un-normalised grey value, and
    the convolution's zero padding means black (for CT: air), not the mean colour.

    Without them the kernels are summed and there is no bias (the seed's: the input is normalised
    with one grey mean and std before, and zero padding is that grey mean).
    """
    with torch.no_grad():
        weight = conv.weight.to(torch.float64)
        bias = None
        if mean is not None and std is not None:
            s = torch.tensor(std, dtype=torch.float64).reshape(1, -1, *[1] * (weight.dim() - 2))
            m = torch.tensor(mean, dtype=torch.float64).reshape(1, -1, *[1] * (weight.dim() - 2))
            bias = -(weight * m / s).flatten(1).sum(dim=1)
            weight = weight / s
        summed = weight.sum(dim=1, keepdim=True).to(conv.weight.dtype)
        if conv.bias is not None and bias is not None:
            bias = bias + conv.bias.to(torch.float64)
    conv.in_channels = 1
    conv.weight = nn.Parameter(summed, requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.to(summed.dtype), requires_grad=False)
