"""Memory a subject needs, predicted from its header, so a worker refuses what would not fit
instead of being killed by the OOM killer.

The constants were measured on CPU with torch 2.14 (``benchmarks/run.py`` reports the real
peaks): a process with torch and the model holds about 0.9-1.0 GB (1 GiB counted); reading costs up
to 16 bytes per native voxel (file buffer, float32 copy, reorientation); the grid the network sees
about 10 bytes per voxel (the clipped HU and labels, kept, plus one region's input); a forward pass
about 28 bytes per input voxel (the stem runs in slabs and hands its output to DenseNet's first
block, whose 256 channels at a quarter of the resolution dominate; its bottleneck runs in slabs).
Measured peaks: 1.5 GiB for a clinical knee with the defaults, 2.6-2.7 GiB at native resolution
without cropping; these constants predict 1.8 and 3.0 GiB (the upper end, so a refusal is safe).
"""

from __future__ import annotations

import math

from kneebatch.config import ExtractionConfig

BASE_BYTES = 1024**3
READ_BYTES_PER_VOXEL = 16
REGION_BYTES_PER_VOXEL = 10
FORWARD_BYTES_PER_VOXEL = 28


def estimate_bytes(size_xyz: tuple[int, ...], spacing_xyz_mm: tuple[float, ...],
                   config: ExtractionConfig, mask_size_xyz: tuple[int, ...] | None = None) -> int:
    """Peak memory of one subject in one worker (an upper bound: crops are not known yet).

    Args:
        size_xyz: CT size from the header, SimpleITK order (x, y, z).
        spacing_xyz_mm: voxel size from the header, (x, y, z).
        config: spacing and padding settings.
        mask_size_xyz: the mask's size from its header (a small compressed file may hold a huge
            volume); default: the CT's.

    Returns:
        Bytes.
    """
    native = max(math.prod(size_xyz), math.prod(mask_size_xyz or size_xyz))
    if config.spacing_mm is None:
        grid = native
    else:
        grid = math.prod(max(1, round(n * s / config.spacing_mm))
                         for n, s in zip(size_xyz, spacing_xyz_mm, strict=True))
    network = max(grid, config.min_size**3)
    read = READ_BYTES_PER_VOXEL * native
    compute = REGION_BYTES_PER_VOXEL * grid + FORWARD_BYTES_PER_VOXEL * network
    return BASE_BYTES + max(read, compute)


def gib(n_bytes: float) -> str:
    """``1.23 GiB``."""
    return f"{n_bytes / 1024**3:.2f} GiB"
