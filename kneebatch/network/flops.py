"""FLOPs of the network's forward pass for given input shapes, counted with
``torch.utils.flop_counter`` on ``meta`` tensors: no weights, nothing computed (``run --dry-run``'s
calibration, ``benchmarks/run.py``)."""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from kneebatch.network.model import grey_input
from kneebatch.network.modelfile import architecture


def forward_flops(shapes: list[tuple[int, ...]], layers: tuple[str, ...]) -> float:
    """FLOPs of one-channel inputs of ``shapes`` (z, y, x) through the network up to the deepest
    of ``layers``."""
    net = copy.deepcopy(grey_input(architecture(), "grey")).to("meta")
    children = list(net.named_children())
    deepest = max(i for i, (name, _) in enumerate(children) if name in layers)
    total = 0.0
    for shape in shapes:
        counter = FlopCounterMode(display=False)
        x = torch.empty((1, 1, *shape), device="meta")
        with counter, torch.no_grad():
            for _, module in children[: deepest + 1]:
                x = module(x)
        total += counter.get_total_flops()
    return total
