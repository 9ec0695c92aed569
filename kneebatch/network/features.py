"""Features stage: one region through the network with ``ForwardOptions``, forward hooks on the
chosen layers, and each hooked layer pooled to a vector: averaged over the region's voxels (the
region mask averaged down to the layer's grid gives each position its weight) or over the whole
input."""

from __future__ import annotations

import copy
import threading
import time
import weakref

import numpy as np
import torch
from torch import nn

from kneebatch.network.kernels import onednn_forward
from kneebatch.network.lean import BOTTLENECK_BUFFERS, block_channels, lean_forward
from kneebatch.network.options import FAST, ForwardOptions, amx_supported
from kneebatch.network.stem import STEM, stem_in_slabs

_copies: weakref.WeakKeyDictionary[nn.Module, dict[tuple[torch.memory_format, torch.dtype],
                                                    nn.Module]] = weakref.WeakKeyDictionary()
_copies_lock = threading.Lock()


class Float32Pool(nn.AvgPool3d):
    """An average pooling run in float32 for a bfloat16 network: torch's CPU ``avg_pool3d`` has no
    bfloat16 kernel (in either memory format). Still an ``AvgPool3d``: lean transitions pool first
    with their own strided sums (``lean.average_pool2``), which take bfloat16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.float32)).to(x.dtype)


def _float32_pools(module: nn.Module) -> None:
    """Make every average pooling of ``module`` a ``Float32Pool`` (in place)."""
    for child in module.modules():
        if type(child) is nn.AvgPool3d:
            child.__class__ = Float32Pool


def _bfloat16(network: nn.Module) -> None:
    """Make ``network`` a bfloat16 network (in place) the way it runs fastest on this CPU: every
    convolution in bfloat16 but, on a CPU with AMX, conv0, whose one input channel runs 4x faster
    there in float32 (issue 23, Sapphire Rapids; on AVX512-BF16 without AMX bfloat16 is 1.5x
    faster); the BatchNorms torch runs keep float32 parameters (torch's CPU batch norm takes
    bfloat16 input with them, 3x faster than bfloat16 ones on AMX), while what the fast path
    folds (into convolutions and dense layers' clamps) is bfloat16 as the activations it meets;
    average pooling in float32 (``Float32Pool``)."""
    conv0_too = not amx_supported()
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv3d) and (name != "conv0" or conv0_too):
            module.to(torch.bfloat16)
        elif name != "norm0" or conv0_too:  # folded at load: norm0's, each dense layer's
            for buffer in ("folded_weight", "folded_bias", *BOTTLENECK_BUFFERS):
                if isinstance(getattr(module, buffer, None), torch.Tensor):
                    setattr(module, buffer, getattr(module, buffer).to(torch.bfloat16))
    _float32_pools(network)


def network_in(network: nn.Module, memory_format: torch.memory_format,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """``network`` with its weights in ``memory_format`` and ``dtype``: the network itself when it
    already is, else a copy made once and kept beside it (the cached model is never changed). A
    bfloat16 copy keeps conv0 and the BatchNorms' parameters in float32 (``_bfloat16``)."""
    first_conv = next(m for m in network.modules() if isinstance(m, nn.Conv3d)
                      and m.in_channels > 1 and m.kernel_size != (1, 1, 1))
    if (first_conv.weight.is_contiguous(memory_format=memory_format)
            and first_conv.weight.dtype == dtype):
        return network
    with _copies_lock:
        copies = _copies.setdefault(network, {})
        if (memory_format, dtype) not in copies:
            converted = copy.deepcopy(network).to(memory_format=memory_format)
            if dtype == torch.bfloat16:
                _bfloat16(converted)
            copies[(memory_format, dtype)] = converted
        return copies[(memory_format, dtype)]


def _bins(size: int, out: int) -> torch.Tensor:
    """(out, size) float32: row i averages the entries ``adaptive_avg_pool`` puts in bin i
    (``floor(i * size / out)`` to ``ceil((i + 1) * size / out)``)."""
    starts = [i * size // out for i in range(out)]
    ends = [-(-(i + 1) * size // out) for i in range(out)]
    matrix = torch.zeros(out, size)
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


SEPARABLE_SLAB_VOXELS = 1 << 21  # the region's voxels made float32 at a time (8 MB)
_SEPARABLE_RUNS = 0  # region weights averaged down axis by axis (tests: the fast path ran)


def separable_weight_runs() -> int:
    """How many times this process has averaged a region down with ``region_weight``."""
    return _SEPARABLE_RUNS


def region_weight(region: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``adaptive_avg_pool3d(region, grid)`` of a (1, 1, D, H, W) 0/1 mask (bool, or float32),
    flattened to (1, d * h * w), to float32 rounding: each axis averaged down by one matrix
    product (an adaptive average is separable), the mask made float32 a slab at a time. torch's
    pool over a float32 copy took 4x longer (12 against 3 ms for a knee's background region)."""
    global _SEPARABLE_RUNS
    _SEPARABLE_RUNS += 1
    (depth, height, width), (d, h, w) = region.shape[2:], grid
    across_width = _bins(width, w).T
    rows = max(1, SEPARABLE_SLAB_VOXELS // (height * width))
    x = torch.cat([region[0, 0, z:z + rows].reshape(-1, width).to(torch.float32) @ across_width
                   for z in range(0, depth, rows)])  # (D * H, w)
    x = _bins(height, h) @ x.reshape(depth, height, w)  # (D, h, w)
    return (_bins(depth, d) @ x.reshape(depth, h * w)).reshape(1, d * h * w)


def pool(output: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """One vector per channel of a layer's ``output`` (N, C, D, H, W), in float32.

    Args:
        output: the layer's activations.
        region: None to average over every position; else the region's voxels on the input grid
            (1, 1, D', H', W'), 0/1 (bool, or float32): averaged down to the layer's grid (each
            output position gets the fraction of its input block that is region,
            ``region_weight``), it weights the average.
    """
    if region is None:
        return output.mean(dim=(2, 3, 4), dtype=torch.float32)
    depth, height, width = output.shape[2:]
    weight = region_weight(region, (depth, height, width))
    # (N, C, D*H*W) @ (N, D*H*W, 1): a view for both layouts, no product tensor of the layer's size
    summed = torch.matmul(output.flatten(2).to(torch.float32), weight[:, :, None])[..., 0]
    return summed / weight.sum(dim=1, keepdim=True)


def extract_features(
    network: nn.Sequential,
    volume: np.ndarray | list[np.ndarray],
    layers: tuple[str, ...],
    options: ForwardOptions = FAST,
    *,
    dtype: torch.dtype = torch.float32,
    region: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Run one region through the network and pool the hooked layers.

    Args:
        network: the inflated ``densenet121().features`` (eval mode).
        volume: the region's network input, float32, (z, y, x); or a list holding only it, which
            is emptied: the input is then freed as soon as the network no longer needs it (a
            native-resolution knee's region: 0.2 GB less at the peak).
        layers: names of ``network``'s children to hook, e.g. ``("denseblock2",)``.
        options: the fast path's switches (all agree with the plain path to float32 rounding).
        dtype: weights and activations (``torch.bfloat16`` for ``--precision bf16``: all but
            conv0 on AMX and the BatchNorms' parameters, see ``_bfloat16``); pooling to vectors
            is done in float32 either way.
        region: bool (z, y, x) like ``volume``, the region's voxels: each layer is averaged over
            them only (``--pooling region``). None averages over the whole input.

    Returns:
        layer -> float32 vector (the layer's channels averaged over depth, height and width, or
        over the region), and the forward time in seconds.

    Raises:
        ValueError: ``region`` has no voxels or another shape than ``volume``.
    """
    array = volume.pop() if isinstance(volume, list) else volume
    del volume
    weights = None  # bool: each hook pools its float32 copy (none exists during the first block)
    if region is not None:
        if region.shape != array.shape or not region.any():
            raise ValueError(f"region mask of shape {region.shape} with {int(region.sum())} "
                             f"voxels for a volume of shape {array.shape}")
        weights = torch.from_numpy(region)[None, None]
    fmt = torch.channels_last_3d if options.channels_last else torch.contiguous_format
    net = network_in(network, fmt, dtype)
    pooled: dict[str, torch.Tensor] = {}
    children = dict(net.named_children())
    handles = [
        children[name].register_forward_hook(
            lambda _m, _i, out, name=name: pooled.__setitem__(name, pool(out, weights)))
        for name in layers
    ]
    deepest = max(list(children).index(name) for name in layers)
    # in conv0's dtype (float32 for a float32 network, and for a bfloat16 one on AMX)
    conv0 = net.get_submodule("conv0")
    assert isinstance(conv0, nn.Conv3d)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(
        conv0.weight.dtype)
    del array  # only x holds the input now
    modules = list(children.items())[: deepest + 1]
    start = time.perf_counter()
    try:
        with torch.inference_mode(), lean_forward(options.lean_blocks, fmt,
                                                              options.pool_first), \
                onednn_forward(options.onednn):
            if options.stem_slabs:
                # with room for the first block to grow in place (its lean forward)
                room = block_channels(modules[len(STEM)][1]) if (
                    options.lean_blocks and len(modules) > len(STEM)) else None
                x = stem_in_slabs(net, x, memory_format=fmt, dtype=dtype, channels=room)
                modules = [(n, m) for n, m in modules if n not in STEM]
            for _, module in modules:
                # Keep every activation in the asked layout: after the one-channel input, and
                # after layers torch returns contiguous for a channels_last input (avg pooling).
                # and in ``dtype`` from conv0's output on
                x = module(x).to(dtype).contiguous(memory_format=fmt)
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - start
    return {name: pooled[name][0].numpy().copy() for name in layers}, seconds
