"""Features stage: forward hooks on the chosen layers, 3D global average pooling."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


def extract_features(
    network: nn.Sequential,
    volume: np.ndarray,
    layers: tuple[str, ...],
    *,
    channels_last: bool = True,
) -> tuple[dict[str, np.ndarray], float]:
    """Run one region through the network and pool the hooked layers.

    Args:
        network: the inflated ``densenet121().features`` (eval mode).
        volume: normalised region, float32, (z, y, x).
        layers: names of ``network``'s children to hook, e.g. ``("denseblock2",)``.
        channels_last: feed the input in ``channels_last_3d`` memory format (faster on CPU; the
            numbers agree with the default format to float32 rounding).

    Returns:
        layer -> float32 vector (the layer's channels averaged over depth, height and width), and the
        forward time in seconds.
    """
    pooled: dict[str, torch.Tensor] = {}
    children = dict(network.named_children())
    handles = [
        children[name].register_forward_hook(
            lambda _m, _i, out, name=name: pooled.__setitem__(name, out.mean(dim=(2, 3, 4)))
        )
        for name in layers
    ]
    deepest = max(list(children).index(name) for name in layers)
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for module in list(children.values())[: deepest + 1]:
                x = module(x)
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - start
    return {name: pooled[name][0].to(torch.float32).numpy().copy() for name in layers}, seconds
