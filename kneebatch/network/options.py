"""How a forward pass runs: one frozen value, passed to every forward, recorded in ``done.json``.

None of these options changes the numbers beyond float32 rounding (tests hold the fast path to the
plain one within 1e-5); they change speed and peak memory. ``--plain-forward`` switches them all off
for debugging. Precision (``--precision``) does change the numbers, so it is an extraction setting.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from kneebatch.config import Precision
from kneebatch.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Switches of the fast path.

    Attributes:
        channels_last: weights and activations in ``channels_last_3d`` (oneDNN's fast layout; a
            1x1x1 convolution of 256 -> 128 channels runs about 3x faster here).
        stem_slabs: DenseNet's stem as one fused pass (norm0 folded into conv0, relu0 fused,
            the pool on oneDNN's layout), in depth slabs for large inputs (``stem.py``).
        lean_blocks: dense blocks and transitions with the memory-lean forward (``lean.py``).
        onednn: every float32 convolution through oneDNN (``kernels.py``).
        pool_first: lean transitions average-pool before their 1x1x1 convolution (``lean.py``).
    """

    channels_last: bool = True
    stem_slabs: bool = True
    lean_blocks: bool = True
    onednn: bool = True
    pool_first: bool = True

    @classmethod
    def plain(cls) -> ForwardOptions:
        """torchvision's own forward, default memory format: the reference for the fast path."""
        return cls(channels_last=False, stem_slabs=False, lean_blocks=False, onednn=False,
                   pool_first=False)

    def to_dict(self) -> dict[str, bool]:
        """Plain JSON-ready form."""
        return dataclasses.asdict(self)


FAST = ForwardOptions()  # the default


# Tests only: run ``--precision bf16`` where the CPU lacks it (emulated: slow, same numbers).
EMULATED_BF16_ENV = "KNEEBATCH_TEST_EMULATED_BF16"


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def bf16_supported() -> bool:
    """True on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def amx_supported() -> bool:
    """True on a CPU with AMX tiles for bfloat16 (Sapphire Rapids and later)."""
    return "amx_bf16" in _cpu_flags()


def check_precision(precision: Precision) -> None:
    """Refuse ``--precision bf16`` on a CPU without native bfloat16 (it would be emulated,
    slowly); needs no torch, so a run's driver refuses it before anything starts.

    Raises:
        ConfigError: naming the flags to look for and what to do.
    """
    if precision == "bf16" and not bf16_supported() and os.environ.get(EMULATED_BF16_ENV) != "1":
        raise ConfigError("--precision bf16 needs a CPU with native bfloat16 (AVX512-BF16 or "
                          "AMX; see `grep -o 'avx512_bf16\\|amx_bf16' /proc/cpuinfo`). This one "
                          "has none: drop --precision or run on such nodes.")


def compute_dtype(precision: Precision) -> torch.dtype:
    """The torch dtype of ``--precision``.

    Raises:
        ConfigError: see ``check_precision``.
    """
    import torch

    check_precision(precision)
    return torch.bfloat16 if precision == "bf16" else torch.float32
