"""The manifest's extra columns (covariates) in the Parquet: each column's type is inferred once
from all its values (``int64``, ``float64``, ``bool`` or ``string``; empty cells are missing
values) or declared (``--column-types mrn=string``), recorded, and every value converted to it, so
``age`` is a number and not ``'47'``.

Identifiers stay text: a column with a value that has a leading zero (``00123``) or an integer
beyond int64 is ``string``, so ``mrn`` joins to a clinical table as written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from kneebatch.errors import ConfigError

KINDS = ("int64", "float64", "bool", "string")
_INT = re.compile(r"^[+-]?\d+$")
_LEADING_ZERO = re.compile(r"^[+-]?0\d")  # 00123, 007.5: an identifier, not a number
_BOOL = {"true": True, "false": False}
_INT64 = (-(2**63), 2**63 - 1)


def _is_int(value: str) -> bool:
    return bool(_INT.match(value)) and _INT64[0] <= int(value) <= _INT64[1]


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _fits(value: str, kind: str) -> bool:
    if kind == "int64":
        return _is_int(value)
    if kind == "float64":
        return _is_float(value)
    if kind == "bool":
        return value.lower() in _BOOL
    return True


def infer_type(values: Iterable[str | None]) -> str:
    """The narrowest type every non-empty value fits (``string`` when there are none, or when a
    value looks like an identifier: leading zeros, or an integer beyond int64)."""
    present = [v.strip() for v in values if v is not None and v.strip()]
    if not present or any(_LEADING_ZERO.match(v) or (_INT.match(v) and not _is_int(v))
                          for v in present):
        return "string"
    for kind in KINDS:
        if all(_fits(v, kind) for v in present):
            return kind
    return "string"


def parse_column_types(text: str | None) -> dict[str, str]:
    """``mrn=string,age=float64`` -> ``{"mrn": "string", "age": "float64"}``.

    Raises:
        ConfigError: not ``COLUMN=TYPE`` pairs of the known types.
    """
    declared: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, kind = item.partition("=")
        if not name.strip() or kind.strip() not in KINDS:
            raise ConfigError(f"--column-types {text!r}: give COLUMN=TYPE pairs separated by "
                              f"commas, TYPE one of {', '.join(KINDS)} (e.g. mrn=string).")
        declared[name.strip()] = kind.strip()
    return declared


def column_types(rows: Iterable[tuple[str, dict[str, str]]],
                 declared: dict[str, str] | None = None) -> dict[str, str]:
    """Column -> type over the extra values of many subjects (sorted by column): declared types
    win, the others are inferred.

    Args:
        rows: (subject id, extra values) of each subject.
        declared: the user's types (``--column-types``).

    Raises:
        ConfigError: a declared column is not in the manifest, or a value does not fit its
            declared type (naming the subject and the value).
    """
    columns: dict[str, list[tuple[str, str | None]]] = {}
    for subject_id, extra in rows:
        for name, text in extra.items():
            columns.setdefault(name, []).append((subject_id, text))
    declared = declared or {}
    unknown = sorted(set(declared) - set(columns))
    if unknown and columns:
        raise ConfigError(f"--column-types names {', '.join(unknown)}, not a column of the "
                          f"manifest (its extra columns: {', '.join(sorted(columns))}).")
    types = {}
    for name, cells in sorted(columns.items()):
        kind = declared.get(name, "") or infer_type(v for _, v in cells)
        for subject_id, cell in cells:
            if cell is not None and cell.strip() and not _fits(cell.strip(), kind):
                raise ConfigError(f"Subject {subject_id}: column {name!r} holds {cell!r}, not "
                                  f"{kind} as --column-types declares. Fix the value or declare "
                                  f"{name}=string.")
        types[name] = kind
    return types


def convert(value: str | None, kind: str) -> object:
    """One cell as its column's type (None when empty or missing); a value that does not fit
    the type (a folder gathered under a record another version wrote) is kept as None rather
    than stopping the gather."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not _fits(text, kind):
        return None
    if kind == "int64":
        return int(text)
    if kind == "float64":
        number = float(text)
        return None if math.isnan(number) else number
    if kind == "bool":
        return _BOOL[text.lower()]
    return value
