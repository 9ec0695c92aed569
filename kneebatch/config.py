"""The extraction settings: one frozen object, validated once, hashed for resume and provenance."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from enum import Enum
from typing import Any, Literal, get_args

from kneebatch.errors import ConfigError
from kneebatch.inputs.labels import FEMUR, TIBIA

LAYERS = (
    "denseblock1",
    "transition1",
    "denseblock2",
    "transition2",
    "denseblock3",
    "transition3",
    "denseblock4",
    "norm5",
)
# Channels of each layer's output in DenseNet121: the length of its pooled feature vector.
LAYER_WIDTH = {"denseblock1": 256, "transition1": 128, "denseblock2": 512, "transition2": 256,
               "denseblock3": 1024, "transition3": 512, "denseblock4": 1024, "norm5": 1024}
READ_TIMEOUT_S = 300.0  # a file that gives no answer for this long fails its subject (--read-timeout)
SUBJECT_TIMEOUT_S = 3600.0  # a subject still computing after this long fails (--subject-timeout)
DEFAULT_LAYERS = ("denseblock2", "denseblock3", "denseblock4")
Precision = Literal["float32", "bf16"]
InputNorm = Literal["imagenet", "grey"]
Pooling = Literal["region", "crop"]
ConvPadding = Literal["replicate", "zeros"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
INPUT_NORMS: tuple[str, ...] = get_args(InputNorm)
POOLINGS: tuple[str, ...] = get_args(Pooling)
CONV_PADDINGS: tuple[str, ...] = get_args(ConvPadding)
REGIONS = ("tibia", "femur", "background")
PAIRS = (("tibia", "femur"), ("tibia", "background"), ("femur", "background"))
LABELS = {"tibia": TIBIA, "femur": FEMUR}  # kneebatch's own labels, after the subject's label map


class CropMode(str, Enum):
    """How each region is cut out of the volume before the forward pass."""

    BBOX = "bbox"  # tibia/femur: label bounding box; background: the body; both + margin
    NONE = "none"  # the whole volume (the seed's behaviour)


def did_you_mean(value: str, choices: list[str] | tuple[str, ...]) -> str:
    """A " Did you mean 'x'?" hint, or an empty string when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def parse_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """Return ``value`` if it is one of ``choices``; else raise ConfigError with a hint."""
    if value not in choices:
        raise ConfigError(
            f"Unknown {what} {value!r}; expected one of {', '.join(choices)}."
            + did_you_mean(value, choices)
        )
    return value


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
    """Everything that changes the numbers a subject gets. Defaults follow DESIGN.md.

    Attributes:
        spacing_mm: isotropic voxel size to resample to, or None to keep the native grid.
        crop: region crop mode.
        hu_min, hu_max: HU window; values outside are clipped (scanner padding such as -3024 HU
            becomes air). ``hu_min`` is also the value of everything outside a region.
        input_norm: ``imagenet``: the window mapped to [0, 1] (air = 0) is the network's input and
            ImageNet's per-channel mean and std are folded into conv0 exactly, so conv0's zero
            padding is air; ``grey``: the seed's one grey ``(x - mean) / std`` before conv0's
            summed kernels (zero padding is then mid-grey, not air).
        mean, std: the grey normalisation of ``input_norm="grey"``.
        conv_padding: how every convolution after conv0 pads its input: ``replicate`` (the
            activations at the crop's face, which is air, continue: a crop face looks like more
            air) or ``zeros`` (torchvision's: a wall of zero activations at every face).
        pooling: ``region``: each hooked layer averaged over its region's voxels only (the
            region mask averaged down to the layer's grid as weights); ``crop``: averaged over the
            whole network input.
        antialias: Gaussian smoothing before resampling to a coarser grid (sigma per axis
            (target - native) / 2 mm, as scikit-image's ``resize``).
        margin_mm: margin around each crop box.
        body_threshold_hu, body_min_fraction: what counts as the body for the background crop.
        body_thin_mm: structures thinner than this (the couch, blankets, cables) are not body,
            even where they touch the skin (a morphological opening); 0 keeps them.
        min_size: every axis is padded with air to at least this many voxels.
        layers: hooked layers, in network order.
        resample_mask: put the mask on the CT grid (nearest neighbour) instead of refusing a
            geometry mismatch.
        precision: weights and activations of the forward pass, ``float32`` or ``bf16``
            (bfloat16, on CPUs with native support; pooling and cosines stay float32).
    """

    spacing_mm: float | None = 1.0
    crop: CropMode = CropMode.BBOX
    hu_min: float = -1000.0
    hu_max: float = 2000.0
    input_norm: InputNorm = "imagenet"
    mean: float = 0.449
    std: float = 0.226
    pooling: Pooling = "region"
    conv_padding: ConvPadding = "replicate"
    antialias: bool = True
    margin_mm: float = 10.0
    body_threshold_hu: float = -500.0
    body_min_fraction: float = 0.1
    body_thin_mm: float = 8.0
    min_size: int = 32
    layers: tuple[str, ...] = DEFAULT_LAYERS
    resample_mask: bool = False
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise ConfigError(f"spacing must be a positive number of mm or 'native', got "
                              f"{self.spacing_mm!r}.")
        if not self.hu_min < self.hu_max:
            raise ConfigError(f"HU window [{self.hu_min}, {self.hu_max}] is empty.")
        if self.min_size < 1 or self.margin_mm < 0 or self.std <= 0 or self.body_thin_mm < 0:
            raise ConfigError("min_size must be >= 1, margin_mm >= 0, body_thin_mm >= 0 and "
                              "std > 0.")
        if not self.layers:
            raise ConfigError(f"Choose at least one layer from {', '.join(LAYERS)}.")
        for layer in self.layers:
            parse_choice(layer, LAYERS, "layer")
        parse_choice(self.precision, PRECISIONS, "precision")
        parse_choice(self.input_norm, INPUT_NORMS, "input normalisation")
        parse_choice(self.pooling, POOLINGS, "pooling")
        parse_choice(self.conv_padding, CONV_PADDINGS, "convolution padding")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"Layers repeat: {', '.join(self.layers)}.")
        # Network order, so a given set of layers always hashes and stores the same way.
        object.__setattr__(self, "layers", tuple(sorted(self.layers, key=LAYERS.index)))
        object.__setattr__(self, "crop", CropMode(self.crop))

    @classmethod
    def seed(cls, **overrides: Any) -> ExtractionConfig:
        """``--preset seed``: every seed-fidelity choice at once (native spacing, no crop, crop
        pooling, one grey mean/std with conv0's summed kernels, zero padding everywhere);
        ``overrides`` win."""
        values: dict[str, Any] = {"spacing_mm": None, "crop": CropMode.NONE, "pooling": "crop",
                                  "input_norm": "grey", "conv_padding": "zeros"}
        return cls(**(values | overrides))

    @property
    def input_scale_offset(self) -> tuple[float, float]:
        """``hu * scale + offset`` is the network's input (HU already clipped to the window)."""
        scale = 1.0 / (self.hu_max - self.hu_min)
        offset = -self.hu_min * scale
        if self.input_norm == "grey":
            scale, offset = scale / self.std, (offset - self.mean) / self.std
        return scale, offset

    @property
    def air_value(self) -> float:
        """The network's input for air (the window's low end): 0 with ``imagenet``."""
        scale, offset = self.input_scale_offset
        return self.hu_min * scale + offset

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready form (recorded in done.json and run.json)."""
        d = dataclasses.asdict(self)
        d["crop"] = self.crop.value
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ExtractionConfig:
        """The settings recorded by ``to_dict``; settings this version does not know are ignored
        (with a warning), missing ones take their defaults.

        Raises:
            ConfigError: a known setting has an unusable value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            logging.getLogger(__name__).warning(
                "ignoring setting(s) this kneebatch version does not know: %s", ", ".join(unknown))
        known: dict[str, Any] = {k: v for k, v in values.items() if k in names}
        if "layers" in known:
            known["layers"] = tuple(known["layers"])
        return cls(**known)

    def hash(self) -> str:
        """Short sha256 of the settings; a finished subject is reused only if this matches."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
