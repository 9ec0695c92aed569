"""Manifest extras keep their types in the Parquet: one type per column, inferred from all values."""

from __future__ import annotations

import pytest

from kneebatch.inputs.extras import column_types, convert, infer_type


@pytest.mark.parametrize(("values", "kind"), [
    (["47", "-3", "", None], "int64"),
    (["47", "1.5", "2e3"], "float64"),
    (["true", "False", ""], "bool"),
    (["47", "n/a"], "string"),
    (["", None], "string"),
    (["0", "1"], "int64"),
], ids=["int-with-missing", "float", "bool", "mixed-is-string", "all-empty", "zero-one-is-int"])
def test_infer_type(values: list[str | None], kind: str) -> None:
    assert infer_type(values) == kind


def test_infer_types_looks_at_every_row_and_convert_follows() -> None:
    rows = [{"age": "47", "site": "A"}, {"age": "", "site": "B"}, {"age": "52.5"}]
    assert column_types(("", r) for r in rows) == {"age": "float64", "site": "string"}
    assert [convert(r.get("age"), "float64") for r in rows] == [47.0, None, 52.5]
    assert convert("TRUE", "bool") is True and convert(" 7 ", "int64") == 7
