"""Label maps: which mask values are the tibia and which the femur.

Masks come from many tools (TotalSegmentator, nnU-Net models, manual labels) with their own values.
A ``LabelMap`` names them (``tibia=10,femur=20``, several values per region as ``femur=75+76``), and
``canonical`` turns any integer mask into kneebatch's own labels: 0 background, 1 tibia, 2 femur,
``OTHER`` for every other value (it belongs to no region: air in all three).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from kneebatch.errors import ConfigError

BACKGROUND, TIBIA, FEMUR, OTHER = 0, 1, 2, 3
_REGION = {"tibia": TIBIA, "femur": FEMUR}
_CHUNK = 1 << 22  # voxels per histogram step
_VALUES = re.compile(r"^-?\d+(\+-?\d+)*$")


def parse_values(text: str, region: str, where: str = "") -> tuple[int, ...]:
    """``"75+76"`` -> ``(75, 76)``.

    Raises:
        ConfigError: not integers joined by '+', or 0 (the background's value).
    """
    value = text.strip().replace(" ", "")
    if not _VALUES.match(value):
        raise ConfigError(f"{where}label value(s) {text!r} for {region} are not integers; give "
                          f"e.g. {region}=10 or {region}=75+76.")
    values = tuple(sorted({int(v) for v in value.split("+")}))
    if 0 in values:
        raise ConfigError(f"{where}{region} cannot be label 0: 0 is the background.")
    return values


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """The mask values of each bone; 0 is always the background."""

    tibia: tuple[int, ...] = (TIBIA,)
    femur: tuple[int, ...] = (FEMUR,)

    def __post_init__(self) -> None:
        shared = sorted(set(self.tibia) & set(self.femur))
        if shared:
            raise ConfigError(f"label(s) {shared} are given for both tibia and femur; each value "
                              "may name one bone only.")

    @classmethod
    def parse(cls, text: str, where: str = "") -> LabelMap:
        """``"tibia=10,femur=20"``: both bones named (a map naming one would quietly keep the
        default of the other).

        Raises:
            ConfigError: an unknown, repeated or missing region, a bad value.
        """
        values: dict[str, tuple[int, ...]] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, numbers = part.partition("=")
            name = name.strip().lower()
            if not sep or name not in _REGION:
                raise ConfigError(f"{where}label map {text!r}: expected region=value pairs for "
                                  "tibia and femur, e.g. --labels tibia=10,femur=20 (several "
                                  "values as femur=75+76).")
            if name in values:
                raise ConfigError(f"{where}label map {text!r} names {name} twice.")
            values[name] = parse_values(numbers, name, where)
        missing = [name for name in _REGION if name not in values]
        if missing:
            given = ",".join(f"{k}={'+'.join(map(str, v))}" for k, v in values.items())
            raise ConfigError(f"{where}label map {text!r} does not name {' or '.join(missing)}: "
                              f"name both bones, e.g. --labels {given or 'tibia=10'},"
                              f"{missing[0]}={'20' if missing[0] == 'femur' else '10'}.")
        return cls(**values)

    def override(self, tibia: str | None, femur: str | None, where: str = "") -> LabelMap:
        """This map with a row's own ``tibia_label`` / ``femur_label`` values (empty: keep)."""
        changes = {name: parse_values(text, name, where)
                   for name, text in (("tibia", tibia), ("femur", femur)) if text and text.strip()}
        return dataclasses.replace(self, **changes) if changes else self

    def __str__(self) -> str:
        return ",".join(f"{name}={'+'.join(map(str, getattr(self, name)))}" for name in _REGION)

    def values_of(self, region: str) -> tuple[int, ...]:
        """The mask values of ``region`` (``background``: 0)."""
        return getattr(self, region) if region in _REGION else (BACKGROUND,)

    @property
    def is_default(self) -> bool:
        return self == LabelMap()

    def canonical(self, mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """The mask in kneebatch's labels (uint8: 0, 1 tibia, 2 femur, ``OTHER``) and the sorted
        values that are neither background nor a bone of this map."""
        if self.is_default and mask.dtype == np.uint8 and int(mask.max()) <= FEMUR:
            return mask, []  # already kneebatch's labels: one pass, no histogram
        present = value_counts(mask)
        known = {BACKGROUND, *self.tibia, *self.femur}
        unknown = [v for v in present if v not in known]
        if self.is_default and not unknown and mask.dtype == np.uint8:
            return mask, []
        out = np.full(mask.shape, OTHER if unknown else BACKGROUND, dtype=np.uint8)
        if unknown:
            out[mask == BACKGROUND] = BACKGROUND
        for label, values in ((TIBIA, self.tibia), (FEMUR, self.femur)):
            for value in values:
                if value in present:
                    out[mask == value] = label
        return out, unknown


def value_counts(mask: np.ndarray) -> dict[int, int]:
    """Voxels of each value of an integer mask (a histogram in chunks when the range is small:
    much faster than sorting, and no full-size copy)."""
    if mask.size == 0:
        return {}
    low, high = int(mask.min()), int(mask.max())
    if high - low >= 65536:
        found, counts = np.unique(mask, return_counts=True)
        return {int(v): int(n) for v, n in zip(found, counts, strict=True)}
    histogram = np.zeros(high - low + 1, dtype=np.int64)
    flat = mask.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        histogram += np.bincount(flat[start:start + _CHUNK].astype(np.intp) - low,
                                 minlength=histogram.size)
    return {int(v) + low: int(histogram[v]) for v in np.flatnonzero(histogram)}
