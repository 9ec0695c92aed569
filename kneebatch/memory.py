"""Memory a subject needs, predicted from its header, so a worker refuses what would not fit
instead of being killed by the OOM killer.

The constants were measured on CPU with torch 2.14 (``benchmarks/run.py`` reports the real peaks):
a process with torch and the model holds about 0.9 GB; reading costs about 16 bytes per native voxel
(file buffer, float32 copy, reorientation); the region stage about 24 bytes per voxel of the grid the
network sees; a DenseNet121-3D forward pass about 100 bytes per input voxel (conv0's 64 channels at
half resolution dominate).
"""

from __future__ import annotations

import math

from kneebatch.config import ExtractionConfig

BASE_BYTES = 900 * 1024**2
READ_BYTES_PER_VOXEL = 16
REGION_BYTES_PER_VOXEL = 24
FORWARD_BYTES_PER_VOXEL = 100


def estimate_bytes(size_xyz: tuple[int, ...], spacing_xyz_mm: tuple[float, ...],
                   config: ExtractionConfig) -> int:
    """Peak memory of one subject in one worker (an upper bound: crops are not known yet).

    Args:
        size_xyz: image size from the header, SimpleITK order (x, y, z).
        spacing_xyz_mm: voxel size from the header, (x, y, z).
        config: spacing and padding settings.

    Returns:
        Bytes.
    """
    native = math.prod(size_xyz)
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
