"""Features stage helper: DenseNet's stem (conv0, norm0, relu0, pool0) in slabs along depth.

The stem's convolution output (64 channels at half the input's size) is the largest activation of
the whole network: 1.8 GB for a 512 x 512 x 216 volume. Computed in depth slabs of the pool's
output, with the input rows each slab needs (zeros beyond the volume, as conv0's own padding) and
the conv rows the pool needs (the pool's own padding at the volume's ends), the result is the same
tensor while only one slab of the big activation exists at a time; an input whose activation fits
is one slab. norm0 is folded into conv0 (eval mode) and relu0 fused into it, which saves two
passes over that activation, and the pool reads the convolution's output in oneDNN's own layout
(``kernels.conv_relu_maxpool``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kneebatch.network.kernels import conv_relu_maxpool
from kneebatch.network.lean import fold_batchnorm

STEM = ("conv0", "norm0", "relu0", "pool0")


def _depth(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else int(value[0])


def _rest(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[1]), int(value[2]))


def _triple(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    return (_depth(value), *_rest(value))


SLAB_BYTES = 128 * 1024**2  # about what one slab's conv activations may take


def stem_in_slabs(features: nn.Module, x: torch.Tensor, budget_bytes: int | None = None, *,
                  memory_format: torch.memory_format = torch.contiguous_format,
                  dtype: torch.dtype | None = None, channels: int | None = None) -> torch.Tensor:
    """``pool0(relu0(norm0(conv0(x))))``, computed slab by slab along depth.

    Args:
        features: the inflated DenseNet ``features`` (zero-padded conv0, max-pool pool0).
        x: input (N, 1, D, H, W).
        budget_bytes: about how much memory one slab's conv activations may take (default
            ``SLAB_BYTES``); an input that fits is one slab, padded by the modules themselves.
        memory_format: the layout of the returned (64-channel) tensor. The input's own layout
            cannot tell: with one channel both layouts are the same.
        dtype: the returned tensor's (default: conv0's).
        channels: allocate this many channels and return the first ones as a view: the next
            dense block grows its input in place (``lean.LeanDenseBlock``) instead of copying it
            into a buffer of its own, so the stem's output and that buffer never exist at once.

    Returns:
        The stem's output, as the unsliced modules would give it.
    """
    conv, norm, _, pool = (features.get_submodule(name) for name in STEM)
    assert isinstance(conv, nn.Conv3d) and isinstance(pool, nn.MaxPool3d)
    assert isinstance(norm, nn.BatchNorm3d)
    weight, bias = fold_batchnorm(conv, norm)  # norm0 folded into conv0: one pass fewer
    assert conv.padding_mode == "zeros" and conv.groups == 1 and not pool.ceil_mode
    kc, sc, pc = conv.kernel_size[0], conv.stride[0], _depth(conv.padding)  # type: ignore[arg-type]
    kp, sp, pp = _depth(pool.kernel_size), _depth(pool.stride), _depth(pool.padding)
    assert 2 * pp % sp == 0  # the last slab's pool windows line up (DenseNet: 1 and 2)
    depth = x.shape[2]
    conv_depth = (depth + 2 * pc - kc) // sc + 1
    out_depth = (conv_depth + 2 * pp - kp) // sp + 1
    row_bytes = 2 * conv.out_channels * x.shape[0] * x.element_size() * (
        (x.shape[3] + 1) // 2) * ((x.shape[4] + 1) // 2)  # a slab's conv output, twice at most
    budget = SLAB_BYTES if budget_bytes is None else budget_bytes
    slab = max(1, (budget // max(1, row_bytes) - kp) // sp)
    kernel, stride, (_, ph, pw), dilation = (_triple(value) for value in (
        pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    out: torch.Tensor | None = None
    for j0 in range(0, out_depth, slab):
        j1 = min(out_depth, j0 + slab)
        c0, c1 = j0 * sp - pp, (j1 - 1) * sp - pp + kp  # conv rows the pool reads
        # The pool pads the volume's ends itself (padding q in depth, both ends): the first slab
        # from row 0; the last from pp rows before its own, so that its windows line up with
        # the pool's; one in the middle pads nothing. ``skip``: pooled rows before the slab's.
        q, r0, skip = (pp, 0, 0) if c0 < 0 else (pp, c0 - pp, 2 * pp // sp) \
            if c1 > conv_depth else (0, c0, 0)
        r1 = min(conv_depth, c1)
        i0, i1 = r0 * sc - pc, (r1 - 1) * sc - pc + kc  # input rows those conv rows read
        piece = x[:, :, max(0, i0):min(depth, i1)]
        if i0 < 0 or i1 > depth:
            piece = F.pad(piece, (0, 0, 0, 0, max(0, -i0), max(0, i1 - depth)))
        z = conv_relu_maxpool(  # relu0 fused
            piece, weight, bias, conv.stride, (0, *_rest(conv.padding)), conv.dilation,  # type: ignore[arg-type]
            (kernel, stride, (q, ph, pw), dilation), memory_format=memory_format,
        )[:, :, skip:skip + j1 - j0]
        if out is None:
            if j1 == out_depth and not channels:  # one slab, no room asked for
                return z.to(dtype or z.dtype).contiguous(memory_format=memory_format)
            out = torch.empty((z.shape[0], max(channels or 0, z.shape[1]), out_depth,
                               *z.shape[3:]), dtype=dtype or z.dtype, memory_format=memory_format)
        out[:, :z.shape[1], j0:j1] = z
    assert out is not None
    return out[:, :conv.out_channels]  # all of it, unless ``channels`` asked for room
