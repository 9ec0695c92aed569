"""The manifest's extra columns in the Parquet: each column's type is inferred once from all its
values (``int64``, ``float64``, ``bool`` or ``string``; empty cells are missing values), recorded,
and every value converted to it, so ``age`` is a number and not ``'47'``."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

_INT = re.compile(r"^[+-]?\d+$")
_BOOL = {"true": True, "false": False}


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def infer_type(values: Iterable[str | None]) -> str:
    """The narrowest type every non-empty value fits (``string`` when there are none)."""
    present = [v.strip() for v in values if v is not None and v.strip()]
    if not present:
        return "string"
    if all(_INT.match(v) for v in present):
        return "int64"
    if all(_is_float(v) for v in present):
        return "float64"
    if all(v.lower() in _BOOL for v in present):
        return "bool"
    return "string"


def infer_types(rows: Iterable[dict[str, str]]) -> dict[str, str]:
    """Column -> type over the extra values of many subjects (sorted by column)."""
    columns: dict[str, list[str | None]] = {}
    for extra in rows:
        for name, value in extra.items():
            columns.setdefault(name, []).append(value)
    return {name: infer_type(values) for name, values in sorted(columns.items())}


def convert(value: str | None, kind: str) -> object:
    """One cell as its column's type (None when empty or missing)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if kind == "int64":
        return int(text)
    if kind == "float64":
        number = float(text)
        return None if math.isnan(number) else number
    if kind == "bool":
        return _BOOL[text.lower()]
    return value
