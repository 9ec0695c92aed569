"""The body in a CT: the connected components above a HU threshold that hold at least a fraction of
the largest one's voxels (both legs stay; the couch and specks go). Used by the background crop and
the bilateral split."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def body_mask(ct_hu: np.ndarray, threshold_hu: float, min_fraction: float) -> np.ndarray:
    """Voxels of the connected components above ``threshold_hu`` that hold at least
    ``min_fraction`` of the largest one's voxels (both legs stay; couch and specks go)."""
    components, count = ndimage.label(ct_hu > threshold_hu)
    if count == 0:
        return np.zeros(ct_hu.shape, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = sizes >= min_fraction * sizes.max()  # False for the background (size 0)
    return keep[components]
