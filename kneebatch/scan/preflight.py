"""Validate stage, second pass: read each mask (masks are small) and check its label values against
the subject's label map, so a mask with no femur or with other values is caught before a night of
compute. The first pass (``io.check_headers``) reads headers only."""

from __future__ import annotations

import dataclasses

from kneebatch.config import READ_TIMEOUT_S
from kneebatch.inputs.labels import BACKGROUND, value_counts
from kneebatch.inputs.manifest import SubjectSpec
from kneebatch.scan.bilateral import labelled_on_both_sides
from kneebatch.scan.read import anatomy_warnings, check_ct_values, read_ct_slice, read_mask


@dataclasses.dataclass(frozen=True)
class MaskCheck:
    """What a mask holds, against the subject's label map.

    Attributes:
        problems: what would fail the subject (a bone with no voxels, femur below tibia).
        notes: what the run would warn about (values of no region, side, bone size).
    """

    problems: tuple[str, ...]
    notes: tuple[str, ...]


def _listing(counts: dict[int, int], limit: int = 8) -> str:
    shown = ", ".join(f"{v} ({n} voxels)" for v, n in list(counts.items())[:limit])
    return shown + (", ..." if len(counts) > limit else "")


def check_mask(spec: SubjectSpec, read_timeout_s: float = READ_TIMEOUT_S) -> MaskCheck:
    """Read the mask's voxels and compare its values with ``spec.labels``; read the CT's middle
    slice to see that it is a CT.

    Raises:
        InputImageError: the mask or the CT's slice cannot be read, the mask is no label map or
            the CT is one (swapped columns?), the femur lies below the tibia.
    """
    check_ct_values(spec, read_ct_slice(spec, read_timeout_s))
    mask, image = read_mask(spec, read_timeout_s)
    counts = value_counts(mask)
    problems = []
    for region in ("tibia", "femur"):
        values = spec.labels.values_of(region)
        if not any(counts.get(v, 0) for v in values):
            problems.append(
                f"mask {spec.mask} has no {region} voxels ({region}="
                f"{'+'.join(map(str, values))}); it holds {_listing(counts)}. Give the right "
                "values with --labels tibia=V,femur=V or the manifest's tibia_label / femur_label "
                "columns")
    known = {BACKGROUND, *spec.labels.tibia, *spec.labels.femur}
    other = {v: n for v, n in counts.items() if v not in known}
    notes = [f"values {_listing(other)} belong to no region (air in all three)"] if other else []
    if not problems:  # femur below tibia raises, as in run
        notes.extend(anatomy_warnings(spec, image, spec.labels.canonical(mask)[0]))
    if spec.side in ("L", "R", None) and not spec.bilateral and labelled_on_both_sides(
            mask, image.GetSpacing()[0]):
        notes.append(f"the mask labels bones in both legs, but side is {spec.side or 'empty'}: a "
                     "bilateral scan? Give side 'both' to split it into two knees")
    return MaskCheck(tuple(problems), tuple(notes))
