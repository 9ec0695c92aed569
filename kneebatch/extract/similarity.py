"""Similarity stage: cosine similarity of region pairs, per layer."""

from __future__ import annotations

import numpy as np
from scipy.spatial import distance

from kneebatch.config import PAIRS
from kneebatch.schema import SimilarityRow


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors, computed in float64."""
    return float(1.0 - distance.cosine(a.astype(np.float64), b.astype(np.float64)))


def similarities(subject_id: str, vectors: dict[str, dict[str, np.ndarray]],
                 layers: tuple[str, ...]) -> list[SimilarityRow]:
    """Cosine similarity of (tibia, femur), (tibia, background), (femur, background) per layer.

    Args:
        subject_id: the subject.
        vectors: region -> layer -> vector.
        layers: layer order of the rows.

    Returns:
        Rows in layer order, then pair order.
    """
    return [
        SimilarityRow(subject_id, layer, a, b, cosine(vectors[a][layer], vectors[b][layer]))
        for layer in layers
        for a, b in PAIRS
    ]
