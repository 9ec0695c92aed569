"""Features stage: forward hooks on the chosen layers, 3D global average pooling."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from kneebatch.lean import LeanDenseBlock, LeanTransition
from kneebatch.stem import STEM, stem_in_slabs

SLAB_FROM_VOXELS = 8 * 1024**2  # below this the stem's activations are small anyway


def extract_features(
    network: nn.Sequential,
    volume: np.ndarray,
    layers: tuple[str, ...],
    *,
    channels_last: bool = True,
    stem_slabs: bool = True,
    lean_blocks: bool = True,
) -> tuple[dict[str, np.ndarray], float]:
    """Run one region through the network and pool the hooked layers.

    Args:
        network: the inflated ``densenet121().features`` (eval mode).
        volume: normalised region, float32, (z, y, x).
        layers: names of ``network``'s children to hook, e.g. ``("denseblock2",)``.
        channels_last: run in ``channels_last_3d`` memory format, weights and input (faster on
            CPU; the numbers agree with the default format to float32 rounding).
        stem_slabs: compute the stem in depth slabs for large volumes (``stem.py``): the same
            numbers with a fraction of the peak memory.
        lean_blocks: use the memory-lean forward of ``LeanDenseBlock`` and ``LeanTransition``
            where the network has them (``load_model`` gives them; same numbers).

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
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    if not next(network.parameters()).is_contiguous(memory_format=fmt):
        network.to(memory_format=fmt)  # weights in the input's layout: oneDNN's fast path
    x = x.contiguous(memory_format=fmt)
    for module in network.modules():
        if isinstance(module, (LeanDenseBlock, LeanTransition)):
            module.lean = lean_blocks
    modules = list(children.items())[: deepest + 1]
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if stem_slabs and x.numel() >= SLAB_FROM_VOXELS:
                x = stem_in_slabs(network, x)
                modules = [(n, m) for n, m in modules if n not in STEM]
            for _, module in modules:
                x = module(x)
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - start
    return {name: pooled[name][0].to(torch.float32).numpy().copy() for name in layers}, seconds
