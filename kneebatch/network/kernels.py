"""Model stage helper: every float32 3D convolution through oneDNN.

torch picks its own ``slow_conv3d`` kernel for small inputs and, on one thread, for 1x1x1
convolutions: about a tenth of a knee's forward time on small dense-block grids. oneDNN's kernel
is faster at every size measured here (a knee's forward 14-16% faster on 1 and 2 threads, AVX2)
and agrees to float32 rounding. bfloat16 goes through oneDNN where the CPU has native bfloat16
(torch already picks oneDNN there; this adds the fused ReLU), else keeps torch's choice.
``ForwardOptions.onednn`` switches it per forward pass (a context variable, as ``lean_forward``);
``onednn_calls`` counts the calls so tests can see the fast path ran.
DenseNet's stem (conv0 + relu0, then pool0) stays in oneDNN's own blocked layout from the
convolution to the pool (``conv_relu_maxpool``): with one input channel oneDNN writes a
channels_last output 1.5x slower than its blocked one, and converting the 64-channel output to a
torch layout before the pool cost as much again (AVX2; the stem 2x faster in all; in native
bfloat16 12-17% faster on an AVX512-BF16 EPYC).
A convolution followed by a ReLU (each dense layer's conv1, the stem's conv0) is one oneDNN call
with the ReLU fused in (``conv3d(..., relu=True)``): one pass fewer over its output, 6% of a 1x1x1
convolution's time measured here.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("kneebatch_onednn", default=False)
_CALLS = 0
_FUSED = 0
_BLOCKED = 0
AVAILABLE = torch.backends.mkldnn.is_available()
# the dtypes oneDNN runs here: bfloat16 only where the CPU has it natively
DTYPES = (torch.float32, torch.bfloat16) if AVAILABLE and \
    torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


@contextlib.contextmanager
def onednn_forward(on: bool) -> Iterator[None]:
    """Route float32 (and native bfloat16) convolutions through oneDNN (``on``) or torch's own
    choice."""
    token = _ON.set(on and AVAILABLE)
    try:
        yield
    finally:
        _ON.reset(token)


def onednn_calls() -> int:
    """How many convolutions this process has run through oneDNN by ``conv3d``."""
    return _CALLS


def fused_relu_calls() -> int:
    """How many of ``onednn_calls`` had their ReLU fused in (``relu=True``)."""
    return _FUSED


def blocked_stem_calls() -> int:
    """How many ``conv_relu_maxpool`` calls this process has run on oneDNN's blocked tensors."""
    return _BLOCKED


def conv_relu_maxpool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      stride: tuple[int, ...], padding: tuple[int, ...],
                      dilation: tuple[int, ...], pool: tuple[tuple[int, ...], ...], *,
                      memory_format: torch.memory_format) -> torch.Tensor:
    """``max_pool3d(relu(conv3d(x)))``, ``pool`` being the pool's kernel size, stride, padding and
    dilation. Through oneDNN when switched on for a dtype it runs here (``DTYPES``), its blocked
    tensors end to end (only the pooled output is converted; returned contiguous); else with
    torch's pool on the convolution's output in ``memory_format``."""
    global _BLOCKED
    kernel, pool_stride, pool_padding, pool_dilation = pool
    if _ON.get() and x.dtype in DTYPES and x.device.type == "cpu":
        _BLOCKED += 1
        y = torch.ops.mkldnn._convolution_pointwise(
            x.to_mkldnn(), weight, bias, list(padding), list(stride), list(dilation), 1, "relu",
            [], "")
        return torch.mkldnn_max_pool3d(y, list(kernel), list(pool_stride), list(pool_padding),
                                       list(pool_dilation), False).to_dense()
    y = conv3d(x, weight, bias, stride, padding, dilation, relu=True)
    return F.max_pool3d(y.contiguous(memory_format=memory_format), kernel, pool_stride,
                        pool_padding, pool_dilation)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           stride: tuple[int, ...] = (1, 1, 1), padding: tuple[int, ...] = (0, 0, 0),
           dilation: tuple[int, ...] = (1, 1, 1), groups: int = 1, *,
           relu: bool = False) -> torch.Tensor:
    """``F.conv3d`` with explicit padding, followed by a ReLU with ``relu``; through oneDNN when
    switched on for float32 (and native bfloat16), the ReLU fused into the same call."""
    global _CALLS, _FUSED
    if _ON.get() and x.dtype in DTYPES and x.device.type == "cpu":
        _CALLS += 1
        if relu:
            _FUSED += 1
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, list(padding), list(stride), list(dilation), groups, "relu", [],
                "")
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride),
                                                 list(dilation), groups)
    out = F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    return out.relu_() if relu else out


class OneDnnConv3d(nn.Conv3d):
    """An ``nn.Conv3d`` (same weights, same state dict) whose forward goes through ``conv3d``."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0, 0)
        assert isinstance(padding, tuple)  # never 'same'/'valid' in DenseNet
        return conv3d(input, weight, bias, self.stride, padding, self.dilation, self.groups)


def use_onednn(network: nn.Module) -> nn.Module:
    """Give every ``nn.Conv3d`` of ``network`` the switchable forward (in place)."""
    for module in network.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDnnConv3d
    return network
