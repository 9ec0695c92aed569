"""Cosine similarities, checked against values computed on paper."""

from __future__ import annotations

import numpy as np
import pytest

from kneebatch.extract.similarity import cosine, similarities


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([1, 0], [0, 1], 0.0), ([1, 2], [2, 4], 1.0), ([1, 0], [-1, 0], -1.0),
     ([3, 4], [4, 3], 24 / 25), ([1, 1, 0], [1, 0, 0], 1 / np.sqrt(2))],
    ids=["orthogonal", "parallel", "opposite", "3-4-5", "45-degrees"],
)
def test_cosine_by_hand(a: list[float], b: list[float], expected: float) -> None:
    assert cosine(np.array(a, np.float32), np.array(b, np.float32)) == pytest.approx(expected)


def test_rows_follow_layer_then_pair_order() -> None:
    v = {"tibia": {"x": np.array([1.0, 0]), "y": np.array([1.0, 1])},
         "femur": {"x": np.array([0.0, 1]), "y": np.array([1.0, 1])},
         "background": {"x": np.array([1.0, 1]), "y": np.array([-1.0, -1])}}
    rows = similarities("s1", v, ("x", "y"))
    got = [(r.layer, r.region_a, r.region_b, round(r.cosine, 6)) for r in rows]
    h = round(1 / np.sqrt(2), 6)
    assert got == [("x", "tibia", "femur", 0.0), ("x", "tibia", "background", h),
                   ("x", "femur", "background", h), ("y", "tibia", "femur", 1.0),
                   ("y", "tibia", "background", -1.0), ("y", "femur", "background", -1.0)]
    assert {r.subject_id for r in rows} == {"s1"}
