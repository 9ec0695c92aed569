"""Model stage helper: a DenseNet block forward that holds far less memory at once.

A ``DenseBlock`` (torchvision's ``_DenseBlock``, ``densenet3d.py``) concatenates all earlier feature
maps again in every layer and normalises the whole concatenation: three copies of a tensor that
grows to 256 channels at a quarter of the input's size (2.9 GB extra for a 512 x 512 x 216 volume).
``LeanDenseBlock`` writes every layer's new channels into one preallocated buffer and runs each
layer's pointwise part (norm1, relu1, the 1x1x1 conv1, norm2, relu2) in depth slabs: norm1 and
relu1 as one clamp, their scale and shift folded into conv1 with norm2 once at load
(``bottleneck_fold``). The 3x3x3 conv2 sees the whole bottleneck unless it is large (a
native-resolution knee's first block: 0.45 GB), where it runs in depth slabs too, each reading one
row of bottleneck beyond its ends (carried over from the slab before). conv2's input is written
inside a halo that takes its padding (replicate: the edge rows copied there), so no padded copy of
the bottleneck is made. A block whose input came with room for its channels (the stem's output,
``stem_in_slabs(channels=...)``) grows it in place. Same modules, same state dict, same forward
hooks, same numbers (to float32 rounding).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from kneebatch.network.densenet3d import DenseBlock, DenseLayer, Transition
from kneebatch.network.kernels import conv3d, use_onednn

SLAB_BYTES = 64 * 1024**2
# Whether the lean forward runs, for the forward pass in progress in this thread (a context
# variable, not a flag on the shared cached model: concurrent forwards do not see each other's).
_LEAN: contextvars.ContextVar[bool] = contextvars.ContextVar("kneebatch_lean", default=True)
# The layout lean outputs are written in. Not the input's: torch's avg_pool3d returns a contiguous
# tensor for a channels_last_3d input, and small 1x1x1 convolutions do the same.
_LAYOUT: contextvars.ContextVar[torch.memory_format] = contextvars.ContextVar(
    "kneebatch_layout", default=torch.channels_last_3d)
# Whether lean transitions pool before their 1x1x1 convolution (see ``LeanTransition``).
_POOL_FIRST: contextvars.ContextVar[bool] = contextvars.ContextVar("kneebatch_pool_first",
                                                                   default=True)
_POOL_FIRST_RUNS = 0  # transitions run pool-first in this process (tests: the fast path ran)
_CLAMPED_TRANSITIONS = 0  # transitions run with norm + relu as one clamp (tests: the same)


@contextlib.contextmanager
def lean_forward(on: bool, memory_format: torch.memory_format = torch.channels_last_3d,
                 pool_first: bool = True) -> Iterator[None]:
    """Run the lean (``on``) or the plain (torchvision's) forward of the blocks inside the block; lean
    outputs in ``memory_format``; lean transitions pool first (``pool_first``)."""
    tokens = _LEAN.set(on), _LAYOUT.set(memory_format), _POOL_FIRST.set(pool_first)
    try:
        yield
    finally:
        _LEAN.reset(tokens[0])
        _LAYOUT.reset(tokens[1])
        _POOL_FIRST.reset(tokens[2])


def pool_first_runs() -> int:
    """How many transitions this process has run pool-first."""
    return _POOL_FIRST_RUNS


def clamped_transition_runs() -> int:
    """How many transitions this process has run with their norm and relu as one clamp."""
    return _CLAMPED_TRANSITIONS


def average_pool2(x: torch.Tensor) -> torch.Tensor:
    """``avg_pool3d(x, 2)`` (odd last rows dropped) as three strided sums: torch's CPU kernel is
    about 15x slower on a channels_last_3d tensor. Same value to float32 rounding."""
    d, h, w = (size - size % 2 for size in x.shape[2:])
    x = x[:, :, 0:d:2] + x[:, :, 1:d:2]
    x = x[:, :, :, 0:h:2] + x[:, :, :, 1:h:2]
    x = x[:, :, :, :, 0:w:2] + x[:, :, :, :, 1:w:2]
    return x.mul_(0.125)


_FOLDS = 0  # foldings computed in this process (tests: none during a loaded model's forward)


def _fold(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    global _FOLDS
    _FOLDS += 1
    assert norm.running_var is not None and norm.running_mean is not None
    fused = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                 norm.eps, norm.weight, norm.bias)
    weight, bias = fused[0].detach(), fused[1].detach()
    if conv.weight.is_contiguous(memory_format=torch.channels_last_3d):
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    return weight, bias


def fold_batchnorm(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` as one convolution (eval mode: BatchNorm is an affine
    map per channel), which saves a pass over the convolution's whole output. ``make_lean``
    folds each pair once, at load (``fold_once``); a network it did not prepare is folded here."""
    folded = getattr(norm, "folded_weight", None), getattr(norm, "folded_bias", None)
    if isinstance(folded[0], torch.Tensor) and isinstance(folded[1], torch.Tensor):
        return folded[0], folded[1]
    return _fold(conv, norm)


def fold_once(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> None:
    """Fold ``norm`` into ``conv`` now and keep the result on ``norm`` as buffers (not in the
    state dict; they follow ``.to()`` of the network, memory format and dtype included)."""
    weight, bias = _fold(conv, norm)
    norm.register_buffer("folded_weight", weight, persistent=False)
    norm.register_buffer("folded_bias", bias, persistent=False)


def folds_computed() -> int:
    """How many conv + BatchNorm pairs (and dense layers, ``bottleneck_fold``) this process
    has folded."""
    return _FOLDS


@torch.no_grad()
def _bottleneck_fold(layer: nn.Module) -> dict[str, torch.Tensor]:
    global _FOLDS
    _FOLDS += 1
    conv1, norm1, norm2 = (layer.get_submodule(name) for name in ("conv1", "norm1", "norm2"))
    assert isinstance(conv1, nn.Conv3d) and isinstance(norm1, nn.BatchNorm3d)
    assert isinstance(norm2, nn.BatchNorm3d)
    return _clamp_fold(norm1, *_fold(conv1, norm2))


@torch.no_grad()
def _transition_fold(transition: nn.Module) -> dict[str, torch.Tensor]:
    global _FOLDS
    _FOLDS += 1
    norm, conv = transition.get_submodule("norm"), transition.get_submodule("conv")
    assert isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d)
    return _clamp_fold(norm, conv.weight, conv.bias if conv.bias is not None
                       else torch.zeros(conv.out_channels, dtype=conv.weight.dtype))


def _clamp_fold(norm: nn.BatchNorm3d, weight: torch.Tensor,
                bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """``conv(relu(norm(x)))`` (the convolution ``weight``, ``bias``; 1x1x1) as ``clamp(x, low,
    high)`` and one convolution: the buffers ``BOTTLENECK_BUFFERS``."""
    assert norm.running_var is not None and norm.running_mean is not None
    var, mean = norm.running_var.double(), norm.running_mean.double()
    scale = torch.rsqrt(var + norm.eps) * (1 if norm.weight is None else norm.weight.double())
    shift = -mean * scale + (0 if norm.bias is None else norm.bias.double())
    # relu(scale * x + shift) == scale * clamp(x, low, high) + shift: the clamp cuts where the
    # ReLU does (from below where scale > 0, from above where scale < 0); a channel whose cut
    # lies beyond any input (scale 0, or nearly) is the constant relu(shift)
    flat = scale.abs() * 1e30 <= shift.abs()
    cut = torch.where(flat, 0.0, -shift / torch.where(flat, 1.0, scale))
    shift = torch.where(flat, shift.clamp_min(0), shift)
    scale = torch.where(flat, 0.0, scale)
    low = torch.where(scale < 0, -torch.inf, cut)  # a flat channel: clamped to 0 both ways
    high = torch.where(scale > 0, torch.inf, cut)
    return {"lean_weight": (weight.double() * scale[None, :, None, None, None]).to(weight.dtype),
            "lean_bias": (bias.double() + weight.double().flatten(1) @ shift).to(bias.dtype),
            "clamp_low": low.to(weight.dtype).reshape(1, -1, 1, 1, 1),
            "clamp_high": high.to(weight.dtype).reshape(1, -1, 1, 1, 1)}


def _fold_of(layer: nn.Module) -> dict[str, torch.Tensor]:
    return (_transition_fold if isinstance(layer, Transition) else _bottleneck_fold)(layer)


def bottleneck_fold(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """A dense layer's norm1 + relu1 + conv1 + norm2 (eval mode), or a transition's norm + relu +
    conv, as ``clamp(x, low, high)`` followed by one convolution: ``(weight, bias, low, high)``.
    One pass over the layer's input instead of two (a multiply-add, then the ReLU): 1.2-1.6x
    faster on a channels_last buffer's channel slice. ``make_lean`` keeps them on the layer at
    load (``keep_bottleneck_fold``)."""
    kept = [getattr(layer, name, None) for name in BOTTLENECK_BUFFERS]
    if all(isinstance(t, torch.Tensor) for t in kept):
        return tuple(kept)  # type: ignore[arg-type]
    folded = _fold_of(layer)
    return tuple(folded[name] for name in BOTTLENECK_BUFFERS)


BOTTLENECK_BUFFERS = ("lean_weight", "lean_bias", "clamp_low", "clamp_high")


def keep_bottleneck_fold(layer: nn.Module) -> None:
    """Compute ``bottleneck_fold`` of ``layer`` (a dense layer, or a transition's norm, relu and
    conv) now and keep it on ``layer`` as buffers (not in the state dict; they follow ``.to()``
    of the network, memory format and dtype included)."""
    for name, tensor in _fold_of(layer).items():
        layer.register_buffer(name, tensor, persistent=False)


def _slabs(depth: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, SLAB_BYTES // max(1, row_bytes))
    return [(d, min(depth, d + step)) for d in range(0, depth, step)]


CONV2_SLABS_FROM_BYTES = 256 * 1024**2  # a larger bottleneck is never whole: conv2 in slabs too
_CONV2_SLAB_RUNS = 0  # dense blocks run with conv2 in depth slabs (tests: the path ran)


def conv2_slab_runs() -> int:
    """How many dense blocks this process has run with their 3x3x3 convolutions in slabs."""
    return _CONV2_SLAB_RUNS


def block_channels(block: nn.Module) -> int | None:
    """The channels of a dense block's output (its input's and every layer's new ones), or None
    for anything else."""
    if not isinstance(block, DenseBlock):
        return None
    layers = [layer for layer in block.values() if isinstance(layer, DenseLayer)]
    return layers[0].conv1.in_channels + layers[0].conv2.out_channels * len(layers)


def _room(init_features: torch.Tensor, total: int, fmt: torch.memory_format) -> torch.Tensor | None:
    """The ``total``-channel tensor whose first channels ``init_features`` is, when the block's
    input came with room to grow in place (``stem_in_slabs(channels=...)``: its storage holds
    ``total`` channels laid out in ``fmt``), else None."""
    size = (init_features.shape[0], total, *init_features.shape[2:])
    stride = torch.empty(size, device="meta", memory_format=fmt).stride()
    if (init_features.storage_offset() != 0 or init_features.stride() != stride
            or init_features.untyped_storage().nbytes()
            < init_features.element_size() * math.prod(size)):
        return None
    return init_features.as_strided(size, stride)


class LeanDenseBlock(DenseBlock):
    """A ``DenseBlock`` (same children and weights) with a memory-lean forward in eval mode."""

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        conv2 = next(layer for layer in self.values() if isinstance(layer, DenseLayer)).conv2
        if (self.training or not _LEAN.get()
                or conv2.padding_mode not in ("zeros", "replicate")):
            return super().forward(init_features)
        return self.lean(init_features)

    def lean(self, init_features: torch.Tensor) -> torch.Tensor:
        """The block's output, written into one buffer (see the module docstring): the input's
        own when it came with room for every layer's channels."""
        layers = [layer for layer in self.values() if isinstance(layer, DenseLayer)]
        n, c0, depth, height, width = init_features.shape
        growth = layers[0].conv2.out_channels
        total = c0 + growth * len(layers)
        fmt = _LAYOUT.get()
        buffer = _room(init_features, total, fmt)
        if buffer is None:
            buffer = torch.empty((n, total, depth, height, width), dtype=init_features.dtype,
                                 memory_format=fmt)
            buffer[:, :c0] = init_features
        row_bytes = init_features.element_size() * n * height * width
        width1 = layers[0].conv1.out_channels
        conv2 = layers[0].conv2
        whole = row_bytes * width1 * depth <= CONV2_SLABS_FROM_BYTES
        global _CONV2_SLAB_RUNS
        _CONV2_SLAB_RUNS += not whole
        pd, ph, pw = _halo(conv2)  # rows conv2 reads beyond each end
        rows = depth if whole else max(1, SLAB_BYTES // (row_bytes * width1) - 2 * pd)
        # reused by every layer; with room for conv2's padding
        scratch = torch.empty((n, width1, rows + 2 * pd, height + 2 * ph, width + 2 * pw),
                              dtype=buffer.dtype, memory_format=fmt)
        channels = c0
        for layer in layers:
            _conv2_in_slabs(layer, buffer[:, :channels], buffer[:, channels:channels + growth],
                            scratch, rows)
            channels += growth
        return buffer


def _halo(conv: nn.Conv3d) -> tuple[int, int, int]:
    """The padding a lean block writes around conv2's input itself, per axis (depth, height,
    width): all of it with ``replicate`` (edge rows copied into the scratch buffer: no padded copy
    of the whole bottleneck), else the depth rows only (a slab's neighbours; zeros beyond the
    volume), oneDNN padding height and width."""
    padding = conv.padding
    assert isinstance(padding, tuple)  # never 'same'/'valid' in DenseNet
    pd, ph, pw = (int(p) for p in padding)
    return (pd, ph, pw) if conv.padding_mode == "replicate" else (pd, 0, 0)


def _bottleneck(layer: nn.Module, features: torch.Tensor, d0: int, d1: int,
                out: torch.Tensor) -> None:
    """Rows ``d0:d1`` of a dense layer's bottleneck (norm1, relu1, conv1, norm2 as a clamp and
    one convolution, ``bottleneck_fold``; relu2) of ``features`` into ``out`` (as many rows), in
    slabs of about ``SLAB_BYTES``."""
    weight, bias, low, high = bottleneck_fold(layer)  # norm1, relu1, conv1, norm2
    n, channels, _, height, width = features.shape
    row_bytes = features.element_size() * n * height * width * (channels + 2 * weight.shape[0])
    for a, b in _slabs(d1 - d0, row_bytes):
        # torch's batch norm is 3-9x slower on this channel slice of a channels_last buffer
        part = torch.clamp(features[:, :, d0 + a:d0 + b], low, high)
        out[:, :, a:b] = conv3d(part, weight, bias, relu=True)  # relu2


def _conv2_in_slabs(layer: nn.Module, features: torch.Tensor, new: torch.Tensor,
                    scratch: torch.Tensor, rows: int) -> None:
    """A dense layer's new channels (``new``, written in place) from ``features``, ``rows`` output
    rows at a time (all of them at once when ``rows`` is the depth), so its whole bottleneck need
    not exist at once: each slab's bottleneck rows go inside ``scratch``'s halo (``_halo``), with
    the rows its 3x3x3 convolution reads beyond the slab (carried over from the slab before, not
    recomputed); the volume's own padding is written around them, as conv2 pads."""
    conv = layer.get_submodule("conv2")
    assert isinstance(conv, nn.Conv3d) and isinstance(conv.padding, tuple)
    pd, ph, pw = _halo(conv)
    padding = tuple(int(p) - h for p, h in zip(conv.padding, (pd, ph, pw), strict=True))
    replicate = conv.padding_mode == "replicate"
    depth, height, width = features.shape[2:]
    plane = scratch[:, :, :, ph:ph + height, pw:pw + width]  # without height and width halo
    carried = plane[:, :, :0]  # bottleneck rows computed for the slab before, this one reads
    for o0 in range(0, depth, rows):
        o1 = min(depth, o0 + rows)
        i0, i1 = max(0, o0 - pd), min(depth, o1 + pd)  # bottleneck rows this slab reads
        front, back = pd - (o0 - i0), pd - (i1 - o1)  # rows beyond the volume
        piece = scratch[:, :, :front + (i1 - i0) + back]
        body = plane[:, :, front:front + i1 - i0]
        body[:, :, :carried.shape[2]] = carried
        _bottleneck(layer, features, i0 + carried.shape[2], i1, body[:, :, carried.shape[2]:])
        if o1 < depth:
            carried = body[:, :, max(0, o1 - pd) - i0:].clone()
        if replicate:  # the edge rows again, along width, height, then depth
            _replicate_ends(piece[:, :, front:front + i1 - i0], 4, pw)
            _replicate_ends(piece[:, :, front:front + i1 - i0], 3, ph)
            _replicate_ends(piece, 2, front, back)
        else:
            piece[:, :, :front] = 0
            piece[:, :, front + i1 - i0:] = 0
        new[:, :, o0:o1] = conv3d(piece, conv.weight, conv.bias, conv.stride, padding,
                                  conv.dilation, conv.groups)


def _replicate_ends(x: torch.Tensor, axis: int, front: int, back: int | None = None) -> None:
    """Fill the first ``front`` and last ``back`` (default: ``front``) entries of ``x`` along
    ``axis`` with the entries next to them (replicate padding, in place)."""
    back = front if back is None else back
    size = x.shape[axis]
    if front:  # copy_ broadcasts the edge row
        x.narrow(axis, 0, front).copy_(x.narrow(axis, front, 1))
    if back:
        x.narrow(axis, size - back, back).copy_(x.narrow(axis, size - back - 1, 1))


class LeanTransition(Transition):
    """A ``Transition`` (norm, relu, 1x1x1 conv, 2x2x2 average pool) run in depth slabs of an
    even number of rows, so the pool windows never straddle two slabs.

    Pool first: a 1x1x1 convolution and an average pool commute (both linear, the pool's
    weights sum to one, so the bias passes unchanged), so pooling before the convolution gives
    the same tensor with an eighth of the convolution's work. norm and relu are one clamp, their
    scale and shift folded into the convolution at load (``keep_bottleneck_fold``, as a dense
    layer's): one pass over the input instead of two.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        usable = input.shape[2] - input.shape[2] % 2  # the 2x2x2 pool drops an odd last row
        if self.training or not _LEAN.get() or usable == 0:
            return super().forward(input)
        return self.lean(input)

    def lean(self, input: torch.Tensor) -> torch.Tensor:
        """The transition's output, computed in depth slabs."""
        n, channels, depth, height, width = input.shape
        usable = depth - depth % 2
        rows = max(2, SLAB_BYTES // max(1, input.element_size() * n * height * width * 2
                                        * channels) // 2 * 2)
        global _POOL_FIRST_RUNS
        pool_first = _POOL_FIRST.get() and isinstance(self.pool, nn.AvgPool3d)
        _POOL_FIRST_RUNS += pool_first
        weight, bias, low, high = bottleneck_fold(self)  # norm + relu as one clamp
        global _CLAMPED_TRANSITIONS
        _CLAMPED_TRANSITIONS += 1
        out: torch.Tensor | None = None
        for d0 in range(0, usable, rows):
            d1 = min(usable, d0 + rows)
            part = torch.clamp(input[:, :, d0:d1], low, high)
            part = (conv3d(average_pool2(part), weight, bias) if pool_first
                    else self.pool(conv3d(part, weight, bias)))
            if out is None:
                out = torch.empty((n, part.shape[1], usable // 2, *part.shape[3:]),
                                  dtype=part.dtype, memory_format=_LAYOUT.get())
            out[:, :, d0 // 2:d1 // 2] = part
        assert out is not None
        return out


def make_lean(features: nn.Module) -> nn.Module:
    """Give DenseNet's blocks and transitions of ``features`` their lean forward (in place; same
    weights and hooks), every convolution the switchable oneDNN forward (``kernels.py``), and fold
    the BatchNorms the fast path folds (the stem's norm0 into conv0, each dense layer's norm1 and
    norm2 into its conv1 and a clamp) once, here."""
    for module in features.modules():
        if type(module) is DenseBlock:
            module.__class__ = LeanDenseBlock
            for layer in module.children():
                keep_bottleneck_fold(layer)
        elif type(module) is Transition:
            module.__class__ = LeanTransition
            keep_bottleneck_fold(module)
    conv0, norm0 = getattr(features, "conv0", None), getattr(features, "norm0", None)
    if isinstance(conv0, nn.Conv3d) and isinstance(norm0, nn.BatchNorm3d):
        fold_once(conv0, norm0)
    return use_onednn(features)
